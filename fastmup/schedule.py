"""Learning-rate schedules.

``KneeLR`` is the explore–exploit ("knee") schedule of Iyer et al. (2020),
*Wide-minima Density Hypothesis and the Explore-Exploit Learning Rate
Schedule*: an optional linear warmup, a long plateau at the peak learning rate
(explore: stay noisy long enough to settle in a wide minimum), then a linear
decay to zero (exploit).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["KneeLR", "knee_factor"]


def knee_factor(step: int, warmup_steps: int, explore_steps: int, total_steps: int) -> float:
    r"""Fraction of the peak learning rate used by optimizer step ``step``.

    Steps are 1-indexed: the first ``optimizer.step()`` is step 1.  With
    :math:`W` warmup, :math:`E` explore and :math:`T` total steps and
    :math:`D = T - W - E`,

    .. math::

        f(s) = \begin{cases}
            s / W              & 0 < s \le W \\
            1                  & W < s \le W + E \\
            \max(0, (T - s)/D) & s > W + E
        \end{cases}

    :math:`(T-s)/D` is the same line as :math:`1 - (s-W-E)/D` but rounds
    exactly at the grid points (e.g. 0.2 rather than 0.19999999999999996).
    When :math:`D = 0` the decay branch is only reached for :math:`s > T`, so
    the factor drops straight to 0 after the plateau without dividing by zero.
    Steps :math:`s \le 0` (never taken by a scheduler used normally) give the
    warmup line clipped at 0, or 1 when there is no warmup.
    """
    if step <= warmup_steps:
        if warmup_steps == 0:
            return 1.0
        return max(step, 0) / warmup_steps
    if step <= warmup_steps + explore_steps:
        return 1.0
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / (total_steps - warmup_steps - explore_steps)


def _check_steps(name: str, value: Any, *, minimum: int) -> int:
    # bool is an int subclass, but KneeLR(opt, True, ...) is certainly a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class KneeLR(LRScheduler):
    r"""Explore–exploit ("knee") schedule as a resumable ``LRScheduler``.

    The ``n``-th optimizer step (1-indexed) uses ``lr_g(n) = peak_g · f(n)``
    with ``f`` from :func:`knee_factor`.  Right after construction the
    optimizer's groups hold ``lr_g(1)``; after ``k`` calls of
    :meth:`step` they hold ``lr_g(k + 1)``.  Use it the usual way::

        optimizer.step()
        scheduler.step()

    Per-group peaks.  μP optimizers put the width multipliers into each
    group's ``lr``, so one value must never be written into every group.
    The schedule is therefore always relative to each group's ``initial_lr``
    (the lr the group had when the first scheduler was attached, recorded by
    torch):

    * ``peak_lr=None``: every group peaks at its own ``initial_lr``.
    * ``peak_lr=p``: group 0 peaks at ``p`` and group ``g`` at
      ``p · initial_lr_g / initial_lr_0``, i.e. all groups are rescaled by the
      same factor and keep their ratios.  For a μP optimizer built with
      ``lr=η``, group 0 is not necessarily at ``η`` (its μP multiplier may
      differ from 1); leave ``peak_lr=None`` and build the optimizer with the
      peak lr instead when that matters.

    Args:
        optimizer: wrapped optimizer.
        warmup_steps: ``W`` ≥ 0; 0 means no warmup.
        explore_steps: ``E`` ≥ 0, steps held at the peak after warmup.
            ``None`` gives half of the post-warmup budget, ``(T - W) // 2``,
            the paper's finding that a 50% explore phase needs no tuning.
        total_steps: ``T`` ≥ 1, the whole budget; ``W + E ≤ T``.  Steps past
            ``T`` use lr 0.
        peak_lr: see above; must be ≥ 0.
        last_epoch: as in every torch scheduler; the number of scheduler
            steps already taken, -1 for a fresh start.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        explore_steps: int | None = None,
        total_steps: int | None = None,
        peak_lr: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise TypeError("total_steps is required (the whole training budget, in optimizer steps)")
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps, minimum=0)
        self.total_steps = _check_steps("total_steps", total_steps, minimum=1)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})"
            )
        if explore_steps is None:
            explore_steps = (self.total_steps - self.warmup_steps) // 2
        self.explore_steps = _check_steps("explore_steps", explore_steps, minimum=0)
        if self.warmup_steps + self.explore_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps + explore_steps ({self.warmup_steps} + {self.explore_steps}) "
                f"exceeds total_steps ({self.total_steps})"
            )
        if peak_lr is not None:
            if isinstance(peak_lr, Tensor):
                peak_lr = peak_lr.item()
            peak_lr = float(peak_lr)
            if not math.isfinite(peak_lr) or peak_lr < 0:
                raise ValueError(f"peak_lr must be a finite number >= 0, got {peak_lr}")
        self.peak_lr = peak_lr
        # base_lrs is only known once the base class has recorded initial_lr,
        # and the base constructor already calls get_lr(); so the peaks are
        # derived lazily from base_lrs rather than stored here.
        super().__init__(optimizer, last_epoch)

    def _peaks(self) -> list[float]:
        bases = [float(b.item() if isinstance(b, Tensor) else b) for b in self.base_lrs]
        if self.peak_lr is None:
            return bases
        if bases[0] == 0.0:
            raise ValueError(
                "peak_lr cannot be applied: param group 0 has initial lr 0, so the "
                "ratios of the other groups to it are undefined"
            )
        scale = self.peak_lr / bases[0]
        return [scale * b for b in bases]

    def factor(self, step: int) -> float:
        """Fraction of the peak used by optimizer step ``step`` (1-indexed)."""
        return knee_factor(step, self.warmup_steps, self.explore_steps, self.total_steps)

    def _lr_at(self, step: int) -> list[float]:
        """Per-group learning rates of optimizer step ``step`` (closed form)."""
        f = self.factor(step)
        return [peak * f for peak in self._peaks()]

    def get_lr(self) -> list[float]:
        # The warning mirrors torch's built-in schedulers: outside step() the
        # caller almost always wanted get_last_lr().
        if not getattr(self, "_get_lr_called_within_step", False):
            warnings.warn(
                "To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
                UserWarning,
                stacklevel=2,
            )
        # last_epoch counts scheduler steps taken; the next optimizer step is
        # one past it.  Closed form, so resuming or jumping is exact.
        return self._lr_at(self.last_epoch + 1)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lr_at(self.last_epoch + 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and write the matching lr into the groups.

        Writing the lr here makes resuming exact even when the optimizer's own
        state is not (or not yet) restored: a freshly built scheduler has left
        ``lr(1)`` in the groups.
        """
        super().load_state_dict(state_dict)
        values = self._lr_at(self.last_epoch + 1)
        for group, lr in zip(self.optimizer.param_groups, values):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in self.optimizer.param_groups
        ]
