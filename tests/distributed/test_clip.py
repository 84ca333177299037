"""Deferred gradient clipping under DDP and FSDP2 (2 gloo processes).

DDP: the gradients are all-reduced in backward, so every rank clips the
same gradients; the run follows single-process training on the combined
batch with torch's ``clip_grad_norm_`` to the rounding of DDP's reduction
(rtol 1e-5 / atol 1e-6, as in test_ddp.py), and the ranks stay bit-identical.

FSDP2: the gradients are DTensor shards.  Each rank reduces its shards to a
float64 partial sum, all-reduced over the mesh (max for inf), as torch's
``clip_grad_norm_`` reduces DTensor norms; the norm equals torch's on the
same sharded model, and training follows the unsharded reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_ddp import backends, batches, make_opt, shard_of, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")

MAX_NORM = 0.05  # below the gradients' norm: every step clips


def _ddp_worker(rank: int, names: list) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.optim.conftest import build, clone, loss_of

    for backend in names:
        for norm_type in (2.0, math.inf):
            model = build("mlp", 32)
            ref = clone(model)
            ddp = DDP(model)
            opt = make_opt("adamw", ddp.parameters(), backend)
            ref_opt = make_opt("adamw", ref.parameters(), backend)
            for batch in batches("mlp", 3):
                opt.zero_grad()
                loss_of("mlp", ddp, shard_of(batch, rank)).backward()
                n = opt.clip_grad_norm_(MAX_NORM, norm_type)
                opt.step()
                ref_opt.zero_grad()
                loss_of("mlp", ref, batch).backward()
                expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM, norm_type)
                ref_opt.step()
                torch.testing.assert_close(n, expected, rtol=1e-5, atol=0)
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            for p in model.parameters():
                other = p.detach().clone()
                dist.broadcast(other, src=0)
                assert torch.equal(other, p.detach())


def _fsdp_worker(rank: int, names: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from fastmup.distributed import shard_with_mup
    from tests.distributed.test_fsdp2 import units
    from tests.optim.conftest import build, clone, loss_of

    mesh = init_device_mesh("cpu", (2,))
    for backend in names:
        for norm_type in (2.0, 1.0, math.inf):
            model = build("mlp", 32)
            ref = clone(model)
            torch_model = clone(model)
            shard_with_mup(model, mesh=mesh, submodules=units(model))
            shard_with_mup(torch_model, mesh=mesh, submodules=units(torch_model))
            model.reshard()
            torch_model.reshard()
            opt = make_opt("adamw", model.parameters(), backend)
            torch_opt = make_opt("adamw", torch_model.parameters(), backend)
            ref_opt = make_opt("adamw", ref.parameters(), backend)
            for batch in batches("mlp", 3):
                for m, o in ((model, opt), (torch_model, torch_opt)):
                    o.zero_grad()
                    loss_of("mlp", m, shard_of(batch, rank)).backward()
                n = opt.clip_grad_norm_(MAX_NORM, norm_type, per_tensor=True)
                # torch's clip on the same sharded gradients (DTensor norms)
                expected = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM, norm_type).full_tensor()
                torch.testing.assert_close(n, expected, rtol=1e-5, atol=0)
                # the per-tensor norms are of the whole gradients, not the shards
                full = [p.grad.full_tensor() for p in model.parameters()]
                want = torch.stack([torch.linalg.vector_norm(g.double(), norm_type).float() for g in full])
                torch.testing.assert_close(opt.per_tensor_grad_norms, want, rtol=1e-5, atol=0)
                opt.step()
                torch_opt.step()
                ref_opt.zero_grad()
                loss_of("mlp", ref, batch).backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM, norm_type)
                ref_opt.step()
            for p, q, r in zip(model.parameters(), torch_model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.full_tensor(), q.full_tensor(), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(p.full_tensor(), r, rtol=1e-5, atol=1e-6)


def test_ddp_deferred_clip():
    spawn(_ddp_worker, backends())


def test_fsdp2_deferred_clip():
    spawn(_fsdp_worker, backends())
