"""The ``cpu`` backend (csrc/host, the C++ functors on the host) against the
eager reference, against the ``mup`` 1.0 package, and its plumbing.

Tolerances (every comparison is made after one step from identical inputs:
after each step the backend's params and state are reset to the reference's,
while the step counters advance independently and are compared exactly):

* fp32 storage: both sides evaluate the same formula in fp32, op for op, but
  torch's vectorised kernels fuse some multiply-adds (``add`` with ``alpha``,
  ``lerp``) that the portable host build rounds twice.  Each of the ~8
  roundings of one element's update differs by at most one ulp of an
  intermediate, and every intermediate is bounded by the tensor's largest
  ``|value before the step|`` plus its largest ``|change|`` (the Adam ratio
  m/sqrt(v) is well conditioned once the gradient is exact, see below), so
  ``|cpu - eager| <= 16 eps32 (max|prev| + max|delta|)`` per tensor, plus
  4 eps32 relative elementwise.
* bf16/fp16 storage: the fp32 results before the final rounding obey the bound
  above; rounding each to the storage dtype moves it by at most half a storage
  ulp, so the stored values differ by at most one storage ulp of the value
  (plus that fp32 bound, which only matters next to zero).
* Coupled weight decay (Adam): ``g + wd*p`` may cancel, and Adam's normalised
  step amplifies the rounding of a cancelled ``g`` by up to ``lr/eps``: no
  implementation difference is "a few ulps" there.  The tests draw such
  gradients with the sign of ``wd*p`` so that the sum never cancels.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from tests.ext import needs_cpu_build

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmup import ext  # noqa: E402
from fastmup.optim import MuAdam, MuAdamW, MuSGD  # noqa: E402

try:
    from fastmup import set_base_shapes
except ImportError:  # pragma: no cover - fastmup.shape not there yet
    from mup import set_base_shapes

pytestmark = needs_cpu_build

EPS32 = 2.0**-23


def host_block() -> int:
    return int(ext.load("cpu").BLOCK)


# ---------------------------------------------------------------------------
# building parameters with μP base shapes
# ---------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(t) for t in tensors])


def _infinite_shapes(size: int, kind: str):
    """(shape, base shape, delta shape) of a tensor of ``size`` elements.

    kind "finite": no infinite dim; "vector": one; "matrix": two (when both
    factors are >= 1; size 0 stays finite)."""
    if size == 0 or kind == "finite":
        shape = (size,)
        return shape, shape, shape
    if kind == "vector":
        return (size,), (max(1, size // 2),), (max(1, size // 2) + 1,)
    a = max(d for d in range(1, int(math.isqrt(size)) + 1) if size % d == 0)
    shape = (a, size // a)
    base = tuple(max(1, d // 2) for d in shape)
    return shape, base, tuple(d + 1 for d in base)


def make_params(specs, seed: int, misalign: bool = False, device="cpu"):
    """specs: list of (size, kind, dtype).  Returns the list of Parameters with infshape."""
    g = torch.Generator().manual_seed(seed)
    tensors, base, delta = [], {}, {}
    for i, (size, kind, dtype) in enumerate(specs):
        shape, b, d = _infinite_shapes(size, kind)
        values = torch.randn(shape, generator=g).to(dtype).to(device)
        if misalign and size > 0:
            # a view at an odd element offset: addresses not 16-byte aligned
            storage = torch.empty(size + 1, dtype=dtype, device=device)
            values = storage[1:].view(shape).copy_(values)
        tensors.append(values)
        base[f"p.{i}"], delta[f"p.{i}"] = torch.Size(b), torch.Size(d)
    model = Holder(tensors)
    set_base_shapes(model, base, delta=delta, rescale_params=False)
    return list(model.p)


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------
def storage_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at the magnitude of ``x`` (float32 result)."""
    x = x.float().abs()
    info = torch.finfo(dtype)
    _, exp = torch.frexp(x)  # x = m * 2**exp, m in [0.5, 1)
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    min_exp = int(math.log2(info.tiny))  # smallest normal exponent
    e = torch.clamp(exp.float() - 1, min=min_exp)
    return torch.pow(2.0, e - mant_bits)


def assert_step_close(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor, what: str) -> None:
    """cpu vs eager after one step from the same ``before`` (see module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    a, e, b = actual.float(), expected.float(), before.float()
    finite = torch.isfinite(e) & torch.isfinite(b)
    scale = (b[finite].abs().max() if finite.any() else 0) + ((e - b)[finite].abs().max() if finite.any() else 0)
    tol = 16 * EPS32 * float(scale) + 4 * EPS32 * e.abs()
    if expected.dtype != torch.float32:
        tol = tol + storage_ulp(e, expected.dtype)
    same = (a == e) | (a.isnan() & e.isnan())
    ok = same | ((a - e).abs() <= tol)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {e.numel()} elements differ beyond tolerance; first at {bad}: "
            f"cpu={a[tuple(bad)].item()!r} eager={e[tuple(bad)].item()!r} before={b[tuple(bad)].item()!r} "
            f"tol={tol[tuple(bad)].item()!r}"
        )


def state_tensors(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}


def compare_and_resync(opt_ref, opt_cpu, params_ref, params_cpu, before, step):
    for i, (pr, pc) in enumerate(zip(params_ref, params_cpu)):
        assert_step_close(pc.detach(), pr.detach(), before[i]["param"], f"step {step} param {i} {tuple(pr.shape)} {pr.dtype}")
        sr, sc = state_tensors(opt_ref, pr), state_tensors(opt_cpu, pc)
        assert sr.keys() == sc.keys(), (i, sr.keys(), sc.keys())
        for k in sr:
            assert_step_close(sc[k], sr[k], before[i].get(k, torch.zeros_like(sr[k])), f"step {step} {k} {i}")
        if "step" in opt_ref.state[pr]:
            assert float(opt_cpu.state[pc]["step"]) == float(opt_ref.state[pr]["step"]), (i, step)
        # resync: the next step starts from identical values
        with torch.no_grad():
            pc.copy_(pr)
            for k in sr:
                sc[k].copy_(sr[k])


def snapshot(opt, params):
    out = []
    for p in params:
        d = {"param": p.detach().clone()}
        d.update({k: v.clone() for k, v in state_tensors(opt, p).items()})
        out.append(d)
    return out


# ---------------------------------------------------------------------------
# randomized configurations
# ---------------------------------------------------------------------------
SMALL_SIZES = [0, 1, 2, 3, 5, 17, 255, 1023, 1025]


@st.composite
def tensor_specs(draw, dtype_mode, block=None):
    """Tensor sizes around the backend's block-map entry (default: the host's)."""
    block = block or host_block()
    sizes = SMALL_SIZES + [block - 1, block, block + 1, 2 * block + 7]
    n = draw(st.integers(1, 6))
    specs = []
    for _ in range(n):
        size = draw(st.sampled_from(sizes))
        kind = draw(st.sampled_from(["finite", "vector", "matrix"]))
        if dtype_mode == "mixed":
            dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16+fp32state": torch.bfloat16}[dtype_mode]
        specs.append((size, kind, dtype))
    return specs


DTYPE_MODES = ["fp32", "bf16", "fp16", "mixed", "bf16+fp32state"]

adam_group = st.fixed_dictionaries(
    dict(
        lr=st.sampled_from([1e-3, 1e-2, 0.1]),
        weight_decay=st.sampled_from([0.0, 0.0, 1e-2, 0.1]),
        betas=st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.99, 0.999])),
        eps=st.sampled_from([1e-8, 1e-6]),
        amsgrad=st.booleans(),
        maximize=st.booleans(),
        decoupled_wd=st.booleans(),
    )
)


@st.composite
def sgd_group(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.0, 0.1])) if momentum else 0.0
    return dict(
        lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        momentum=momentum,
        dampening=dampening,
        nesterov=bool(momentum) and dampening == 0 and draw(st.booleans()),
        maximize=draw(st.booleans()),
        decoupled_wd=draw(st.booleans()),
    )


amp_mode = st.sampled_from(["none", "none", "scale", "scale+skip"])


def run_against_eager(cls, specs, groups, assignment, state_dtype, amp, seed, misalign, nsteps=3, backend="cpu"):
    """``backend`` (on its device) against the eager reference on the same device."""
    device = "cuda" if backend == "cuda" else "cpu"
    params_ref = make_params(specs, seed, misalign, device)
    params_cpu = make_params(specs, seed, misalign, device)  # identical values (and offsets)

    def param_groups(params):
        out = []
        for gi, hp in enumerate(groups):
            members = [p for p, a in zip(params, assignment) if a == gi]
            if members:
                out.append(dict(params=members, **hp))
        return out

    opt_ref = cls(param_groups(params_ref), backend="eager", state_dtype=state_dtype)
    opt_cpu = cls(param_groups(params_cpu), backend=backend, state_dtype=state_dtype)
    assert opt_cpu.backend == backend
    gen = torch.Generator().manual_seed(seed + 1)
    coupled = {
        i: groups[assignment[i]].get("weight_decay", 0) != 0 and cls is MuAdam for i in range(len(specs))
    }
    scale = 2.0 ** (seed % 11) if amp != "none" else None
    for step in range(nsteps):
        skip = amp == "scale+skip" and step == 1
        for i, (pr, pc) in enumerate(zip(params_ref, params_cpu)):
            g = torch.randn(pr.shape, generator=gen)
            if coupled[i]:
                # same sign as wd*p after `maximize`: g + wd*p never cancels (module docstring)
                maximize = groups[assignment[i]]["maximize"]
                g = g.abs() * torch.where(pr.detach().float().cpu() >= 0, 1.0, -1.0) * (-1.0 if maximize else 1.0)
            if scale is not None:
                g = g * scale
            if skip and g.numel():
                g.view(-1)[0] = float("inf")
            pr.grad = g.to(pr.dtype).to(device)
            pc.grad = pr.grad.clone()
        for opt in (opt_ref, opt_cpu):
            if amp != "none":
                opt.grad_scale = torch.tensor([scale], dtype=torch.float32, device=device)
                opt.found_inf = torch.tensor([1.0 if skip else 0.0], dtype=torch.float32, device=device)
        before = snapshot(opt_ref, params_ref)
        opt_ref.step()
        opt_cpu.step()
        if skip:  # nothing may change, anywhere
            for i, (pr, pc) in enumerate(zip(params_ref, params_cpu)):
                assert torch.equal(pc.detach(), before[i]["param"]), f"found_inf step changed param {i}"
        compare_and_resync(opt_ref, opt_cpu, params_ref, params_cpu, before, step)


SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@SETTINGS
@given(data=st.data())
def test_adam_matches_eager(cpu_ext, data):
    cls = data.draw(st.sampled_from([MuAdam, MuAdamW]), label="cls")
    mode = data.draw(st.sampled_from(DTYPE_MODES), label="dtypes")
    specs = data.draw(tensor_specs(mode), label="tensors")
    groups = data.draw(st.lists(adam_group, min_size=1, max_size=3), label="groups")
    if cls is MuAdamW:
        groups = [dict(g, weight_decay=g["weight_decay"] or 1e-2) for g in groups]
    assignment = data.draw(st.lists(st.integers(0, len(groups) - 1), min_size=len(specs), max_size=len(specs)), label="groups of tensors")
    amp = data.draw(amp_mode, label="amp")
    misalign = data.draw(st.booleans(), label="misaligned")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    state_dtype = torch.float32 if mode == "bf16+fp32state" else None
    run_against_eager(cls, specs, groups, assignment, state_dtype, amp, seed, misalign)


@SETTINGS
@given(data=st.data())
def test_sgd_matches_eager(cpu_ext, data):
    mode = data.draw(st.sampled_from(DTYPE_MODES), label="dtypes")
    specs = data.draw(tensor_specs(mode), label="tensors")
    groups = data.draw(st.lists(sgd_group(), min_size=1, max_size=3), label="groups")
    assignment = data.draw(st.lists(st.integers(0, len(groups) - 1), min_size=len(specs), max_size=len(specs)), label="groups of tensors")
    amp = data.draw(amp_mode, label="amp")
    misalign = data.draw(st.booleans(), label="misaligned")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    state_dtype = torch.float32 if mode == "bf16+fp32state" else None
    run_against_eager(MuSGD, specs, groups, assignment, state_dtype, amp, seed, misalign, nsteps=4)


# ---------------------------------------------------------------------------
# the rest of the contract
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_storage_conversions_match_torch_bit_for_bit(cpu_ext, dtype):
    code = {torch.bfloat16: 1, torch.float16: 2}[dtype]
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    wide = torch.empty(65536, dtype=torch.float32)
    cpu_ext.cast_to_float(code, every.data_ptr(), wide.data_ptr(), 65536)
    ref = every.float()
    assert bool(((wide.view(torch.int32) == ref.view(torch.int32)) | (wide.isnan() & ref.isnan())).all())
    # random fp32 bit patterns, every exact tie between two storage values, range edges
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    fin = ref[torch.isfinite(ref)]
    nxt = torch.nextafter(fin.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() if dtype == torch.float16 else None
    ties = [(fin.view(torch.int32) + 0x8000).view(torch.float32)] if dtype == torch.bfloat16 else [(fin + nxt) / 2]
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30, 3.4e38, float("inf"), float("nan"), -0.0])
    x = torch.cat([x, *ties, edges, -edges])
    out = torch.empty(x.numel(), dtype=dtype)
    cpu_ext.cast_from_float(code, x.data_ptr(), out.data_ptr(), x.numel())
    ref = x.to(dtype)
    same = (out.view(torch.int16) == ref.view(torch.int16)) | (out.isnan() & ref.isnan())
    assert bool(same.all()), x[~same][:8]


def _mlp(width):
    try:
        from fastmup import MuReadout
    except ImportError:  # pragma: no cover
        from mup import MuReadout
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), MuReadout(width, 3))


@pytest.mark.parametrize(
    "which, kwargs",
    [
        ("MuAdam", dict(lr=1e-2)),
        ("MuAdamW", dict(lr=1e-2, weight_decay=0.1)),
        ("MuSGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
        ("MuSGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ],
)
def test_matches_mup_package(cpu_ext, which, kwargs):
    """fastmup's cpu backend vs mup 1.0's optimizer (torch.optim under mup's
    param groups) on an MLP at width 48 (base 8): equal up to fp32 rounding."""
    mup = pytest.importorskip("mup")
    torch.manual_seed(0)
    model = _mlp(48)
    set_base_shapes(model, _mlp(8), delta=_mlp(12))
    ours = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ours.parameters()):
        q.infshape = p.infshape
    opt_mup = getattr(mup, which)(model.parameters(), **kwargs)
    opt_ours = {"MuAdam": MuAdam, "MuAdamW": MuAdamW, "MuSGD": MuSGD}[which](ours.parameters(), backend="cpu", **kwargs)
    assert opt_ours.backend == "cpu"
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for step in range(4):
        model.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        for p, q in zip(model.parameters(), ours.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in model.parameters()]
        opt_mup.step()
        opt_ours.step()
        for i, (p, q, b) in enumerate(zip(model.parameters(), ours.parameters(), before)):
            # no resync: the tolerance grows with the number of steps taken
            scale = float(b.abs().max() + (p.detach() - b).abs().max())
            torch.testing.assert_close(q.detach(), p.detach(), rtol=4 * EPS32 * (step + 1), atol=16 * EPS32 * scale * (step + 1))


def test_auto_picks_cpu_once_built(cpu_ext):
    params = make_params([(10, "vector", torch.float32), (12, "matrix", torch.float32)], seed=0)
    assert ext.available("cpu")
    assert MuAdam(params, backend="auto").backend == "cpu"
    assert MuSGD(params, backend="auto", momentum=0.9).backend == "cpu"


def test_found_inf_skips_everything(cpu_ext):
    params = make_params([(100, "matrix", torch.float32), (7, "vector", torch.bfloat16)], seed=1)
    opt = MuAdam(params, lr=0.1, backend="cpu")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.grad_scale = torch.tensor([4.0])
    opt.found_inf = torch.tensor([1.0])
    opt.step()
    for p, b, s in zip(params, before, states):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


def test_float64_params_are_refused_clearly(cpu_ext):
    params = make_params([(10, "vector", torch.float64)], seed=0)
    opt = MuAdam(params, backend="cpu")
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        opt.step()


def _run_fixed(specs, cls, seed, **kwargs):
    params = make_params(specs, seed=seed)
    opt = cls(params, backend="cpu", **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in state_tensors(opt, p).values()]


def test_instruction_set_variants_agree_bitwise(cpu_ext):
    """The AVX2 loops (when the CPU has them) and the baseline loops run the
    same IEEE operations in the same order: bitwise equal results."""
    block = int(cpu_ext.BLOCK)
    specs = [(block + 3, "matrix", torch.float32), (1025, "vector", torch.bfloat16), (77, "vector", torch.float16)]
    results = []
    try:
        for isa in ("auto", "generic"):
            cpu_ext.set_isa(isa)
            for dtype_specs in (specs[:1], specs[1:2], specs[2:]):
                results.append(_run_fixed(dtype_specs, MuAdam, 5, lr=1e-2, amsgrad=True, weight_decay=0.1))
                results.append(_run_fixed(dtype_specs, MuSGD, 6, lr=1e-2, momentum=0.9, nesterov=True))
    finally:
        cpu_ext.set_isa("auto")
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_many_threads_and_one_thread_agree(cpu_ext):
    """The threaded split over the block map changes nothing: bitwise equal results."""
    block = int(cpu_ext.BLOCK)
    specs = [(3 * block + 11, "matrix", torch.float32), (block - 1, "vector", torch.bfloat16), (5, "finite", torch.float32)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            params = make_params(specs, seed=3)
            opt = MuAdamW(params, lr=1e-2, amsgrad=True, backend="cpu")
            gen = torch.Generator().manual_seed(4)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _run_steps(cls, general_path: bool, **kwargs):
    """Six steps with new gradients each, a loss scale, a skipped step, an
    lr change and a thread-count change in between; ``general_path``: every
    launch through the general path (the per-batch cache dropped first)."""
    specs = [(300, "matrix", torch.float32), (7, "vector", torch.float32), (0, "finite", torch.float32)]
    params = make_params(specs, seed=8)
    opt = cls(params, backend="cpu", **kwargs)
    gen = torch.Generator().manual_seed(9)
    threads = torch.get_num_threads()
    short = []
    try:
        for k in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.grad_scale = torch.tensor([2.0 if k in (1, 2) else 1.0])
            opt.found_inf = torch.tensor([1.0 if k == 2 else 0.0])
            if k == 3:
                opt.param_groups[0]["lr"] *= 0.5
            if k == 4:
                torch.set_num_threads(1 if threads > 1 else 2)
            if general_path:
                ext._host_steps.clear()
            opt.step()
            short.append(any(b in ext._host_steps for b in opt._batches))
    finally:
        torch.set_num_threads(threads)
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in state_tensors(opt, p).values()], short


@pytest.mark.parametrize("cls, kwargs", [(MuSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)), (MuAdamW, dict(lr=0.01))])
def test_cached_step_launch_matches_the_general_path(cpu_ext, cls, kwargs):
    """After a batch's first launch its steps take a cached short path
    (fastmup.ext._HostStep); it gives bitwise the results of the general
    path, through loss scales, a skipped step, a new lr and a new thread
    count."""
    cached, short = _run_steps(cls, False, **kwargs)
    general, _ = _run_steps(cls, True, **kwargs)
    assert all(short)  # the cache is kept (and used from the second step on)
    for x, y in zip(cached, general):
        assert torch.equal(x, y)
