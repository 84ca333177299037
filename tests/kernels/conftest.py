"""Shared set-up of the fused-kernel tests: Triton's interpreter, tensor sets, tolerances.

The kernels are tested on the CPU under Triton's interpreter, which must be
switched on before anything imports triton (``triton.jit`` picks interpreter
or compiler when a kernel module is imported), hence the environment variable
set at the top of this file, which pytest imports before any test module.
``TRITON_INTERPRET=0`` in the environment runs the same tests compiled on a
CUDA device instead.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
from typing import Iterable, Optional, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")

_HERE = pathlib.Path(__file__).parent


def _skip_reason() -> Optional[str]:
    if not HAVE_TRITON:
        return "triton is not installed"
    if not INTERPRETED and not torch.cuda.is_available():
        return "TRITON_INTERPRET=0 and no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if _HERE in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


# ----------------------------------------------------------------------
# settings and tolerances
# ----------------------------------------------------------------------
STEPS = 4  # optimizer steps per comparison: enough to exercise state and bias corrections
# Examples per hypothesis test: 30 keeps tests/kernels around a minute on
# the interpreter; raise it for a longer search (e.g. FASTMUP_KERNEL_EXAMPLES=400).
MAX_EXAMPLES = int(os.environ.get("FASTMUP_KERNEL_EXAMPLES", "30"))

# The kernels perform the eager path's fp32 operations one for one, with
# torch's fused multiply-adds (add with alpha, lerp, addcmul) as tl.fma, so
# SGD matches eager bit for bit on an FMA-capable CPU.  The one exception is
# Adam's sqrt: the kernel's is IEEE (sqrt_rn, as torch's CUDA sqrt), while
# torch's CPU sqrt goes through MKL's vector math and is off by one ulp for
# ~20% of inputs.  That moves Adam's denominator, hence its update, by one
# ulp; the sum p - update lands on the other side of a rounding boundary now
# and then, so p may differ by one ulp of p per step.  Over a few steps
# without re-synchronisation that adds up to a few ulps of the tensor's
# magnitude: FP32_ULPS = 8 (measured worst: see FASTMUP_REPORT_ULPS=1;
# under 4 on the whole suite).  A CPU without FMA, or torch fusing
# differently, costs about one more ulp per op, still inside.  Any real
# mistake (a wrong multiplier, bias correction, flag or row) moves params by
# a sizeable fraction of lr >= 1e-3, ~1e3 times more.
FP32_ULPS = 8
# bf16/fp16 entries smaller than 1/LOW_PRECISION_FLOOR of their tensor's
# largest are judged at that magnitude: such entries are differences of
# values of the tensor's size (a param crossing zero) and inherit the fp32
# rounding of those, which can exceed a storage ulp of the tiny result.
LOW_PRECISION_FLOOR = 256



# ----------------------------------------------------------------------
# tensor sets with μP shapes
# ----------------------------------------------------------------------
def infshape(shape: Sequence[int], bases: Sequence[Optional[int]]):
    """``InfShape`` with ``bases[d]`` the base size of dim ``d`` (None: finite).

    Built directly rather than through ``set_base_shapes`` so that a test can
    give every tensor of a random set its own width multipliers.
    """
    from fastmup.infshape import InfDim, InfShape

    return InfShape([InfDim(b, d) for b, d in zip(bases, shape)])


def make_params(specs, dtypes, seed: int = 0) -> list[torch.nn.Parameter]:
    """One parameter per ``(shape, bases)`` spec, values ~ N(0, 1) rounded to its dtype."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for (shape, bases), dtype in zip(specs, dtypes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(DEVICE))
        p.infshape = infshape(shape, bases)
        params.append(p)
    return params


def twin(params: Iterable[torch.nn.Parameter], dtype: Optional[torch.dtype] = None) -> list[torch.nn.Parameter]:
    """Independent copies (optionally cast) that keep the infshapes."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype))
        q.infshape = p.infshape
        out.append(q)
    return out


def set_grads(param_sets, seed: int, scales=None, missing=()) -> None:
    """Give every set the same gradients (generated in fp32, rounded to each
    param's dtype); params whose index is in ``missing`` get ``None``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(param_sets[0])
    for i in range(n):
        g = torch.randn(param_sets[0][i].shape, generator=gen)
        if scales is not None:
            g = g * scales[i]
        for params in param_sets:
            p = params[i]
            p.grad = None if i in missing else g.to(p.dtype).to(DEVICE)


def launches(algorithm: str) -> int:
    from fastmup.kernels import _common

    return _common.LAUNCHES[algorithm]


# ----------------------------------------------------------------------
# hypothesis: random tensor sets and param groups
# ----------------------------------------------------------------------
DTYPE_MODES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "mixed": (None, None),  # each tensor fp32 or bf16: two batches, two launches
    "bf16+fp32 state": (torch.bfloat16, torch.float32),
}


@st.composite
def tensor_specs(draw, block: int, tile: int):
    """``(shape, bases)`` per tensor: finite, vector-like or matrix-like μP
    shapes with width multipliers 1, 2 or 4 (bases of empty dims stay finite).

    Sizes sit on every boundary of a launch: empty, single element, odd, one
    inner tile ± 1, one program's block ± 1, and a 2-D tensor of exactly one
    block.  At most 3 blocks in all: the interpreter needs ~20 ms per tile.
    """
    sizes_1d = [0, 1, 2, 7, tile - 1, tile + 1, block - 1, block + 1]
    shapes_2d = [(3, 5), (1, 33), (17, 65), (block // 64, 64)]
    budget = 3 * block
    specs, total = [], 0
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            shape = (draw(st.sampled_from(sizes_1d)),)
        else:
            shape = draw(st.sampled_from(shapes_2d))
        numel = 1
        for d in shape:
            numel *= d
        if total + numel > budget:
            shape = (draw(st.sampled_from(sizes_1d[:4])),)
            numel = shape[0]
        total += numel
        kind = draw(st.sampled_from(["finite", "vector", "matrix"]))
        mults = [draw(st.sampled_from([1, 2, 4])) for _ in shape]
        inf = [max(1, d // m) if d > 0 else None for d, m in zip(shape, mults)]
        if kind == "finite":
            bases = [None] * len(shape)
        elif kind == "vector":
            bases = [None] * (len(shape) - 1) + [inf[-1]]
        else:
            bases = inf
        specs.append((shape, bases))
    return specs


def draw_assignment(draw, n: int):
    """``(ngroups, group of each tensor)`` with 1-3 groups, none empty."""
    ngroups = draw(st.integers(1, min(3, n)))
    return ngroups, list(range(ngroups)) + [draw(st.integers(0, ngroups - 1)) for _ in range(n - ngroups)]


def draw_dtypes(draw, n: int):
    """Per-tensor param dtypes and the optimizer's ``state_dtype``."""
    param_dtype, state_dtype = DTYPE_MODES[draw(st.sampled_from(sorted(DTYPE_MODES)))]
    if param_dtype is None:
        return [draw(st.sampled_from([torch.float32, torch.bfloat16])) for _ in range(n)], state_dtype
    return [param_dtype] * n, state_dtype


def draw_extras(draw, n: int) -> dict:
    """Per-tensor lr scales (``param_lr_scales``), grad magnitudes, which
    tensors lack a grad at each step (usually none) and a seed."""
    return dict(
        lr_scales={i: draw(st.sampled_from([0.5, 3.0])) for i in range(n) if draw(st.integers(0, 3)) == 0},
        grad_scales=[draw(st.sampled_from([1e-3, 1.0, 10.0])) for _ in range(n)],
        missing=[frozenset(i for i in range(n) if draw(st.integers(0, 7)) == 0) for _ in range(STEPS)],
        seed=draw(st.integers(0, 2**16)),
    )


def build_optimizer(cls, params, case, backend):
    """``cls`` over ``params`` split into the case's groups, with its lr scales."""
    groups = [
        dict(params=[p for p, g in zip(params, case["assign"]) if g == gi], **hp) for gi, hp in enumerate(case["groups"])
    ]
    scales = {params[i]: s for i, s in case["lr_scales"].items()}
    return cls(groups, backend=backend, state_dtype=case["state_dtype"], param_lr_scales=scales)


def expected_launches(params) -> int:
    """One launch per dtype signature with a non-empty tensor that has a grad."""
    return len({p.dtype for p in params if p.grad is not None and p.numel() > 0})


# ----------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------
def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """|a - e| <= FP32_ULPS ulps of m elementwise, m = max |e| over the
    tensor: an entry near zero (a param crossing zero, a momentum changing
    sign) is the difference of terms of the tensor's size and carries their
    rounding error, not one relative to its own tiny value.  This is
    ``assert_close(rtol=R, atol=R·m)`` with R = FP32_ULPS·2⁻²³ ≈ 1e-6."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    bound = FP32_ULPS * _ulp(torch.float32) * e.abs().max().item()
    err = (a - e).abs()
    ok = (err <= bound) | (a == e) | (a.isnan() & e.isnan())
    if bound > 0:
        WORST[0] = max(WORST[0], float(err[ok].max()) / bound * FP32_ULPS if ok.any() else 0.0)
    assert ok.all(), f"{what}: {int((~ok).sum())} entries off, worst {float(err[~ok].max()):.3g} (bound {bound:.3g})"


def assert_within_one_rounding(actual: torch.Tensor, expected: torch.Tensor, what: str, ulps: int = 1) -> None:
    """bf16/fp16 ``actual`` at most ``ulps`` ulps of its dtype from ``expected``
    (any dtype), ulps taken at max(|e|, max |e| / LOW_PRECISION_FLOOR)."""
    dtype = actual.dtype
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    mag = e.abs().clamp_min(e.abs().max().item() / LOW_PRECISION_FLOOR).to(dtype)
    # the spacing of ``dtype`` at that magnitude, subnormals included
    spacing = torch.nextafter(mag, torch.tensor(float("inf"), dtype=dtype)).double() - mag.double()
    err = (a - e).abs()
    ok = (err <= ulps * spacing) | (a == e) | (a.isnan() & e.isnan())
    assert ok.all(), f"{what}: {int((~ok).sum())} entries more than {ulps} ulp(s) of {dtype} off, worst {float(err[~ok].max()):.3g}"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 within FP32_ULPS; bf16/fp16 within one ulp of the storage dtype.

    For bf16/fp16 both paths compute in fp32 and round once, so from the
    same inputs they agree unless their fp32 values (an ulp apart, see
    above) straddle a rounding boundary of the storage dtype: then they
    differ by exactly one storage ulp.  (Low-precision runs are compared
    step by step from synchronised inputs, see :func:`sync`: a storage-ulp
    difference fed back through fp16 state can grow past one ulp.)"""
    if actual.dtype == torch.float32:
        assert_fp32_close(actual, expected, what)
    else:
        assert_within_one_rounding(actual, expected, what)


@torch.no_grad()
def sync(fused, eager, fused_params, eager_params) -> None:
    """Copy the fused optimizer's params and state into the eager one, in
    place (same addresses: no re-plan), so the next step starts both from
    the same values and its comparison measures that step alone."""
    for p, q in zip(fused_params, eager_params):
        q.copy_(p)
        for key, value in fused.state.get(p, {}).items():
            eager.state[q][key].copy_(value)


def compare_optimizers(fused, other, fused_params, other_params, keys: Sequence[str], check_step: bool = True) -> None:
    """Params, the state buffers named in ``keys`` and the step counts of two
    optimizers (``check_step=False`` for torch.optim.SGD, which keeps none)."""
    for i, (p, q) in enumerate(zip(fused_params, other_params)):
        assert_matches(p.detach(), q.detach(), f"param {i} {tuple(p.shape)} {p.dtype}")
        sp, sq = fused.state.get(p, {}), other.state.get(q, {})
        assert {k for k in sp if k in keys} == {k for k in sq if k in keys}, f"param {i}: state {sorted(sp)} vs {sorted(sq)}"
        for key in keys:
            if key in sq:
                assert sp[key].dtype == sq[key].dtype, f"param {i} {key}: dtype"
                assert_matches(sp[key], sq[key], f"param {i} {key}")
        if check_step and "step" in sq:
            assert float(sp["step"]) == float(sq["step"]), f"param {i}: step {float(sp['step'])} vs {float(sq['step'])}"


# Largest fp32 difference seen, in ulps of the tensor's magnitude; printed at
# the end of the session with FASTMUP_REPORT_ULPS=1, to revisit FP32_ULPS.
WORST = [0.0]


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("FASTMUP_REPORT_ULPS") == "1":
        terminalreporter.write_line(f"kernels: worst fp32 difference {WORST[0]:.2f} ulps of the tensor's max magnitude")
