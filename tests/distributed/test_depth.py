"""Depth records under FSDP2: the sharded model's optimizer table is the unsharded one's.

``fully_shard`` swaps every parameter for a new DTensor parameter; the depth
record lives on the infshape, which the module records of
``set_base_shapes`` give back to the new parameters.  Two CPU processes, gloo.
"""
from __future__ import annotations

import copy

import pytest
import torch.distributed as dist

from tests.distributed.test_ddp import spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")


def _worker(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastmup
    from fastmup.depth import DEPTH_KEY
    from tests.test_depth import net

    mesh = init_device_mesh("cpu", (2,))
    model = net(16, 6, base_depth=2, alpha=0.5)
    ref = copy.deepcopy(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    sharded = fastmup.MuAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, eps_scaling=True).tensor_hyperparameters()
    plain = fastmup.MuAdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, eps_scaling=True).tensor_hyperparameters()
    assert [sharded[p] for p in model.parameters()] == [plain[p] for p in ref.parameters()]
    assert fastmup.base_shapes_state(model)[DEPTH_KEY] == fastmup.base_shapes_state(ref)[DEPTH_KEY]
    assert all(b.scale.multiplier == 3.0**-0.5 for b in model.blocks)


def test_fsdp2_keeps_the_depth_factors():
    spawn(_worker)
