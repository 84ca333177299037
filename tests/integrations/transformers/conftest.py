"""Tiny transformers configs for the integration tests; everything offline.

The models are built from configs with random weights; ``HF_HUB_OFFLINE``
makes any attempt to reach the hub fail instead of downloading.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from transformers import GPT2Config, LlamaConfig  # noqa: E402

from fastmup.integrations.transformers import width_config  # noqa: E402

KINDS = ("gpt2", "llama")
VOCAB = 48
SEQ = 12


def config(kind: str, width: int = 32, *, tied=None, heads: int = 4, dropout: bool = False, **extra):
    """A 2-layer model of hidden size ``width`` with ``heads`` heads (head dim ``width / heads``).

    ``tied=None`` keeps the model's default (GPT-2 tied, Llama untied).
    GPT-2's dropout (0.1 by default) is on only with ``dropout=True``.
    """
    if kind == "gpt2":
        kw = dict(n_embd=width, n_head=heads, n_layer=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                  eos_token_id=0)
        if not dropout:
            kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg = GPT2Config(**kw, **extra)
    elif kind == "llama":
        cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
                          num_key_value_heads=heads // 2, num_hidden_layers=2, vocab_size=VOCAB,
                          max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, **extra)
    else:
        raise ValueError(kind)
    if tied is not None:
        cfg.tie_word_embeddings = tied
    return cfg


def widths_of(cfg, width: int, heads=None):
    """``cfg`` at hidden size ``width`` (MLP and heads following), by :func:`width_config`."""
    heads = cfg.num_attention_heads if heads is None else heads
    if cfg.model_type == "gpt2":
        return width_config(cfg, n_embd=width, n_head=heads)
    # LlamaConfig stores head_dim (hidden_size // heads at construction): it changes too.
    return width_config(cfg, hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
                        num_key_value_heads=heads // 2, head_dim=width // heads)


def batch(seed: int = 0, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (n, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}
