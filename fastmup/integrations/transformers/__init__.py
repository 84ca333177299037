"""μP for Hugging Face ``transformers`` causal language models and the ``Trainer``.

Needs the optional extra: ``pip install fastmup[hf]`` (``transformers`` and
``accelerate``).

* :func:`mup_causal_lm`: the μP version of a GPT-2 / Llama (or similarly
  built) model from its config, with base shapes from base and delta configs
  (:func:`width_config`); :func:`convert_to_mup` does it to a model already
  built; :func:`mup_from_pretrained` loads one saved by ``save_pretrained`` or
  a ``Trainer`` checkpoint (the base shapes travel in ``config.json``).
* :func:`mup_optimizer_and_scheduler`: a fastmup optimizer and the LR
  schedule that ``TrainingArguments`` describe, for
  ``Trainer(..., optimizers=(optimizer, scheduler))``.

Model details and what transformers offers no hook for: :mod:`.model`;
the Trainer recipe: :mod:`.trainer`.
"""
try:
    import transformers as _transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastmup.integrations.transformers needs the `transformers` package: pip install 'fastmup[hf]'"
    ) from e

from fastmup.integrations.transformers.model import (  # noqa: E402
    CONFIG_KEY,
    WIDTH_KEYS,
    FanInFirstInfShape,
    convert_to_mup,
    mup_causal_lm,
    mup_from_pretrained,
    mup_record,
    width_config,
)
from fastmup.integrations.transformers.trainer import (  # noqa: E402
    decay_parameter_names,
    mup_optimizer_and_scheduler,
)

__all__ = [
    "CONFIG_KEY",
    "WIDTH_KEYS",
    "FanInFirstInfShape",
    "convert_to_mup",
    "mup_causal_lm",
    "mup_from_pretrained",
    "mup_record",
    "width_config",
    "decay_parameter_names",
    "mup_optimizer_and_scheduler",
]
