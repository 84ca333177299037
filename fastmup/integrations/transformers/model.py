"""μP versions of Hugging Face causal language models, from their configs.

``mup_causal_lm(config, base_config, delta_config)`` builds the model that
``AutoModelForCausalLM.from_config(config)`` builds and turns it into μP in
place.  Nothing of transformers' model code is copied or patched; every
change goes through something the model already exposes:

===========================  ===============================================
what μP needs                how it gets in
===========================  ===============================================
readout ``y = W x · c/m``    ``lm_head`` swapped through
                             ``set_output_embeddings`` for a
                             :class:`~fastmup.MuReadout` (untied) or a
                             :class:`~fastmup.MuSharedReadout` (tied to the
                             input embedding), holding the *same*
                             ``Parameter`` objects
attention ``α/d``            the attention module's ``scaling`` attribute,
                             which transformers hands to every attention
                             backend (eager, sdpa, flash, flex); the configs
                             have no setting for it (GPT-2's
                             ``scale_attn_weights`` is on/off only)
hidden weights, variance     transformers draws them with a fixed std
∝ 1/fan_in                   (``initializer_range``); they are multiplied by
                             ``m_in^-1/2`` afterwards, which is
                             :func:`fastmup.init.normal_` without new draws
query and readout at zero    zeroed in place (``zero_query``,
                             ``readout_zero_init``)
base shapes                  :func:`fastmup.set_base_shapes` from a base and
                             a delta model built on the meta device from
                             configs that differ only in width
===========================  ===============================================

The attention multiplier ``α`` (``attn_mult``) defaults to ``√d₀``, the
square root of the base model's head dim: the scores are ``α q·k / d``, equal
to the usual ``q·k / √d`` at base width, so that the base model *is* the
transformers model.  mup's examples write ``8/d``, which is the same rule for
``d₀ = 64`` (GPT-2's head dim).

Why the rest needs no change: embeddings, position embeddings, norm gains and
biases are vector-like (one infinite dim) and keep transformers' init; the
optimizers read every tensor's class from ``p.infshape``.  GPT-2 stores its
projections as ``Conv1D`` weights of layout ``(fan_in, fan_out)``, the
transpose of ``nn.Linear``'s; their infshapes are told so
(:class:`FanInFirstInfShape`), so the μP multipliers use the fan-in even
when fan-in and fan-out scale differently.

At base width, with ``zero_query=False`` and ``readout_zero_init=False`` (the
two μP choices that have no SP counterpart), the model and its training
are bit for bit those of the plain transformers model.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fastmup.infshape import InfShape
from fastmup.layer import MuReadout, MuSharedReadout
from fastmup.shape import BaseShapesError, base_shapes_state, make_base_shapes, set_base_shapes, zip_infshapes

__all__ = [
    "CONFIG_KEY",
    "WIDTH_KEYS",
    "FanInFirstInfShape",
    "width_config",
    "mup_causal_lm",
    "convert_to_mup",
    "mup_from_pretrained",
    "mup_record",
]

#: The attribute of ``model.config`` (and key of ``config.json``) that holds
#: what μP needs to rebuild the model: base shapes and multipliers.
CONFIG_KEY = "fastmup"

#: Config attributes that are "width": base, delta and target configs may
#: differ in these and nothing else.  (GPT-2 names them ``n_embd``,
#: ``n_inner``, ``n_head``; ``n_inner=None`` means ``4 * n_embd``.)
WIDTH_KEYS = frozenset(
    {
        "hidden_size",
        "n_embd",
        "intermediate_size",
        "n_inner",
        "num_attention_heads",
        "n_head",
        "num_key_value_heads",
        "head_dim",
    }
)

# Entries of config.to_dict() that are bookkeeping or run-time switches (the
# Trainer turns use_cache off, for one): they may differ.
_META_KEYS = frozenset(
    {
        CONFIG_KEY,
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_name_or_path",
        "transformers_version",
        "architectures",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_commit_hash",
        "dtype",
        "torch_dtype",
    }
)

ConfigOrDict = Union[PretrainedConfig, Mapping[str, Any]]


class FanInFirstInfShape(InfShape):
    """The infshape of a weight stored ``(fan_in, fan_out)``, like GPT-2's ``Conv1D``.

    Its main dimension is dim 0 (the fan-in, so Adam's hidden-weight rule
    ``η / m_in`` uses it) and :meth:`fanin_fanout` returns ``(self[0],
    self[1])`` (SGD's ``η · m_out / m_in``).  Deep copies and pickles keep the
    class; :func:`fastmup.base_shapes_state` stores plain base dims, and
    :func:`convert_to_mup` (or :func:`mup_from_pretrained`) restores the class.
    """

    def fanin_fanout(self) -> tuple:
        if len(self) < 2:
            raise ValueError(f"fan-in/fan-out are undefined for a tensor of rank {len(self)}")
        return self[0], self[1]


# ---------------------------------------------------------------------------
# configs


def _config_dict(config: ConfigOrDict, what: str) -> Dict[str, Any]:
    if isinstance(config, PretrainedConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"{what} must be a transformers PretrainedConfig, got {type(config).__name__}")


def width_config(config: PretrainedConfig, **widths: Any) -> PretrainedConfig:
    """A copy of ``config`` with some width attributes changed.

    ``width_config(cfg, hidden_size=64, intermediate_size=256,
    num_attention_heads=4)`` gives a base or delta config for
    :func:`mup_causal_lm`.  Only :data:`WIDTH_KEYS` may be given (a
    ``ValueError`` names any other), so the copy differs from ``config`` in
    width only.  ``config`` itself is left unchanged.  Some configs store
    derived widths: ``LlamaConfig`` keeps ``head_dim`` (``hidden_size //
    num_attention_heads`` when it was made), so a new hidden size with the
    same number of heads needs ``head_dim=`` as well.
    """
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"width_config: config must be a transformers PretrainedConfig, got {type(config).__name__}")
    bad = sorted(k for k in widths if k not in WIDTH_KEYS)
    if bad:
        raise ValueError(
            f"width_config: {bad} are not width attributes; base and delta configs may differ from the "
            f"model's only in {sorted(WIDTH_KEYS)}"
        )
    out = copy.deepcopy(config)
    if hasattr(out, CONFIG_KEY):
        delattr(out, CONFIG_KEY)
    for k, v in widths.items():
        setattr(out, k, v)
    return out


def _check_widths_only(config: ConfigOrDict, other: ConfigOrDict, role: str) -> None:
    a, b = _config_dict(config, "config"), _config_dict(other, f"{role}_config")
    if a.get("model_type") != b.get("model_type"):
        raise ValueError(
            f"{role}_config is a {b.get('model_type')!r} config but the model's is {a.get('model_type')!r}"
        )
    diff = sorted(
        k for k in set(a) | set(b) if k not in WIDTH_KEYS and k not in _META_KEYS and a.get(k) != b.get(k)
    )
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:8])
        raise ValueError(
            f"{role}_config differs from the model's config in non-width attribute(s) {diff} ({shown}); "
            f"base and delta configs may differ only in {sorted(WIDTH_KEYS)} "
            "(fastmup.integrations.transformers.width_config builds such copies)"
        )


# ---------------------------------------------------------------------------
# the pieces of the model that μP changes


def _attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    # transformers' attention modules keep the score multiplier as a float
    # `scaling` next to their `head_dim`.
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), float) and isinstance(getattr(m, "head_dim", None), int)
    ]


def _base_head_dim(base_model: nn.Module) -> int:
    dims = {m.head_dim for _, m in _attention_modules(base_model)}
    if len(dims) != 1:
        raise ValueError(f"the base model's attention modules have head dims {sorted(dims)}; expected one")
    return dims.pop()


def _check_sp_scaling(name: str, module: nn.Module) -> None:
    # Only the usual 1/sqrt(d) (GPT-2: optionally divided by layer_idx + 1)
    # is converted: any other multiplier would be scaled wrongly.
    ratio = module.scaling * math.sqrt(module.head_dim)
    layer_idx = getattr(module, "layer_idx", None)
    ok = math.isclose(ratio, 1.0, rel_tol=1e-9) or (
        isinstance(layer_idx, int)
        and getattr(module, "scale_attn_by_inverse_layer_idx", False)
        and math.isclose(ratio * (layer_idx + 1), 1.0, rel_tol=1e-9)
    )
    if not ok:
        raise ValueError(
            f"attention module {name!r} ({type(module).__name__}) scales its scores by {module.scaling!r}, "
            f"not head_dim**-0.5 = {module.head_dim ** -0.5!r}; fastmup converts only 1/sqrt(d) attention to "
            "μP's α/d (GPT-2: set scale_attn_weights=True)"
        )


def _query_slices(name: str, module: nn.Module) -> List[torch.Tensor]:
    """Views of the parameters that compute the attention queries."""
    q = getattr(module, "q_proj", None)
    if isinstance(q, nn.Linear):
        return [q.weight] + ([q.bias] if q.bias is not None else [])
    if getattr(module, "is_cross_attention", False) and isinstance(getattr(module, "q_attn", None), Conv1D):
        q = module.q_attn
        return [q.weight, q.bias]
    qkv = getattr(module, "c_attn", None)
    split = getattr(module, "split_size", None)
    if isinstance(qkv, Conv1D) and isinstance(split, int):
        # GPT-2 packs (q, k, v) along the output dim of a (fan_in, 3*d) Conv1D.
        return [qkv.weight[:, :split], qkv.bias[:split]]
    raise ValueError(
        f"zero_query: cannot find the query projection of attention module {name!r} "
        f"({type(module).__name__}); pass zero_query=False"
    )


def _check_readout(model: PreTrainedModel) -> None:
    head = model.get_output_embeddings()
    if isinstance(head, MuReadout):
        raise RuntimeError(
            f"{type(model).__name__}'s readout is a {type(head).__name__} already: the model is in μP "
            "(convert_to_mup runs once per model)"
        )
    if type(head) is not nn.Linear:
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() is a {type(head).__name__}, not an nn.Linear: "
            "fastmup converts linear readouts only"
        )


def _readout_to_mup(model: PreTrainedModel, output_mult: float) -> MuReadout:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = emb is not None and head.weight is getattr(emb, "weight", None)
    # Built on meta so that nothing is drawn (MuSharedReadout otherwise draws
    # what mup's throwaway weight would): the RNG stream stays that of the
    # plain model, and the weights are the ones already there.
    if tied:
        readout: MuReadout = MuSharedReadout(head.weight, bias=False, device="meta", output_mult=output_mult)
    else:
        readout = MuReadout(
            head.in_features, head.out_features, bias=False, device="meta", output_mult=output_mult
        )
        readout.weight = head.weight
    if head.bias is not None:
        readout.bias = head.bias
    model.set_output_embeddings(readout)
    return readout


def _check_conv1d(model: nn.Module, infshapes: Mapping[str, InfShape]) -> None:
    # set_base_shapes checks nn.Linear layers for this; Conv1D is not one.
    bad = [
        name
        for name, m in model.named_modules()
        if isinstance(m, Conv1D)
        and infshapes[f"{name}.weight"][0].isinf()
        and not infshapes[f"{name}.weight"][1].isinf()
    ]
    if bad:
        raise BaseShapesError(
            f"Conv1D module(s) {bad} map an infinite fan-in to a finite fan-out: an output layer needs "
            "MuReadout's 1/m multiplier; scale their fan-out in the delta config too"
        )


def _conv1d_infshapes(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Conv1D) and m.weight.infshape.ninf() == 2:
            m.weight.infshape = FanInFirstInfShape(m.weight.infshape, main_idx=0)


def _fan_in_mult(infshape: InfShape) -> float:
    return infshape.fanin_fanout()[0].width_mult()


# ---------------------------------------------------------------------------
# entry points


def mup_record(model: PreTrainedModel) -> Dict[str, Any]:
    """The μP record kept in ``model.config`` (and so in every ``config.json``).

    ``{"base_shapes": {name: [base dim or None, ...]}, "attn_mult": α,
    "output_mult": c, "zero_query": ..., "readout_zero_init": ...}``; the last
    two say how the weights were initialised and are not needed to rebuild.
    """
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, Mapping) or "base_shapes" not in record:
        raise BaseShapesError(
            f"{type(model).__name__}'s config has no μP record ({CONFIG_KEY!r}): build the model with "
            "fastmup.integrations.transformers.mup_causal_lm or convert_to_mup"
        )
    return dict(record)


def convert_to_mup(
    model: PreTrainedModel,
    base_config: Optional[PretrainedConfig] = None,
    delta_config: Optional[PretrainedConfig] = None,
    *,
    base_shapes: Optional[Union[Mapping[str, Any], str]] = None,
    attn_mult: Optional[float] = None,
    output_mult: float = 1.0,
    init: bool = True,
    zero_query: bool = True,
    readout_zero_init: Optional[bool] = None,
) -> PreTrainedModel:
    """Turn a transformers causal LM into μP, in place.

    Args:
        model: a ``transformers`` causal LM whose readout is
            ``get_output_embeddings()`` (an ``nn.Linear``, tied to the input
            embedding or not) and whose attention modules scale by
            ``head_dim**-0.5`` (GPT-2, Llama and models built like them).
        base_config, delta_config: configs that differ from ``model.config``
            only in width (:data:`WIDTH_KEYS`; :func:`width_config`).  A
            dimension is infinite iff it differs between the two; sizes are
            relative to ``base_config``.  Built on the meta device (no memory,
            no random draws).
        base_shapes: instead of the two configs, base shapes as saved by
            :func:`fastmup.base_shapes_state` / in :func:`mup_record`, or a
            ``.bsh`` path; then ``attn_mult`` must be given.
        attn_mult: ``α`` of the attention scores ``α q·k / d``; default
            ``√d₀`` (base head dim), i.e. ``q·k/√d`` at base width.
        output_mult: the readout's ``c`` in ``W x · c / m``.
        init: the weights are transformers' fresh initialization: make it
            μP's (hidden weights ``× m_in^-1/2``, and the zeroing below).
            ``False`` for trained or loaded weights.
        zero_query: (with ``init``) start the query projections at zero, so
            that attention starts uniform at every width.
        readout_zero_init: (with ``init``) start an untied readout at zero;
            default ``True`` for an untied readout and ``False`` for a tied one
            (a tied readout is the input embedding, which must not be zero;
            ``True`` is then an error).

    Returns:
        ``model``, whose parameters carry ``infshape``; its config carries the
        μP record (:func:`mup_record`), so ``save_pretrained`` and Trainer
        checkpoints keep the base shapes.  ``fastmup.MuAdamW(model.parameters())``
        then applies μP's learning rates.

    Every argument is checked before the model is changed.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert_to_mup expects a transformers PreTrainedModel, got {type(model).__name__}")
    _check_readout(model)
    output_mult = float(output_mult)
    if not (math.isfinite(output_mult) and output_mult > 0):
        raise ValueError(f"output_mult must be a positive finite number, got {output_mult!r}")
    if attn_mult is not None:
        attn_mult = float(attn_mult)
        if not (math.isfinite(attn_mult) and attn_mult > 0):
            raise ValueError(f"attn_mult must be a positive finite number, got {attn_mult!r}")

    # --- base shapes, from configs or given -------------------------------
    if base_shapes is not None:
        if base_config is not None or delta_config is not None:
            raise ValueError("convert_to_mup: pass either base_shapes or base_config/delta_config, not both")
        if attn_mult is None:
            raise ValueError(
                "convert_to_mup: with base_shapes, attn_mult must be given too (the base head dim is not "
                "part of the shapes); it is stored in the model's μP record"
            )
        shapes = base_shapes
    else:
        if base_config is None or delta_config is None:
            raise ValueError(
                "convert_to_mup needs base_config and delta_config (or base_shapes): the widths that scale "
                "are those that differ between them"
            )
        _check_widths_only(model.config, base_config, "base")
        _check_widths_only(model.config, delta_config, "delta")
        cls = type(model)
        with torch.device("meta"):
            base_model = cls(base_config)
            delta_model = cls(delta_config)
        shapes = make_base_shapes(base_model, delta_model)
        if not any(s.ninf() for s in shapes.values()):
            raise ValueError(
                "convert_to_mup: base_config and delta_config give every parameter the same shape; the "
                "delta config must differ in the widths to scale"
            )
        if attn_mult is None:
            attn_mult = math.sqrt(_base_head_dim(base_model))

    # --- checks that need the model, before anything changes ---------------
    attention = _attention_modules(model)
    for name, m in attention:
        _check_sp_scaling(name, m)
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    if readout_zero_init is None:
        readout_zero_init = not tied
    elif readout_zero_init and tied and init:
        raise ValueError(
            "readout_zero_init=True with a readout tied to the input embedding would zero the embedding; "
            "pass readout_zero_init=False, or untie (config.tie_word_embeddings=False)"
        )
    queries = [_query_slices(name, m) for name, m in attention] if (init and zero_query) else []

    _check_conv1d(model, zip_infshapes(shapes, model))  # also checks the names against the model

    # --- the conversion ------------------------------------------------------
    readout = _readout_to_mup(model, output_mult)
    readout.readout_zero_init = bool(readout_zero_init)
    try:
        set_base_shapes(model, shapes, rescale_params=False)
    except Exception:
        model.set_output_embeddings(head)  # leave the model as it was
        raise
    _conv1d_infshapes(model)
    for _, m in attention:
        m.scaling = m.scaling * (attn_mult / math.sqrt(m.head_dim))

    if init:
        with torch.no_grad():
            for p in model.parameters():
                s = p.infshape
                if s.ninf() == 2:
                    factor = _fan_in_mult(s) ** -0.5
                    if factor != 1.0:
                        p.mul_(factor)
            for views in queries:
                for v in views:
                    v.zero_()
            if readout_zero_init and not tied:
                readout.weight.zero_()
                if readout.bias is not None:
                    readout.bias.zero_()

    if init:
        how = {"zero_query": bool(zero_query), "readout_zero_init": bool(readout_zero_init)}
    else:  # keep what a loaded record says about the initialization
        prev = getattr(model.config, CONFIG_KEY, None)
        prev = prev if isinstance(prev, Mapping) else {}
        how = {k: prev.get(k) for k in ("zero_query", "readout_zero_init")}
    record = {"base_shapes": base_shapes_state(model), "attn_mult": attn_mult, "output_mult": output_mult, **how}
    setattr(model.config, CONFIG_KEY, record)
    return model


def mup_causal_lm(
    config: PretrainedConfig,
    base_config: Optional[PretrainedConfig] = None,
    delta_config: Optional[PretrainedConfig] = None,
    *,
    model_class: Optional[type] = None,
    **options: Any,
) -> PreTrainedModel:
    """The μP version of ``AutoModelForCausalLM.from_config(config)``.

    ``model_class`` (e.g. ``GPT2LMHeadModel``) replaces the Auto lookup.
    ``config`` is copied, not modified.  The model draws the same random
    numbers as the plain one (everything μP adds is computed without new
    draws), so with the same seed and at base width (``zero_query=False,
    readout_zero_init=False``) it is the plain model bit for bit.  The other
    arguments are those of :func:`convert_to_mup` (its keyword ``options``:
    ``base_shapes``, ``attn_mult``, ``output_mult``, ``zero_query``,
    ``readout_zero_init``; ``init`` is always on).

    Example::

        cfg = GPT2Config(n_embd=1024, n_head=16, n_layer=12)
        model = mup_causal_lm(cfg, width_config(cfg, n_embd=64, n_head=4),
                              width_config(cfg, n_embd=128, n_head=8))
        opt = fastmup.MuAdamW(model.parameters(), lr=3e-3)
    """
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"mup_causal_lm: config must be a transformers PretrainedConfig, got {type(config).__name__}")
    # checked before the model is built (its random draws are the caller's)
    unknown = sorted(set(options) - _CAUSAL_LM_OPTIONS)
    if unknown:
        raise TypeError(f"mup_causal_lm() got an unexpected keyword argument {unknown[0]!r}")
    config = copy.deepcopy(config)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if model_class is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = model_class(config)
    return convert_to_mup(model, base_config, delta_config, init=True, **options)


#: the keyword arguments of convert_to_mup that mup_causal_lm passes on
_CAUSAL_LM_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(convert_to_mup).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "init"
)


def mup_from_pretrained(path: str, *args: Any, **kwargs: Any) -> PreTrainedModel:
    """Load a μP model saved with ``save_pretrained`` or by the ``Trainer``.

    ``AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)`` followed
    by :func:`convert_to_mup` with the μP record of the saved config
    (``init=False``: the weights are the saved ones).
    """
    model = AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, Mapping) or "base_shapes" not in record:
        raise BaseShapesError(
            f"{path!r}: its config.json has no μP record ({CONFIG_KEY!r}); it was not saved from a model "
            "built by fastmup.integrations.transformers"
        )
    return convert_to_mup(
        model,
        base_shapes=record["base_shapes"],
        attn_mult=record["attn_mult"],
        output_mult=record.get("output_mult", 1.0),
        init=False,
    )
