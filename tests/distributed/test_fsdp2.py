"""FSDP2 (``fully_shard``, DTensor parameters) with the fastmup optimizers.

Two CPU processes, gloo, ``init_device_mesh("cpu", (2,))``.  The optimizers
update the local shards (``DTensor.to_local()``) with their fused kernels;
the μP multipliers come from the global shapes: ``shard_with_mup`` reads the
base shapes recorded by ``set_base_shapes`` before sharding and re-attaches
them to the new DTensor parameters, whose ``shape`` is global.

Each rank also trains an unsharded copy on the combined batch.  As for DDP
(see test_ddp.py) the gradients differ by fp32 rounding only: FSDP2
reduce-scatters the per-rank gradients (sum of two partial means, / 2)
where one process reduces the whole batch at once, hence rtol=1e-5 /
atol=1e-6 instead of bit equality.  ``out.weight`` (5 x 32) is sharded
unevenly (3 + 2 rows), ``hidden`` and ``out`` are separate FSDP units, and
the transformer's readout is tied to its embedding (MuSharedReadout).

The plain sequence of torch's FSDP2 docs (``set_base_shapes``, then
``fully_shard`` per unit and on the root, then the optimizer, no fastmup
helper) is checked against mup 1.0 training the same model in one process.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastmup
from fastmup.distributed import reattach_infshapes, require_base_shapes, shard_with_mup
from fastmup.shape import BaseShapesError
from tests.distributed.test_ddp import OPTIMIZERS, backends, batches, make_opt, shard_of, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")


def units(model: nn.Module) -> list[nn.Module]:
    """Inner FSDP units: some layers sharded on their own, the rest by the root."""
    return [m for n, m in model.named_children() if n in ("hidden", "out", "fc", "fc2")]


def _fsdp_worker(rank: int, names: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tests.optim.conftest import build, clone, loss_of

    mesh = init_device_mesh("cpu", (2,))
    for kind in ("mlp", "transformer"):
        for backend, opt_name in [(b, o) for b in names for o in OPTIMIZERS]:
            model = build(kind, 32)
            ref = clone(model)
            x0, _ = batches(kind, 1, seed=7)[0]
            with torch.no_grad():
                before = model(x0)
            shard_with_mup(model, mesh=mesh, submodules=units(model))
            assert all(isinstance(p, DTensor) for p in model.parameters())
            # MuReadout works after sharding: same output, same width multiplier
            with torch.no_grad():
                torch.testing.assert_close(model(x0), before, rtol=1e-6, atol=1e-6)
            # the FSDP2 root keeps its parameters unsharded after a forward
            # until backward; reshard so parameters() are the DTensors again
            model.reshard()
            for m, r in zip(model.modules(), ref.modules()):
                if isinstance(m, fastmup.MuReadout):
                    assert m.width_mult() == r.width_mult() == 4.0
            opt = make_opt(opt_name, model.parameters(), backend)
            ref_opt = make_opt(opt_name, ref.parameters(), backend)
            assert opt.backend == backend
            # multipliers from the global shapes, not the shards
            for p, q in zip(model.parameters(), ref.parameters()):
                assert p.infshape.shape() == q.infshape.shape()
                assert opt._mults[p] == ref_opt._mults[q]
            for batch in batches(kind, 3):
                opt.zero_grad()
                loss_of(kind, model, shard_of(batch, rank)).backward()
                opt.step()
                ref_opt.zero_grad()
                loss_of(kind, ref, batch).backward()
                ref_opt.step()
            # the kernels ran on the local shards
            for b in opt._plan():
                assert b.grads and not any(isinstance(t, DTensor) for t in b.params + b.grads)
            opt._release_grads()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(
                    p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind}/{opt_name}/{backend} {name}: {m}"
                )


def test_fsdp2_matches_single_process():
    spawn(_fsdp_worker, backends())


# ----------------------------------------------------------------------
# the plain sequence: set_base_shapes -> fully_shard -> optimizer
# ----------------------------------------------------------------------
def _plain_batches(kind: str, steps: int = 3) -> list:
    g = torch.Generator().manual_seed(5)
    if kind == "mlp":
        return [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]
    return [(torch.randint(0, 37, (4, 8), generator=g), torch.randint(0, 37, (4, 8), generator=g)) for _ in range(steps)]


def _loss(model, batch):
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


PLAIN_UNITS = {"mlp": ("fc2", "readout"), "transformer": ("qkv", "ff1", "ff2")}


def _plain_worker(rank: int, names: list) -> None:
    """``fully_shard`` as torch's docs use it, no fastmup helper; the
    reference is mup 1.0 training the same model in one process."""
    import mup
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from tests.models import make_mlp, make_mup_mlp, make_mup_transformer, make_transformer, set_shapes

    mesh = init_device_mesh("cpu", (2,))
    builders = {"mlp": (make_mlp, make_mup_mlp), "transformer": (make_transformer, make_mup_transformer)}
    # Adam is left out for the transformer: its attention key bias has a zero
    # gradient up to rounding (softmax is shift invariant), which Adam
    # normalises into O(lr) updates that differ between any two reductions.
    cases = [("mlp", "adamw"), ("mlp", "sgd"), ("transformer", "sgd")]
    for (kind, opt_name), backend in [(c, b) for c in cases for b in names]:
        ours_fn, theirs_fn = builders[kind]
        torch.manual_seed(0)
        model = set_shapes(ours_fn, 32)
        torch.manual_seed(0)
        ref = set_shapes(theirs_fn, 32, lib=mup)
        for name in PLAIN_UNITS[kind]:
            fully_shard(getattr(model, name), mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) and not hasattr(p, "infshape") for p in model.parameters())
        if opt_name == "adamw":
            opt = fastmup.MuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
            ref_opt = mup.MuAdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        else:
            opt = fastmup.MuSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
            ref_opt = mup.MuSGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        # multipliers from the global shapes
        for p, q in zip(model.parameters(), ref.parameters()):
            assert (p.infshape.base_shape(), p.infshape.shape()) == (q.infshape.base_shape(), q.infshape.shape())
        for batch in _plain_batches(kind):
            opt.zero_grad()
            _loss(model, shard_of(batch, rank)).backward()
            opt.step()
            ref_opt.zero_grad()
            _loss(ref, batch).backward()
            ref_opt.step()
        # reduce-scatter rounding, as in the test above
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(
                p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind}/{opt_name}/{backend} {name}: {m}"
            )

    # an optimizer built on what the root holds after a forward (the unsharded
    # copies) is refused with the fix
    torch.manual_seed(0)
    model = set_shapes(make_mlp, 32)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():
        model(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"unsharded copy of Linear.weight.*model.reshard\(\)"):
        fastmup.MuAdamW(model.parameters(), lr=1e-3)
    model.reshard()
    fastmup.MuAdamW(model.parameters(), lr=1e-3)
    # sharded without base shapes
    plain = make_mlp(32)
    fully_shard(plain, mesh=mesh)
    with pytest.raises(ValueError, match="DTensor parameter .FSDP2.*before fully_shard"):
        fastmup.MuAdamW(plain.parameters(), lr=1e-3)


def test_plain_fully_shard_after_set_base_shapes_matches_mup_single_process():
    spawn(_plain_worker, backends())


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


def test_missing_base_shapes_error():
    with pytest.raises(BaseShapesError, match="before fully_shard"):
        shard_with_mup(Plain())
    with pytest.raises(BaseShapesError, match="base_shapes_state"):
        reattach_infshapes(Plain())


def test_reattach_from_explicit_base_shapes():
    from tests.optim.conftest import build

    model = build("mlp", 32)
    saved = fastmup.base_shapes_state(model)
    fresh = type(model)(32)
    assert getattr(fresh.inp.weight, "infshape", None) is None
    reattach_infshapes(fresh, saved)
    assert require_base_shapes(fresh) == saved
    assert fresh.out.width_mult() == model.out.width_mult()


# ----------------------------------------------------------------------
# low-precision parameters on local shards
# ----------------------------------------------------------------------
def _storage_worker(rank: int, names: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from fastmup.optim.precision import decode_remainder
    from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER
    from tests.optim.conftest import build, loss_of

    mesh = init_device_mesh("cpu", (2,))
    for backend in names:
        runs = []
        for mode in ("fp32", "remainder"):
            model = build("mlp", 32).to(torch.bfloat16)
            shard_with_mup(model, mesh=mesh, submodules=units(model))
            model.reshard()
            opt = fastmup.MuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, master_weights=mode)
            for x, y in batches("mlp", 3):
                opt.zero_grad()
                loss_of("mlp", model, shard_of((x.to(torch.bfloat16), y), rank)).float().backward()
                opt.step()
            assert {b.signature.storage for b in opt._batches} == {"master" if mode == "fp32" else "remainder"}
            opt._release_grads()
            runs.append((model, opt))
        (ma, oa), (mb, ob) = runs
        for p, q in zip(ma.parameters(), mb.parameters()):
            master, rem = oa.state[p][MASTER_BUFFER], ob.state[q][REMAINDER_BUFFER]
            assert isinstance(master, DTensor) and isinstance(rem, DTensor)  # sharded like the parameter
            assert master.to_local().shape == p.to_local().shape
            assert torch.equal(p.to_local(), q.to_local())  # bit-identical trajectories on every rank
            assert torch.equal(decode_remainder(q.to_local().detach(), rem.to_local()), master.to_local())


def test_fsdp2_master_weights_and_remainders_on_local_shards():
    spawn(_storage_worker, backends())
