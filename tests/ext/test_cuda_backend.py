"""The ``cuda`` backend (csrc/*.cu) on a GPU: against the eager reference on
the same device, bit for bit against the ``cpu`` backend (the same functors,
rounding identically: no contraction on either side, IEEE sqrt and
division), in a captured CUDA graph, under AMP loss scaling, and under the
parameter storage modes it has kernels for (fp32 masters, bf16 remainders).

Every test here needs a CUDA device and nvcc (``make gpu-check`` runs them);
without them the module is skipped.  Tolerances against eager are those of
tests/ext/test_cpu_backend.py: torch's CUDA kernels fuse multiply-adds and
turn a division by a Python scalar into a multiply by its reciprocal, each
an ulp-level difference of the kind that module's bound allows for.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmup import ext  # noqa: E402
from fastmup.ext import build as ext_build  # noqa: E402
from fastmup.infshape import InfDim, InfShape  # noqa: E402
from fastmup.optim import ESGD, MuAdam, MuAdamW, MuSGD, precision  # noqa: E402
from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER  # noqa: E402

from tests.ext.test_cpu_backend import (  # noqa: E402
    DTYPE_MODES,
    SETTINGS,
    adam_group,
    amp_mode,
    make_params,
    run_against_eager,
    sgd_group,
    state_tensors,
    tensor_specs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        bool(ext_build.missing_requirements("cuda")),
        reason="the cuda backend cannot be built here: missing " + "; ".join(ext_build.missing_requirements("cuda")),
    ),
]


@pytest.fixture(scope="module")
def cuda_ext():
    return ext.load("cuda")


def cuda_block() -> int:
    return int(ext.load("cuda").BLOCK)


def test_module_builds_and_loads(cuda_ext):
    assert cuda_ext.BLOCK > 0 and cuda_ext.BLOCK % 16 == 0
    assert callable(cuda_ext.adam) and callable(cuda_ext.sgd) and callable(cuda_ext.esgd)
    assert ext.available("cuda")


@SETTINGS
@given(data=st.data())
def test_adam_matches_eager(cuda_ext, data):
    cls = data.draw(st.sampled_from([MuAdam, MuAdamW]), label="cls")
    mode = data.draw(st.sampled_from(DTYPE_MODES), label="dtypes")
    specs = data.draw(tensor_specs(mode, cuda_block()), label="tensors")
    groups = data.draw(st.lists(adam_group, min_size=1, max_size=3), label="groups")
    if cls is MuAdamW:
        groups = [dict(g, weight_decay=g["weight_decay"] or 1e-2) for g in groups]
    assignment = data.draw(st.lists(st.integers(0, len(groups) - 1), min_size=len(specs), max_size=len(specs)), label="groups of tensors")
    state_dtype = torch.float32 if mode == "bf16+fp32state" else None
    run_against_eager(cls, specs, groups, assignment, state_dtype, data.draw(amp_mode, label="amp"),
                      data.draw(st.integers(0, 2**16), label="seed"), data.draw(st.booleans(), label="misaligned"),
                      backend="cuda")


@SETTINGS
@given(data=st.data())
def test_sgd_matches_eager(cuda_ext, data):
    mode = data.draw(st.sampled_from(DTYPE_MODES), label="dtypes")
    specs = data.draw(tensor_specs(mode, cuda_block()), label="tensors")
    groups = data.draw(st.lists(sgd_group(), min_size=1, max_size=3), label="groups")
    assignment = data.draw(st.lists(st.integers(0, len(groups) - 1), min_size=len(specs), max_size=len(specs)), label="groups of tensors")
    state_dtype = torch.float32 if mode == "bf16+fp32state" else None
    run_against_eager(MuSGD, specs, groups, assignment, state_dtype, data.draw(amp_mode, label="amp"),
                      data.draw(st.integers(0, 2**16), label="seed"), data.draw(st.booleans(), label="misaligned"),
                      nsteps=4, backend="cuda")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(width) == b.view(width)) | (a.isnan() & b.isnan())).all())


BITWISE_CASES = [
    (MuAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (MuAdam, dict(lr=1e-2, betas=(0.3, 0.99), maximize=True)),
    (MuAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (MuSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (MuSGD, dict(lr=0.05, momentum=0.5, dampening=0.1, maximize=True)),
]


@pytest.mark.parametrize("amp", ["none", "power of two", "other"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                               (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "fp16", "bf16+fp32"])
@pytest.mark.parametrize("cls,kw", BITWISE_CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_bit_identical_to_the_cpu_backend(cuda_ext, cls, kw, dtype, state_dtype, amp):
    """The same functors, compiled without contraction on both sides: the
    GPU's results are the host's, to the bit.  (The per-tensor scalars use
    pow() in double, which libdevice and the C library may round a double
    ulp apart: a flip of an fp32 scalar is a ~1e-7 event per scalar.)"""
    block = cuda_block()
    specs = [(3 * block + 5, "matrix", dtype), (block, "vector", dtype), (17, "finite", dtype), (0, "finite", dtype)]
    results = {}
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        params = make_params(specs, seed=11, device=device)
        opt = cls(params, backend=backend, state_dtype=state_dtype, **kw)
        gen = torch.Generator().manual_seed(12)
        scale = {"none": None, "power of two": 1024.0, "other": 3.0}[amp]
        for _ in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * (scale or 1.0)).to(dtype).to(device)
            if scale is not None:
                opt.grad_scale = torch.tensor([scale], device=device)
                opt.found_inf = torch.tensor([0.0], device=device)
            opt.step()
        results[backend] = [p.detach() for p in params] + [v for p in params for v in state_tensors(opt, p).values()]
    for i, (a, b) in enumerate(zip(results["cpu"], results["cuda"])):
        assert _same_bits(a, b), f"tensor {i} ({a.dtype}, {tuple(a.shape)}): cuda differs from cpu"


@pytest.mark.parametrize("cls,kw", [(MuAdamW, dict(weight_decay=0.1)), (MuSGD, dict(momentum=0.9))])
def test_capturable_step_replays_in_a_cuda_graph(cuda_ext, cls, kw):
    """lr and step live on the device: a captured step replays with new lrs
    and matches the eager reference stepped alongside."""
    params = make_params([(4 * cuda_block() + 3, "matrix", torch.float32), (33, "vector", torch.float32)], seed=3, device="cuda")
    twins = make_params([(4 * cuda_block() + 3, "matrix", torch.float32), (33, "vector", torch.float32)], seed=3, device="cuda")
    lr = torch.tensor(1e-2, device="cuda")
    opt = cls(params, lr=lr, capturable=True, backend="cuda", **kw)
    ref = cls(twins, lr=1e-2, backend="eager", **kw)
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: builds the plan and state outside the capture
    torch.cuda.current_stream().wait_stream(side)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for new_lr in (1e-2, 5e-3):
        lr.fill_(new_lr)
        ref.param_groups[0]["lr"] = new_lr
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(list(params), list(twins), rtol=1e-5, atol=1e-6)


def test_amp_grad_scaler_skips_and_unscales_on_the_device(cuda_ext):
    """torch.amp.GradScaler drives the fused step: found_inf skips it without a
    host sync, and the power-of-two scale is undone exactly (the scaled run
    equals an unscaled one, bit for bit, when no gradient overflows)."""
    torch.manual_seed(0)
    results = []
    for scaled in (False, True):
        params = make_params([(2 * cuda_block() + 1, "matrix", torch.float32), (65, "vector", torch.float32)], seed=5, device="cuda")
        opt = MuAdamW(params, lr=1e-2, backend="cuda")
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=scaled)
        gen = torch.Generator(device="cuda").manual_seed(6)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            loss = sum((p * torch.randn(p.shape, device="cuda", generator=gen)).sum() for p in params)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in params])
        if scaled:  # an overflowing step is skipped: nothing moves
            before = [p.detach().clone() for p in params]
            opt.zero_grad(set_to_none=True)
            loss = sum(p.sum() for p in params) * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
    for a, b in zip(*results):
        assert _same_bits(a, b)


@pytest.mark.parametrize("variant", ["ema", "max"])
def test_esgd_trajectory_matches_eager(cuda_ext, variant):
    """Twelve ESGD-M steps of an MLP (HVP steps included) on the GPU: cuda backend vs eager."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=gen).cuda(), torch.randn(64, 3, generator=gen).cuda()

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(10, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3)).cuda()

    models = {}
    for backend in ("eager", "cuda"):
        model = net()
        opt = ESGD(model.parameters(), lr=0.05, weight_decay=0.01, variant=variant, backend=backend, d_warmup=4, update_d_every=3)
        assert opt.backend == backend
        for _ in range(12):
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward(create_graph=opt.should_create_graph())
            opt.step()
        models[backend] = model
    for (name, p), q in zip(models["eager"].named_parameters(), models["cuda"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5 * float(p.abs().max()), msg=name)


# ----------------------------------------------------------------------
# parameter storage modes (fp32 masters, bf16 remainders)
# ----------------------------------------------------------------------
STORAGE_CASES = [(torch.bfloat16, dict(master_weights="fp32")), (torch.bfloat16, dict(master_weights="remainder")),
                 (torch.float16, dict(master_weights="fp32")), (torch.bfloat16, dict(stochastic_rounding=True, rounding_seed=11)),
                 (torch.float16, dict(stochastic_rounding=True))]
STORAGE_IDS = ["bf16-master", "bf16-remainder", "fp16-master", "bf16-stochastic", "fp16-stochastic"]
STORAGE_OPTIMIZERS = [(MuAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)), (MuAdam, dict(lr=1e-2)),
                      (MuSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01))]


def _storage_params(dtype, device, seed=0):
    """Sizes across the vector width, the block-map entry and its tail, an
    empty one, and a view at an odd offset (the scalar loop)."""
    block = cuda_block()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(37,), (64, 33), (block,), (2 * block + 9,), (0,)]:
        p = nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(device))
        p.infshape = InfShape([InfDim(None, s) for s in shape])
        out.append(p)
    odd = nn.Parameter(torch.randn(1001, generator=gen).to(dtype).to(device)[1:])  # misaligned by one element
    odd.infshape = InfShape([InfDim(None, 1000)])
    return out + [odd]


def _storage_steps(opt, params, steps, seed=1, scale=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (scale or 1.0)).to(p.dtype).to(p.device)
        if scale is not None:
            opt.grad_scale = torch.tensor([scale], device=params[0].device)
            opt.found_inf = torch.tensor([0.0], device=params[0].device)
        opt.step()


@pytest.mark.parametrize("amp", ["none", "other"])
@pytest.mark.parametrize("dtype,mode", STORAGE_CASES, ids=STORAGE_IDS)
@pytest.mark.parametrize("cls,kw", STORAGE_OPTIMIZERS, ids=lambda c: getattr(c, "__name__", ""))
def test_storage_modes_bit_identical_to_the_cpu_backend(cuda_ext, cls, kw, dtype, mode, amp):
    """The storage kernels load and store the parameter as the host's tiles
    do (the same rounding.h code; stochastic rounding by pairs and packs,
    the host element by element): params and every state buffer, masters
    and remainders included, equal to the bit after three steps."""
    results = {}
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        params = _storage_params(dtype, device)
        opt = cls(params, backend=backend, **kw, **mode)
        _storage_steps(opt, params, 3, scale={"none": None, "other": 3.0}[amp])
        assert {bt.signature.backend for bt in opt._batches} == {backend}
        results[backend] = [p.detach() for p in params] + [v for p in params for v in state_tensors(opt, p).values()]
    for i, (a, b) in enumerate(zip(results["cpu"], results["cuda"])):
        assert _same_bits(a.cpu(), b.cpu()), f"tensor {i} ({a.dtype}, {tuple(a.shape)}): cuda differs from cpu"


@pytest.mark.parametrize("dtype,mode", STORAGE_CASES, ids=STORAGE_IDS)
def test_storage_modes_sgd_with_exact_updates_matches_eager_bit_for_bit(cuda_ext, dtype, mode):
    """lr a power of two, no momentum or decay: p - lr·g is one rounding in
    torch's kernels and in the csrc functor alike, so the stored params,
    masters and remainders equal eager's on the same GPU to the bit."""
    a, b = _storage_params(dtype, "cuda"), _storage_params(dtype, "cuda")
    fused = MuSGD(a, lr=2.0**-4, backend="cuda", **mode)
    eager = MuSGD(b, lr=2.0**-4, backend="eager", **mode)
    for seed in range(3):
        _storage_steps(fused, a, 1, seed=seed)
        _storage_steps(eager, b, 1, seed=seed)
        assert {bt.signature.backend for bt in fused._batches} == {"cuda"}
        for x, y in zip(a, b):
            assert torch.equal(x.detach().view(torch.int16), y.detach().view(torch.int16))
            for key, value in eager.state[y].items():
                assert _same_bits(fused.state[x][key], value), key


@pytest.mark.parametrize("cls,kw", STORAGE_OPTIMIZERS[1:], ids=lambda c: getattr(c, "__name__", ""))
def test_remainders_and_fp32_masters_give_the_same_trajectory_on_the_gpu(cuda_ext, cls, kw):
    a, b = _storage_params(torch.bfloat16, "cuda"), _storage_params(torch.bfloat16, "cuda")
    oa = cls(a, backend="cuda", master_weights="fp32", **kw)
    ob = cls(b, backend="cuda", master_weights="remainder", **kw)
    _storage_steps(oa, a, 4)
    _storage_steps(ob, b, 4)
    for x, y in zip(a, b):
        assert torch.equal(x.detach().view(torch.int16), y.detach().view(torch.int16))
        assert _same_bits(precision.decode_remainder(y.detach(), ob.state[y][REMAINDER_BUFFER]), oa.state[x][MASTER_BUFFER])
