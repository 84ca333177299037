r"""Keskar sharpness: how much the loss can rise inside a small box.

Keskar et al. (2016) measure the width of a minimum :math:`w_0` by the largest
loss found in the box

.. math::

    \mathcal{C}_\epsilon = \{w : |w_i - w_{0,i}| \le \epsilon\,(|w_{0,i}| + 1)\}

relative to the loss at the minimum.  Following Iyer et al. (2020), the
maximisation is a first-order projected gradient ascent instead of L-BFGS-B:

1. :math:`L_0` = mean loss over the loader at :math:`w_0` (eval mode).
2. Repeat ``max_steps`` times: one ascent step on one batch (cycling the
   loader), then clamp every trainable parameter back into the box.
3. :math:`L_1` = mean loss over the loader at the final iterate (eval mode).
4. Sharpness :math:`= 100\,(L_1 - L_0) / (1 + L_0)`.

Unlike the original script this never touches the user's optimizer, clamps
only trainable parameters (not BatchNorm statistics), and hands the model back
exactly as it was: parameter values, buffers, ``requires_grad`` flags,
``.grad`` tensors, and the train/eval flag of every submodule.  The global RNG
states are forked too, so calling it does not shift the user's random stream.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["KeskarResult", "keskar_sharpness", "keskar_sharpness_result"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class KeskarResult:
    """Outcome of a sharpness measurement.

    Attributes:
        sharpness: ``100 · (loss1 - loss0) / (1 + loss0)`` at the final iterate.
        max_sharpness: the largest value of the same quantity over the iterates
            at which the full loss was evaluated (every ``eval_every`` steps,
            the last step, and the starting point, whose value is 0).  It is a
            lower bound on Keskar's max over the box, and never below
            ``sharpness``.
        loss0: mean loss at the trained weights.
        loss1: mean loss at the final ascent iterate.
        steps: ascent steps taken.
    """

    sharpness: float
    max_sharpness: float
    loss0: float
    loss1: float
    steps: int


def _relative_rise(loss: float, loss0: float) -> float:
    return 100.0 * (loss - loss0) / (1.0 + loss0)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "each batch from loader must be an (inputs, targets) pair, got "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def _forward(model: nn.Module, inputs: Any) -> Any:
    # Several tensors are several positional arguments, a mapping is keyword
    # arguments: the same conventions a training loop would use.
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _batch_size(inputs: Any) -> int:
    # Weighting batches by size makes the mean exact over a data set whose
    # last batch is short, assuming a batch-averaging criterion (torch's default).
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() > 0 else 1
    items = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for item in items:
        if isinstance(item, Tensor) and item.dim() > 0:
            return item.shape[0]
    return 1


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer; else the CPU)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _mean_loss(model: nn.Module, criterion: Callable[..., Tensor], loader: Iterable, device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            inputs, targets = _split(_to_device(batch, device))
            n = _batch_size(inputs)
            total += float(criterion(_forward(model, inputs), targets)) * n
            count += n
    if count == 0:
        raise ValueError("loader yielded no batches; sharpness needs at least one")
    return total / count


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "loader yielded nothing on a second pass; pass a re-iterable loader "
                "(e.g. a DataLoader or a list), not a one-shot iterator"
            )


class _Snapshot:
    """Everything about a module that the ascent may change, to put back exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.values = [p.detach().clone() for p in self.params]
        self.requires_grad = [p.requires_grad for p in self.params]
        # The very tensor objects are kept: restoring them makes the user's
        # .grad identical (same storage), not merely equal.
        self.grads = [p.grad for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.training = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
            for b, v in self.buffers:
                b.copy_(v)
        for p, flag, g in zip(self.params, self.requires_grad, self.grads):
            p.requires_grad_(flag)
            p.grad = g
        for m, flag in self.training:
            m.training = flag


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional; the measurement does not need it
            pass
        else:
            return tqdm(total=total, desc="keskar sharpness", leave=False)
    return contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def keskar_sharpness_result(
    model: nn.Module, criterion: Callable[..., Tensor], loader: Iterable, **options: Any
) -> KeskarResult:
    r"""Measure Keskar sharpness and return every number involved:
    :func:`keskar_sharpness` with ``return_result=True``.

    The keyword arguments are those of :func:`keskar_sharpness` but
    ``return_max`` and ``return_result``; ``eval_every=None`` here means one
    full-loader evaluation at the end only, the cheapest setting.
    """
    for name in ("return_max", "return_result"):
        if name in options:
            raise TypeError(f"keskar_sharpness_result() got an unexpected keyword argument {name!r}")
    return keskar_sharpness(model, criterion, loader, return_result=True, **options)


def keskar_sharpness(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    loader: Iterable,
    *,
    epsilon: float = 1e-4,
    lr: float = 1e-3,
    max_steps: int = 1000,
    optimizer: OptimizerFactory | None = None,
    return_max: bool = False,
    return_result: bool = False,
    eval_every: int | None = None,
    ascent_mode: Literal["eval", "train"] = "eval",
    progress: bool = True,
    device: torch.device | str | None = None,
) -> float | KeskarResult:
    r"""Keskar sharpness :math:`100\,(L_1 - L_0)/(1 + L_0)` of a trained model.

    :math:`L_1` is the loss after ``max_steps`` steps of projected gradient
    ascent inside the box :math:`|w - w_0| \le \epsilon(|w_0| + 1)` around the
    current trainable parameters (buffers are neither perturbed nor clamped).

    Args:
        model: the trained model; returned untouched (see module docstring).
        criterion: ``criterion(model_output, targets) -> scalar loss``,
            averaging over the batch (torch's default reduction).
        loader: re-iterable source of ``(inputs, targets)`` batches, e.g. a
            ``DataLoader``.  ``inputs`` may be a tensor, a tuple/list (passed
            as positional arguments) or a mapping (keyword arguments); all
            tensors are moved to ``device``.  :math:`L_0` and :math:`L_1` are
            batch-size weighted means over one full pass.
        epsilon: relative box size, > 0.
        lr: ascent learning rate, > 0.
        max_steps: ascent steps (one batch each, cycling the loader), ≥ 1.
        optimizer: class or factory called as ``optimizer(params, lr=lr)``
            for the ascent, e.g. ``torch.optim.Adam`` or
            ``functools.partial(torch.optim.SGD, momentum=0.9)``.  Default:
            plain SGD, i.e. :math:`w \leftarrow \Pi(w + \text{lr}\,\nabla L_b)`.
            It minimises :math:`-L`, so any torch optimizer works.  An
            optimizer *instance* is refused.
        return_max: return the max over evaluated iterates instead of the final
            value.  With ``eval_every=None`` it then evaluates ten times,
            every ``max(1, max_steps // 10)`` steps.
        return_result: return the whole :class:`KeskarResult`.
        eval_every: steps between full-loader evaluations of the iterate
            (each costs one pass over the loader).  ``None``: only at the end
            (unless ``return_max``).
        ascent_mode: ``"eval"`` (default) runs the ascent with BatchNorm on
            running statistics and dropout off, so it maximises the same loss
            that :math:`L_0` and :math:`L_1` measure, deterministically.
            ``"train"`` runs it in train mode like the original script (batch
            statistics, dropout); running statistics are restored afterwards.
        progress: show a tqdm bar when tqdm is installed.
        device: where batches go; default the device of the model's first
            parameter.

    Returns:
        A float, or a :class:`KeskarResult` if ``return_result``.
    """
    if return_max and eval_every is None:
        eval_every = max(1, max_steps // 10) if isinstance(max_steps, int) and max_steps >= 1 else None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    epsilon = _check_positive("epsilon", epsilon)
    lr = _check_positive("lr", lr)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be None or an int >= 1, got {eval_every!r}")
    if ascent_mode not in ("eval", "train"):
        raise ValueError(f"ascent_mode must be 'eval' or 'train', got {ascent_mode!r}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be an optimizer class or factory called as optimizer(params, lr=lr), "
            "not an optimizer instance: the ascent never reuses (and so never disturbs) a user's optimizer"
        )
    make_optimizer: OptimizerFactory = optimizer if optimizer is not None else torch.optim.SGD
    device = torch.device(device) if device is not None else model_device(model)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True) to perturb")

    cuda_devices = sorted(
        {
            t.device.index if t.device.index is not None else torch.cuda.current_device()
            for t in [*model.parameters(), *model.buffers()]
            if t.device.type == "cuda"
        }
    )
    snapshot = _Snapshot(model)
    # fork_rng: dropout masks and shuffling samplers draw from the global
    # generators, which the user should find where they left them.
    with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
        try:
            model.eval()
            loss0 = _mean_loss(model, criterion, loader, device)

            # Box half-widths r = ε(|w0| + 1), elementwise, in the parameter's dtype.
            lower, upper = [], []
            with torch.no_grad():
                for p in params:
                    r = p.detach().abs().add_(1.0).mul_(epsilon)
                    lower.append(p.detach() - r)
                    upper.append(p.detach() + r)
                for p in params:
                    p.grad = None

            # Ascent on L is descent on -L, which works for any torch
            # optimizer (not all of them take maximize=True).
            opt = make_optimizer(params, lr=lr)
            # In eval mode BatchNorm uses running statistics and dropout is
            # off, so the ascent maximises the very loss that L0 and L1 measure.
            model.train(ascent_mode == "train")

            best = 0.0  # the starting point is in the box and scores 0
            loss1 = loss0
            batches = _cycle(loader)
            with _progress(max_steps, progress) as bar:
                for step in range(1, max_steps + 1):
                    inputs, targets = _split(_to_device(next(batches), device))
                    loss = criterion(_forward(model, inputs), targets)
                    opt.zero_grad(set_to_none=True)
                    (-loss).backward()
                    opt.step()
                    with torch.no_grad():
                        for p, lo, hi in zip(params, lower, upper):
                            torch.clamp_(p, min=lo, max=hi)
                    bar.update(1)
                    if step == max_steps or (eval_every is not None and step % eval_every == 0):
                        model.eval()
                        loss1 = _mean_loss(model, criterion, loader, device)
                        model.train(ascent_mode == "train")
                        best = max(best, _relative_rise(loss1, loss0))
                        bar.set_postfix(loss=f"{loss1:.4g}", refresh=False)
            del opt
        finally:
            snapshot.restore()

    result = KeskarResult(
        sharpness=_relative_rise(loss1, loss0),
        max_sharpness=best,
        loss0=loss0,
        loss1=loss1,
        steps=max_steps,
    )
    if return_result:
        return result
    return result.max_sharpness if return_max else result.sharpness
