"""DDP: a μP model wrapped in DistributedDataParallel after set_base_shapes
trains with the fastmup optimizers like single-process training on the
combined batch.

Two CPU processes on gloo.  Every rank also trains an unwrapped copy on the
combined batch and compares.  The comparison is not bit-exact: DDP averages
the two per-rank gradients with a gloo all-reduce (sum of two partial means,
then / 2), a single process takes the mean over the whole batch in one
reduction, so gradients differ by fp32 rounding (a few ulps) and Adam/SGD
carry that into the parameters.  rtol=1e-5 / atol=1e-6 after a few steps is
~100x that rounding and far below any real difference (a wrong μP multiplier
changes parameters by O(lr)).  Models with BatchNorm are left out: their
batch statistics are per rank under DDP (use SyncBatchNorm), so they are not
equal to the combined batch by construction.
"""
from __future__ import annotations

import os
import sys
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A worker that succeeded leaves at once: the interpreter's shutdown can
    # meet a gloo thread still winding down and abort ("terminate called
    # without an active exception"), failing a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on 2 gloo processes; a failure on any rank
    fails the test with that rank's traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, free_port(), args), nprocs=WORLD, join=True)


def backends() -> list[str]:
    names = ["eager"]
    try:
        from fastmup import ext

        if ext.available("cpu"):
            names.append("cpu")
    except ImportError:
        pass
    return names


# ----------------------------------------------------------------------
# data: batches whose size splits evenly over the ranks
# ----------------------------------------------------------------------
def batches(kind: str, steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(steps)]
    if kind == "transformer":
        return [(torch.randint(0, 17, (4, 7), generator=g), torch.randint(0, 17, (4, 7), generator=g)) for _ in range(steps)]
    raise ValueError(kind)


def shard_of(batch, rank: int):
    x, y = batch
    n = x.shape[0] // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def make_opt(name: str, params, backend: str):
    import fastmup

    if name == "adam":
        return fastmup.MuAdam(params, lr=1e-2, weight_decay=1e-3, backend=backend)
    if name == "adamw":
        return fastmup.MuAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    if name == "sgd":
        return fastmup.MuSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    raise ValueError(name)


OPTIMIZERS = ("adam", "adamw", "sgd")


def _ddp_worker(rank: int, kind: str, names: list) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.optim.conftest import build, clone, loss_of

    for backend, opt_name in [(b, o) for b in names for o in OPTIMIZERS]:
        model = build(kind, 32)
        ref = clone(model)  # same init on every rank (seeded build)
        ddp = DDP(model)
        opt = make_opt(opt_name, ddp.parameters(), backend)
        ref_opt = make_opt(opt_name, ref.parameters(), backend)
        assert opt.backend == backend
        for batch in batches(kind, 4):
            opt.zero_grad()
            loss_of(kind, ddp, shard_of(batch, rank)).backward()
            opt.step()
            ref_opt.zero_grad()
            loss_of(kind, ref, batch).backward()
            ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{opt_name}/{backend} {name}: {m}")
        # the ranks stay in sync
        for p in model.parameters():
            other = p.detach().clone()
            dist.broadcast(other, src=0)
            assert torch.equal(other, p.detach())


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_ddp_matches_single_process(kind):
    # one spawn per test (process start-up dominates); every backend and
    # optimizer runs inside it
    spawn(_ddp_worker, kind, backends())
