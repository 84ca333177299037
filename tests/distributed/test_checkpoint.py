"""Checkpoints resume bit-identically on the same world size.

* single process: ``torch.save`` of the model and optimizer state dicts plus
  ``fastmup.base_shapes_state(model)``, restored into a freshly built model
  (different init) with ``weights_only=True``;
* FSDP2 on 2 gloo processes: ``torch.distributed.checkpoint`` with
  ``get_state_dict`` / ``set_state_dict`` (sharded model and optimizer
  state), the base shapes travelling inside the checkpoint as a JSON string.

In both cases "train 2 steps, save, train 2 more" must equal "restore, train
the same 2 more" exactly (torch.equal), parameters and optimizer state.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

import fastmup
from fastmup.distributed import reattach_infshapes, shard_with_mup
from fastmup.shape import BaseShapesError
from tests.distributed.test_ddp import OPTIMIZERS, backends, batches, make_opt, shard_of, spawn
from tests.optim.conftest import MODELS, build, loss_of

ALL_BACKENDS = backends()


def run(kind, model, opt, steps, rank=None):
    for batch in steps:
        opt.zero_grad()
        loss_of(kind, model, batch if rank is None else shard_of(batch, rank)).backward()
        opt.step()


def opt_tensors(opt) -> list[torch.Tensor]:
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in sorted(opt.state[p].items()):
                if isinstance(v, torch.Tensor):
                    out.append(v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone())
    return out


def assert_equal(xs, ys, what):
    assert len(xs) == len(ys), what
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert torch.equal(x, y), f"{what}[{i}] differs by {(x.float() - y.float()).abs().max().item()}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_torch_save_resume(tmp_path, kind, opt_name, backend):
    data = batches(kind, 4)
    model = build(kind, 32)
    opt = make_opt(opt_name, model.parameters(), backend)
    run(kind, model, opt, data[:2])
    torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict(), "base_shapes": fastmup.base_shapes_state(model)},
        tmp_path / "ckpt.pt",
    )
    run(kind, model, opt, data[2:])

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(123)
    fresh = MODELS[kind][0](32)  # no set_base_shapes: the checkpoint carries them
    with pytest.raises(ValueError, match="no μP base shapes"):
        make_opt(opt_name, fresh.parameters(), backend)
    reattach_infshapes(fresh, ckpt["base_shapes"])
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(opt_name, fresh.parameters(), backend)
    fresh_opt.load_state_dict(ckpt["optim"])
    run(kind, fresh, fresh_opt, data[2:])
    assert_equal([p.detach() for p in fresh.parameters()], [p.detach() for p in model.parameters()], "params")
    assert_equal(opt_tensors(fresh_opt), opt_tensors(opt), "optimizer state")


def test_missing_base_shapes_is_a_clear_error():
    fresh = MODELS["mlp"][0](32)
    with pytest.raises(BaseShapesError, match="base_shapes_state"):
        reattach_infshapes(fresh)
    with pytest.raises(RuntimeError, match="no width multiplier"):
        fresh(torch.randn(2, 12))


def _dcp_worker(rank: int, root: str, names: list) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    for kind in ("mlp", "transformer"):
        data = batches(kind, 4)
        for backend, opt_name in [(b, o) for b in names for o in OPTIMIZERS]:
            path = f"{root}/{kind}-{backend}-{opt_name}"
            model = build(kind, 32)
            shard_with_mup(model, mesh=mesh, submodules=[model.hidden] if kind == "mlp" else [model.fc])
            opt = make_opt(opt_name, model.parameters(), backend)
            run(kind, model, opt, data[:2], rank)
            msd, osd = get_state_dict(model, opt)
            mup = json.dumps(fastmup.base_shapes_state(model))
            dcp.save({"model": msd, "optim": osd, "mup": mup}, checkpoint_id=path)
            run(kind, model, opt, data[2:], rank)
            want_params = [p.full_tensor() for p in model.parameters()]
            want_state = opt_tensors(opt)

            # restore: a fresh, differently initialised model without base shapes
            torch.manual_seed(1000 + rank)
            fresh = MODELS[kind][0](32)
            header = {"mup": ""}
            dcp.load(header, checkpoint_id=path)  # the μP record first: the optimizer needs it
            shard_with_mup(
                fresh, mesh=mesh, submodules=[fresh.hidden] if kind == "mlp" else [fresh.fc], base_shapes=json.loads(header["mup"])
            )
            fresh_opt = make_opt(opt_name, fresh.parameters(), backend)
            msd, osd = get_state_dict(fresh, fresh_opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            run(kind, fresh, fresh_opt, data[2:], rank)
            assert_equal([p.full_tensor() for p in fresh.parameters()], want_params, f"{kind}/{backend}/{opt_name} params")
            assert_equal(opt_tensors(fresh_opt), want_state, f"{kind}/{backend}/{opt_name} optimizer state")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")
def test_fsdp2_dcp_resume(tmp_path):
    spawn(_dcp_worker, str(tmp_path), ALL_BACKENDS)
