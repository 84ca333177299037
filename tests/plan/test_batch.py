"""TensorBatch: the block map, pointer tables and row uploads."""
import numpy as np
import pytest
import torch

from fastmup.plan.batch import Signature, TensorBatch
from fastmup.plan.spec import AlgorithmSpec, OptionalBuffer

SPEC = AlgorithmSpec(
    name="test", columns=("lr", "weight_decay", "gate"), state=(), optional=OptionalBuffer("buf", gate="gate"),
    kernel="none", functor="none",
)


def make_batch(sizes):
    params = [torch.zeros(n) for n in sizes]
    sig = Signature(torch.device("cpu"), torch.float32, torch.float32, torch.float32)
    rows = np.zeros((len(sizes), 3))
    rows[:, 2] = [n % 2 for n in sizes]  # the gate: odd sizes have the buffer
    return TensorBatch(
        signature=sig,
        spec=SPEC,
        columns=SPEC.columns,
        index=list(range(len(sizes))),
        params=params,
        grads=[torch.zeros(n) for n in sizes],
        state={"buf": [torch.zeros(n) if n % 2 else None for n in sizes]},
        rows=rows,
        steps=torch.zeros(len(sizes)),
        scalars={"step": torch.zeros(len(sizes))},
    )


def test_block_map_covers_every_element_once():
    sizes = [0, 1, 7, 8, 9, 17, 0, 3]
    batch = make_batch(sizes)
    tensor_of_block, start, nblocks = batch.block_map(8)
    assert nblocks == sum((n + 7) // 8 for n in sizes)
    seen = {i: [] for i in range(len(sizes))}
    for t, s in zip(tensor_of_block.tolist(), start.tolist()):
        seen[t].extend(range(s, min(s + 8, sizes[t])))
    assert all(seen[i] == list(range(n)) for i, n in enumerate(sizes))
    assert start.dtype == torch.int64
    assert batch.block_map(8)[0] is tensor_of_block  # cached


def test_pointers_and_missing_buffers():
    batch = make_batch([3, 4])
    ptrs = batch.pointers(["param", "grad", "buf"])
    assert ptrs.tolist()[0] == [p.data_ptr() for p in batch.params]
    assert ptrs.tolist()[2] == [batch.state["buf"][0].data_ptr(), 0]


def test_rows_upload_only_when_changed():
    batch = make_batch([3, 4])
    first = batch.device_rows()
    batch.rows[1, 0] = 0.5
    again = batch.device_rows()
    assert again is first and again[1, 0].item() == 0.5


def test_launch_plan_checks_the_tensors_once_and_is_cached():
    batch = make_batch([0, 3, 4, 5])
    plan = batch.launch_plan(8)
    assert batch.launch_plan(8) is plan
    assert plan.roles == ("param", "grad", "buf") and plan.has_optional and plan.tickets is None
    assert plan.pointers.tolist()[plan.row("buf")] == [0, batch.state["buf"][1].data_ptr(), 0, batch.state["buf"][3].data_ptr()]
    bad = make_batch([3, 5])
    bad.grads[1] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grad of tensor #1 .* contiguous torch.float32 tensor of 5 elements"):
        bad.launch_plan(8)
    missing = make_batch([3, 4])
    missing.rows[1, 2] = 1.0  # the gate asks for a buffer tensor #1 lacks
    with pytest.raises(ValueError, match=r"tensor #1 of the batch has no 'buf' buffer"):
        missing.launch_plan(8)


def test_algorithms_that_advance_their_scalars_get_a_block_per_empty_tensor():
    from fastmup.plan.launch import block_map

    tensor_of_block, start = block_map(np.array([0, 9, 0]), 8, at_least_one=True)
    assert tensor_of_block.tolist() == [0, 1, 1, 2] and start.tolist() == [0, 0, 8, 0]
