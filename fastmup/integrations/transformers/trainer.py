"""fastmup optimizers in the Hugging Face ``Trainer``.

The recipe::

    model = mup_causal_lm(cfg, base_cfg, delta_cfg)
    args = TrainingArguments(output_dir, learning_rate=3e-3, weight_decay=0.1,
                             warmup_steps=100, max_steps=2000, ...)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=mup_optimizer_and_scheduler(model, args))
    trainer.train()                      # or train(resume_from_checkpoint=True)

``mup_optimizer_and_scheduler`` builds what the Trainer would build for
``optim="adamw_torch"`` (the same two param groups, with and without weight
decay; ``lr``, ``betas``, ``eps`` and ``weight_decay`` from the arguments;
``lr_scheduler_type`` with its warmup), with a fastmup optimizer in place of
torch's AdamW.  The μP factors live in the optimizer, per tensor, so the
Trainer's scheduler may set ``group["lr"]`` as it likes.  ``args.optim`` is
not consulted.

Checkpoints: the Trainer saves the model with ``save_pretrained``, whose
``config.json`` holds the μP record (base shapes, multipliers), and the
optimizer and scheduler through their ``state_dict``; resuming into a model
built the same way (``mup_causal_lm`` with the same arguments) continues bit
for bit, and :func:`~fastmup.integrations.transformers.mup_from_pretrained`
loads any checkpoint directory as a μP model.

Passing ``optimizer_cls_and_kwargs=(fastmup.MuAdamW, {...})`` to the Trainer
works too: the Trainer then makes the groups and the schedule itself.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from fastmup.optim import MuAdam, MuAdamW

__all__ = ["decay_parameter_names", "mup_optimizer_and_scheduler"]


def decay_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters the Trainer applies weight decay to.

    Everything but biases and normalization weights, by the Trainer's own rule
    (``Trainer.get_decay_parameter_names``, which reads nothing but the
    model), so that the groups are exactly those of the Trainer's default
    optimizer.
    """
    return list(Trainer.get_decay_parameter_names(None, model))


def mup_optimizer_and_scheduler(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: Optional[int] = None,
    *,
    optimizer_cls: type = MuAdamW,
    **optimizer_kwargs: Any,
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(..., optimizers=...)``, from ``TrainingArguments``.

    Args:
        model: the μP model (its parameters carry ``infshape``).
        args: ``learning_rate``, ``weight_decay`` (on the decay group, see
            :func:`decay_parameter_names`; 0 on the others), ``adam_beta1``,
            ``adam_beta2``, ``adam_epsilon`` (for the Adam family),
            ``lr_scheduler_type``, ``lr_scheduler_kwargs`` and
            ``warmup_steps`` (a count, or a fraction of the steps when < 1)
            are used.
        num_training_steps: the length of the schedule; default
            ``args.max_steps`` (then it must be set).  The Trainer computes it
            from the dataset when ``max_steps`` is not set; pass that number.
        optimizer_cls: a fastmup optimizer class (``MuAdamW``, ``MuAdam``,
            ``MuSGD``, ...).
        optimizer_kwargs: more constructor arguments (``backend=``,
            ``state_dtype=``, ``decoupled_wd=``, ...); they win over those
            taken from ``args``.

    The schedule multiplies each group's ``lr`` by a factor of the step, so
    μP's per-tensor learning rates keep their ratios all along.
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"mup_optimizer_and_scheduler: args must be TrainingArguments, got {type(args).__name__}")
    if num_training_steps is None:
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(
                "mup_optimizer_and_scheduler: num_training_steps is needed when args.max_steps is not set "
                "(the number of optimizer steps the Trainer will take, which sets the schedule's length)"
            )
        num_training_steps = int(args.max_steps)
    elif not isinstance(num_training_steps, int) or num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be a positive int, got {num_training_steps!r}")

    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs: dict = {"lr": args.learning_rate}
    if issubclass(optimizer_cls, MuAdam):  # MuAdamW is one
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(optimizer_kwargs)
    optimizer = optimizer_cls(groups, **kwargs)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler
