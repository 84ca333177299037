"""Parameter sets shaped like real models, with μP base shapes attached.

A :class:`ParamSet` is a list of :class:`TensorSpec` (name, shape, base
shape and initialisation); :func:`materialize` turns it into plain
``nn.Parameter`` s carrying an ``infshape`` (no module, no forward pass) and
:func:`fill_grads` gives them random gradients.  Both are deterministic in
their seed, so every implementation starts from the same values.

Base shapes follow ``set_base_shapes(model, base, delta=...)``: a dimension
is infinite (a "width") when it differs between the base and delta models.
``None`` in a base shape marks a finite dimension (vocabulary, context,
kernel size, classes, input channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "TensorSpec",
    "ParamSet",
    "MODELS",
    "FULL",
    "QUICK",
    "SMOKE",
    "get",
    "materialize",
    "fill_grads",
    "drop_grads",
    "infshape_classes",
]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    base: tuple[Optional[int], ...]  # base dimension per axis; None: finite
    init: str = "normal"  # "normal" (std 0.02), "ones" or "zeros"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ParamSet:
    name: str
    description: str
    tensors: tuple[TensorSpec, ...]
    #: tensors that have no gradient on every other step (a frozen or unused
    #: branch): the pattern that must not cost a re-plan
    intermittent: tuple[int, ...] = ()

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)

    def width_mults(self) -> list[float]:
        """Distinct main-dimension width multipliers (μAdam's matrix groups)."""
        mults = set()
        for t in self.tensors:
            inf = [(b, d) for b, d in zip(t.base, t.shape) if b is not None]
            if len(inf) == 2:
                b, d = inf[-1]
                mults.add(d / b)
        return sorted(mults)


# ----------------------------------------------------------------------
# GPT-2 (pre-norm transformer, readout tied to wte: no extra tensor)
# ----------------------------------------------------------------------
def gpt2(name: str, n_layer: int, d: int, *, vocab: int = 50257, n_ctx: int = 1024,
         base_d: int = 256, base_ffn: int = 512) -> ParamSet:
    """GPT-2 parameters as ``nn.Linear`` stores them (``[out, in]``).

    Base model: width ``base_d`` and MLP hidden ``base_ffn`` (the delta model
    doubles both), so for GPT-2 small (d=768, MLP 3072) attention matrices
    have width multiplier 3 and MLP matrices 6; μSGD additionally sees
    fan-in/fan-out ratios 1/2, 1 and 2.
    """
    ffn = 4 * d
    t: list[TensorSpec] = [
        TensorSpec("wte.weight", (vocab, d), (None, base_d)),
        TensorSpec("wpe.weight", (n_ctx, d), (None, base_d)),
    ]
    for i in range(n_layer):
        h = f"h.{i}."
        t += [
            TensorSpec(h + "ln_1.weight", (d,), (base_d,), "ones"),
            TensorSpec(h + "ln_1.bias", (d,), (base_d,), "zeros"),
            TensorSpec(h + "attn.c_attn.weight", (3 * d, d), (3 * base_d, base_d)),
            TensorSpec(h + "attn.c_attn.bias", (3 * d,), (3 * base_d,), "zeros"),
            TensorSpec(h + "attn.c_proj.weight", (d, d), (base_d, base_d)),
            TensorSpec(h + "attn.c_proj.bias", (d,), (base_d,), "zeros"),
            TensorSpec(h + "ln_2.weight", (d,), (base_d,), "ones"),
            TensorSpec(h + "ln_2.bias", (d,), (base_d,), "zeros"),
            TensorSpec(h + "mlp.c_fc.weight", (ffn, d), (base_ffn, base_d)),
            TensorSpec(h + "mlp.c_fc.bias", (ffn,), (base_ffn,), "zeros"),
            TensorSpec(h + "mlp.c_proj.weight", (d, ffn), (base_d, base_ffn)),
            TensorSpec(h + "mlp.c_proj.bias", (d,), (base_d,), "zeros"),
        ]
    t += [
        TensorSpec("ln_f.weight", (d,), (base_d,), "ones"),
        TensorSpec("ln_f.bias", (d,), (base_d,), "zeros"),
    ]
    desc = f"GPT-2 {n_layer} layers, d={d}, vocab {vocab}, ctx {n_ctx}, tied readout (base d={base_d}, MLP {base_ffn})"
    return ParamSet(name, desc, tuple(t))


# ----------------------------------------------------------------------
# ResNet-50-like CNN: bottleneck blocks, conv weights + BN affine
# ----------------------------------------------------------------------
def resnet(name: str, width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3), *,
           base_width: int = 16, classes: int = 1000, expansion: int = 4) -> ParamSet:
    """Channel counts are multiples of ``width``; base shapes use ``base_width``
    (every conv and BN has width multiplier ``width / base_width``).  The RGB
    input, kernel sizes and classes are finite dimensions."""
    t: list[TensorSpec] = []

    def ch(k: float) -> tuple[int, int]:
        return int(k * width), int(k * base_width)

    def conv(n: str, cout: tuple[int, int], cin: tuple[int, Optional[int]], k: int) -> None:
        t.append(TensorSpec(n + ".weight", (cout[0], cin[0], k, k), (cout[1], cin[1], None, None)))

    def bn(n: str, c: tuple[int, int]) -> None:
        t.append(TensorSpec(n + ".weight", (c[0],), (c[1],), "ones"))
        t.append(TensorSpec(n + ".bias", (c[0],), (c[1],), "zeros"))

    conv("conv1", ch(1), (3, None), 7)
    bn("bn1", ch(1))
    cin = ch(1)
    for stage, n_blocks in enumerate(blocks):
        mid = ch(2**stage)
        out = ch(expansion * 2**stage)
        for b in range(n_blocks):
            p = f"layer{stage + 1}.{b}."
            conv(p + "conv1", mid, cin, 1)
            bn(p + "bn1", mid)
            conv(p + "conv2", mid, mid, 3)
            bn(p + "bn2", mid)
            conv(p + "conv3", out, mid, 1)
            bn(p + "bn3", out)
            if b == 0:
                conv(p + "downsample.0", out, cin, 1)
                bn(p + "downsample.1", out)
            cin = out
    t.append(TensorSpec("fc.weight", (classes, cin[0]), (None, cin[1])))
    t.append(TensorSpec("fc.bias", (classes,), (None,), "zeros"))
    desc = f"ResNet-{3 * sum(blocks) + 2}-like, width {width} (base {base_width}), {classes} classes"
    return ParamSet(name, desc, tuple(t))


# ----------------------------------------------------------------------
# launch-bound: many small tensors
# ----------------------------------------------------------------------
def small_tensors(name: str, n_tensors: int = 500, widths: Sequence[int] = (32, 64, 96, 128), base: int = 32) -> ParamSet:
    """Blocks of (weight [w, w], bias [w], norm weight [w], norm bias [w]),
    ``w`` cycling through ``widths``: a launch-bound step."""
    t: list[TensorSpec] = []
    i = 0
    while len(t) < n_tensors:
        w = widths[i % len(widths)]
        p = f"block{i}."
        t += [
            TensorSpec(p + "weight", (w, w), (base, base)),
            TensorSpec(p + "bias", (w,), (base,), "zeros"),
            TensorSpec(p + "norm.weight", (w,), (base,), "ones"),
            TensorSpec(p + "norm.bias", (w,), (base,), "zeros"),
        ]
        i += 1
    return ParamSet(name, f"{n_tensors} small tensors (widths {'/'.join(map(str, widths))})", tuple(t[:n_tensors]))


def intermittent(name: str, n_tensors: int = 150) -> ParamSet:
    """:func:`small_tensors` where one tensor's gradient goes away every other step."""
    base = small_tensors(name, n_tensors, widths=(64, 128), base=32)
    return ParamSet(name, f"{n_tensors} small tensors, one without a gradient every other step", base.tensors, (n_tensors // 2,))


MODELS: dict[str, Callable[[], ParamSet]] = {
    # full size
    "gpt2-small": lambda: gpt2("gpt2-small", 12, 768),
    "gpt2-medium": lambda: gpt2("gpt2-medium", 24, 1024),
    "gpt2-large": lambda: gpt2("gpt2-large", 36, 1280),
    "gpt2-xl": lambda: gpt2("gpt2-xl", 48, 1600),
    "resnet50": lambda: resnet("resnet50"),
    "small-500": lambda: small_tensors("small-500", 500),
    "intermittent-150": lambda: intermittent("intermittent-150", 150),
    # --quick
    "gpt2-mini": lambda: gpt2("gpt2-mini", 4, 256, vocab=8192, n_ctx=256, base_d=128, base_ffn=256),
    "resnet50-quarter": lambda: resnet("resnet50-quarter", width=16, base_width=8),
    # --smoke
    "gpt2-tiny": lambda: gpt2("gpt2-tiny", 2, 64, vocab=512, n_ctx=64, base_d=32, base_ffn=64),
    "small-64": lambda: small_tensors("small-64", 64, widths=(16, 32), base=16),
}

FULL = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "resnet50", "small-500", "intermittent-150")
QUICK = ("gpt2-mini", "resnet50-quarter", "small-500", "intermittent-150")
SMOKE = ("gpt2-tiny", "small-64")


def get(name: str) -> ParamSet:
    try:
        return MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def infshape_classes():
    """``(InfShape, InfDim)``: mup's when installed (the ``mup`` implementation
    needs them; fastmup reads the same interface), else fastmup's."""
    try:
        from mup.infshape import InfDim, InfShape
    except ImportError:
        from fastmup.infshape import InfDim, InfShape  # type: ignore
    return InfShape, InfDim


def materialize(pset: ParamSet, device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    """Fresh parameters with ``infshape`` attached, deterministic in ``seed``."""
    InfShape, InfDim = infshape_classes()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for spec in pset.tensors:
        data = torch.empty(spec.shape, device=device, dtype=dtype)
        if spec.init == "ones":
            data.fill_(1.0)
        elif spec.init == "zeros":
            data.zero_()
        else:
            data.normal_(0.0, 0.02, generator=gen)
        p = nn.Parameter(data)
        p.infshape = InfShape([InfDim(b, d) for b, d in zip(spec.base, spec.shape)])
        params.append(p)
    return params


def drop_grads(pset: ParamSet, params: Sequence[torch.Tensor], step: int) -> None:
    """On odd steps, the tensors of ``pset.intermittent`` have no gradient."""
    if step % 2:
        for i in pset.intermittent:
            params[i].grad = None


def fill_grads(params: Sequence[torch.Tensor], seed: int, scale: float = 1e-2) -> None:
    """Set (or overwrite in place) every ``p.grad`` with N(0, scale²) noise
    drawn from ``seed``: the same seed gives the same gradient set."""
    if not params:
        return
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        p.grad.normal_(0.0, scale, generator=gen)
