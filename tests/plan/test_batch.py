"""TensorBatch: the block map, pointer tables and row uploads."""
import numpy as np
import torch

from fastmup.plan.batch import Signature, TensorBatch


def make_batch(sizes):
    params = [torch.zeros(n) for n in sizes]
    sig = Signature(torch.device("cpu"), torch.float32, torch.float32, torch.float32)
    return TensorBatch(
        signature=sig,
        columns=("lr", "weight_decay"),
        index=list(range(len(sizes))),
        params=params,
        grads=[torch.zeros(n) for n in sizes],
        state={"buf": [torch.zeros(n) if n % 2 else None for n in sizes]},
        rows=np.zeros((len(sizes), 2)),
        steps=torch.zeros(len(sizes)),
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
