"""The compiled per-step checks of an optimizer's plan (csrc/plan/checks.cpp,
fastmup.ext.plan_checks): each check against what the Python checks compare."""
import numpy as np
import pytest
import torch

from fastmup import ext
from fastmup.ext import build as _build

pytestmark = pytest.mark.skipif(
    bool(_build.missing_requirements("plan")),
    reason="the plan module cannot be built here: missing " + "; ".join(_build.missing_requirements("plan")),
)


@pytest.fixture(scope="module")
def checks():
    return ext._build.import_module("plan", ext.build_extension("plan"))


def _addresses(tensors):
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


def test_same_addresses(checks):
    ts = [torch.zeros(5), torch.zeros(3, 4)[:, 1], torch.zeros(0)]
    expected = _addresses(ts)
    assert checks.same_addresses(ts, expected)
    ts[0].data = ts[0].data.clone()  # a new storage behind the same tensor
    assert not checks.same_addresses(ts, expected)
    assert checks.same_addresses(ts, _addresses(ts))
    assert not checks.same_addresses(ts, _addresses(ts)[:2])  # lengths differ
    assert not checks.same_addresses(ts[:2] + [3], _addresses(ts))  # not a tensor
    assert checks.same_addresses([], np.zeros(0, dtype=np.int64))


def test_same_entries(checks):
    a, b = torch.zeros(2), torch.zeros(2)
    d = {"exp_avg": a, "step": b}
    assert checks.same_entries([d, d], ["exp_avg", "step"], [a, b])
    assert not checks.same_entries([d], ["exp_avg"], [a.clone()])  # equal values, another tensor
    assert not checks.same_entries([d], ["missing"], [a])
    assert not checks.same_entries([d], ["exp_avg", "step"], [a])  # lengths differ
    assert not checks.same_entries([["exp_avg"]], ["exp_avg"], [a])  # not a dict


def _bind(checks, grads, kinds_of, fused, previous):
    dtypes, numels, devices = checks.kinds(kinds_of)
    n = len(grads)
    addresses, present = np.full(n, -7, dtype=np.int64), np.full(n, 9, dtype=np.uint8)
    count = checks.bind_grads(grads, dtypes, numels, devices, np.asarray(fused, dtype=np.uint8),
                              np.asarray(previous, dtype=np.int64), addresses, present)
    return count, addresses, present


def test_kinds(checks):
    dtypes, numels, devices = checks.kinds([torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.float64)])
    assert numels.tolist() == [6, 0]
    assert dtypes[0] != dtypes[1]
    assert devices[0] == devices[1]
    assert checks.kinds([torch.zeros(2).to_sparse()]) is None
    assert checks.kinds(["x"]) is None


def test_bind_grads_writes_addresses_and_presence(checks):
    ref = [torch.zeros(4, 4), torch.zeros(3), torch.zeros(0)]
    grads = [torch.ones(4, 4), None, torch.ones(0)]
    count, addresses, present = _bind(checks, grads, ref, [1, 1, 1], [0, 0, 0])
    assert count == 2
    assert addresses.tolist() == [grads[0].data_ptr(), 0, grads[2].data_ptr()]
    assert present.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "grad, fused, previous_aligned, accepted",
    [
        (lambda: torch.ones(4, 4), True, True, True),
        (lambda: torch.ones(4, 4, dtype=torch.float64), True, True, False),  # another dtype
        (lambda: torch.ones(17), True, True, False),  # another size
        (lambda: torch.ones(2, 8), True, True, True),  # another shape, same size: element-wise kernels take it
        (lambda: torch.ones(4, 4).t(), True, True, False),  # not contiguous, fused
        (lambda: torch.ones(4, 4).t(), False, True, True),  # not contiguous, eager
        (lambda: torch.ones(17)[1:].view(4, 4), True, True, False),  # misaligned where it was aligned
        (lambda: torch.ones(17)[1:].view(4, 4), True, False, True),  # misaligned as it was
        (lambda: torch.ones(17)[1:].view(4, 4), False, True, True),  # misaligned, eager
        (lambda: torch.ones(4, 4).to_sparse(), True, True, False),
        (lambda: "grad", True, True, False),
    ],
)
def test_bind_grads_accepts_what_the_python_checks_accept(checks, grad, fused, previous_aligned, accepted):
    g = grad()
    previous = 1 << 20 if previous_aligned else (1 << 20) + 4
    count, addresses, present = _bind(checks, [torch.ones(1), g], [torch.zeros(1), torch.zeros(4, 4)], [1, fused], [0, previous])
    assert count == (2 if accepted else -1)
    if accepted:
        assert addresses[1] == g.data_ptr() and present[1] == 1


def test_bind_grads_rejects_tables_of_another_length_or_dtype(checks):
    dtypes, numels, devices = checks.kinds([torch.zeros(2)])
    ok = dict(fused=np.ones(1, np.uint8), previous=np.zeros(1, np.int64))
    assert checks.bind_grads([torch.ones(2)], dtypes, numels, devices, ok["fused"], ok["previous"],
                             np.zeros(2, np.int64), np.zeros(1, np.uint8)) == -1
    with pytest.raises(TypeError):  # the outputs are written in place: never a converted copy
        checks.bind_grads([torch.ones(2)], dtypes, numels, devices, ok["fused"], ok["previous"],
                          np.zeros(1, np.int32), np.zeros(1, np.uint8))


def test_python_mode_is_honoured(monkeypatch):
    monkeypatch.setenv("FASTMUP_PLAN_CHECKS", "python")
    assert ext.plan_checks() is None
    monkeypatch.setenv("FASTMUP_PLAN_CHECKS", "compiled")
    assert ext.plan_checks() is not None
