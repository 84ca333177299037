"""The triton backend on real μP models: parity with mup 1.0 (MLP, CNN, a
small transformer with tied embeddings), and a captured CUDA graph on a GPU."""
import pytest
import torch

from fastmup.optim import MuAdam, MuAdamW, MuSGD

from tests.optim.conftest import MODELS, build, clone, train

from .conftest import DEVICE, INTERPRETED

mup = pytest.importorskip("mup")

# Four steps of fp32 training; the kernel and torch's CPU ops differ by an
# ulp now and then (IEEE vs MKL sqrt, see conftest), and later gradients see
# those ulps through the model.  1e-5 relative (~80 fp32 ulps) leaves room for
# that drift while a wrong multiplier or hyperparameter moves weights by
# ~lr = 1e-2 relative, a thousand times more.
RTOL, ATOL = 1e-5, 1e-6

CASES = [
    (MuAdam, "MuAdam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (MuAdamW, "MuAdamW", dict(lr=1e-2, weight_decay=0.1)),
    (MuSGD, "MuSGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
]


@pytest.mark.skipif(not INTERPRETED, reason="models are built on the CPU; the GPU variant is below")
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("ours,theirs,kw", CASES, ids=[c[1] for c in CASES])
def test_parity_with_mup(kind, ours, theirs, kw):
    model = build(kind, 32)
    twin = clone(model)
    opt = ours(model.parameters(), **kw, backend="triton")
    assert opt.backend == "triton"
    train(kind, model, opt)
    train(kind, twin, getattr(mup, theirs)(twin.parameters(), **kw))
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=RTOL, atol=ATOL)
    assert (model.hidden.weight if kind == "mlp" else next(model.parameters())).grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls,kw", [(MuAdamW, dict(weight_decay=0.1)), (MuSGD, dict(momentum=0.9))])
def test_capturable_step_replays_in_a_cuda_graph(cls, kw):
    """lr and step live on the device: a captured step replays with new lrs."""
    model = build("mlp", 32).to(DEVICE)
    twin = clone(model)
    lr = torch.tensor(1e-2, device=DEVICE)
    opt = cls(model.parameters(), lr=lr, capturable=True, backend="triton", **kw)
    ref = cls(twin.parameters(), lr=1e-2, backend="eager", **kw)
    for p, q in zip(model.parameters(), twin.parameters()):
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
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-5, atol=1e-6)
