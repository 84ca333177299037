"""fastmup optimizers in the Hugging Face Trainer.

* ``mup_optimizer_and_scheduler(model, args)`` builds what the Trainer builds
  for ``optim="adamw_torch"`` (groups, lr, weight decay, betas, eps, warmup
  schedule): at base width the μP model under the helper's ``MuAdamW`` trains
  exactly as the plain model under the Trainer's own AdamW, bit for bit, and
  so does ``optimizer_cls_and_kwargs=(MuAdamW, ...)``.
* A Trainer run stopped at a checkpoint and resumed into a freshly built
  model ends bit-identical to the uninterrupted run (μP width, GPT-2 with
  dropout, Llama untied with zero readout), with the default backend; the
  checkpoint's ``config.json`` carries the base shapes, and
  ``mup_from_pretrained`` loads the checkpoint as the same μP model.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.integrations.transformers.conftest import SEQ, VOCAB, config, widths_of

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import fastmup  # noqa: E402
from fastmup.integrations.transformers import (  # noqa: E402
    decay_parameter_names,
    mup_causal_lm,
    mup_from_pretrained,
    mup_optimizer_and_scheduler,
    mup_record,
)


class Tokens(torch.utils.data.Dataset):
    """Fixed random sequences as ``{"input_ids", "labels"}`` (the model shifts the labels)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, **kw) -> TrainingArguments:
    defaults = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3, weight_decay=0.1,
        adam_beta1=0.85, adam_beta2=0.98, adam_epsilon=1e-7, warmup_steps=2, lr_scheduler_type="cosine",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, optim="adamw_torch", dataloader_num_workers=0,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def losses_of(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def params_equal(a, b) -> bool:
    na, nb = dict(a.named_parameters()), dict(b.named_parameters())
    return list(na) == list(nb) and all(torch.equal(na[k], nb[k]) for k in na)


def test_helper_builds_what_the_trainer_builds(tmp_path):
    base = config("gpt2", 32, dropout=True)
    delta = widths_of(base, 64, heads=8)
    args = arguments(tmp_path / "plain")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(base)
    ref = Trainer(model=plain, args=args, train_dataset=Tokens())
    ref.train()

    runs = {}
    for how in ("helper", "cls_and_kwargs"):
        torch.manual_seed(0)
        model = mup_causal_lm(base, base, delta, zero_query=False, readout_zero_init=False)
        a = arguments(tmp_path / how)
        if how == "helper":
            opt, sched = mup_optimizer_and_scheduler(model, a, backend="eager")
            trainer = Trainer(model=model, args=a, train_dataset=Tokens(), optimizers=(opt, sched))
            # what the helper took from the arguments
            assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
            assert all(g["betas"] == (0.85, 0.98) and g["eps"] == 1e-7 for g in opt.param_groups)
            assert sched.get_last_lr() == [0.0, 0.0]  # the first of 2 warmup steps
        else:
            kwargs = dict(lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                          backend="eager")
            trainer = Trainer(model=model, args=a, train_dataset=Tokens(),
                              optimizer_cls_and_kwargs=(fastmup.MuAdamW, kwargs))
        trainer.train()
        assert isinstance(trainer.optimizer.optimizer, fastmup.MuAdamW)
        runs[how] = (model, losses_of(trainer))
    ref_groups = ref.optimizer.optimizer.param_groups
    assert len(ref_groups) == 2
    for how, (model, losses) in runs.items():
        assert losses == losses_of(ref), how
        assert params_equal(model, plain), how
    decay = set(decay_parameter_names(plain))
    assert [id(p) for n, p in plain.named_parameters() if n in decay] == [id(p) for p in ref_groups[0]["params"]]


def test_helper_needs_the_number_of_steps(tmp_path):
    torch.manual_seed(0)
    base = config("llama", 32)
    model = mup_causal_lm(base, base, widths_of(base, 64))
    with pytest.raises(ValueError, match="num_training_steps"):
        mup_optimizer_and_scheduler(model, arguments(tmp_path, max_steps=-1, num_train_epochs=1))
    opt, sched = mup_optimizer_and_scheduler(
        model, arguments(tmp_path, max_steps=-1, num_train_epochs=1, lr_scheduler_type="linear"), 10
    )
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kind,tied,dropout", [("gpt2", True, True), ("llama", False, False)], ids=["gpt2-tied-dropout", "llama-untied"]
)
def test_resume_is_bit_identical(kind, tied, dropout, tmp_path):
    base = config(kind, 32, tied=tied, dropout=dropout)
    delta = widths_of(base, 64)
    cfg = widths_of(base, 96)

    def trainer_for(model, out):
        a = arguments(out, save_strategy="steps", save_steps=3)
        return Trainer(model=model, args=a, train_dataset=Tokens(), optimizers=mup_optimizer_and_scheduler(model, a))

    torch.manual_seed(0)
    model = mup_causal_lm(cfg, base, delta)
    full = trainer_for(model, tmp_path / "run")
    full.train()
    assert full.optimizer.optimizer.backend in ("cpu", "eager")  # the default backend on CPU

    ckpt = tmp_path / "run" / "checkpoint-3"
    saved = json.loads((ckpt / "config.json").read_text())["fastmup"]
    assert saved["base_shapes"] == mup_record(model)["base_shapes"]

    torch.manual_seed(1)  # another init: the weights must come from the checkpoint
    resumed_model = mup_causal_lm(cfg, base, delta)
    resumed = trainer_for(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert losses_of(resumed) == losses_of(full)  # the first three come from the checkpoint's history
    assert params_equal(resumed_model, model)
    a, b = full.optimizer.optimizer.state_dict(), resumed.optimizer.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)

    loaded = mup_from_pretrained(str(tmp_path / "run" / "checkpoint-6"))
    assert params_equal(loaded, model)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert type(q.infshape) is type(p.infshape) and q.infshape == p.infshape, name
    assert loaded.lm_head.width_mult() == model.lm_head.width_mult() == 3.0
