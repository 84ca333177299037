"""fastmup.plan.norm: the tables a gradient-norm launch reads."""
from __future__ import annotations

import numpy as np
import torch

from fastmup.plan import norm as norm_plans
from fastmup.plan.launch import block_map


def test_from_grads_entries_and_buffers():
    grads = [torch.zeros(5), torch.zeros(0), torch.zeros(9), torch.zeros(20)]
    plan = norm_plans.from_grads(grads, 8)
    # entries: 1, 0, 2, 3 -> tensor i owns [first[i], first[i+1])
    assert plan.first_entry_host.tolist() == [0, 1, 1, 3, 6]
    assert plan.first_entry.tolist() == [0, 1, 1, 3, 6]
    assert plan.nblocks == 6 and plan.n_counted == 3 and plan.n_tensors == 4
    assert plan.grad_ptrs.tolist()[1] == 0  # an empty tensor has no address to read
    assert plan.partials.shape == (6,) and plan.sums.dtype == torch.float64
    assert not plan.tickets.any() and not plan.counter.any()
    assert plan.norms_index.tolist() == [0, 1, 2, 3]


def test_from_grads_empty_and_alignment():
    plan = norm_plans.from_grads([torch.zeros(0)], 8)
    assert plan.nblocks == 0 and plan.n_counted == 0 and plan.partials.numel() == 1
    base = torch.zeros(9)
    assert not norm_plans.from_grads([base[1:]], 8).aligned


class _Plan:
    """The parts of a LaunchPlan that from_launch_plan reads."""

    def __init__(self, counts, block, tickets):
        tob, start = block_map(counts, block, at_least_one=tickets)
        self.pointers = torch.arange(2 * len(counts), dtype=torch.int64).reshape(2, -1)
        self.numels = torch.tensor(counts)
        self.tensor_of_block, self.start_of_block = torch.from_numpy(tob), torch.from_numpy(start)
        self.block, self.n_tensors, self.grad_dtype, self.aligned = block, len(counts), torch.float32, True
        self.tickets = torch.zeros(len(counts)) if tickets else None

    def row(self, role):
        return ("param", "grad").index(role)


def test_from_launch_plan_views_the_grad_row_and_follows_tickets():
    counts = np.array([3, 0, 17])
    for tickets, first in ((False, [0, 1, 1, 4]), (True, [0, 1, 2, 5])):
        lp = _Plan(counts, 8, tickets)
        plan = norm_plans.from_launch_plan(lp, counts, torch.device("cpu"), norms_index=[4, 7, 9])
        assert plan.first_entry_host.tolist() == first  # an algorithm with tickets gives empty tensors an entry
        assert plan.grad_ptrs.data_ptr() == lp.pointers[1].data_ptr()  # a view: rebinding grads updates it
        assert plan.norms_index.tolist() == [4, 7, 9]
        assert plan.tensor_of_block is lp.tensor_of_block
