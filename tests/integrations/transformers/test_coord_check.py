"""Coordinate checks (``fastmup.coord_check.get_coord_data``) on transformers' GPT-2 and Llama.

Hidden sizes 32..256 with 4 heads (the head dim grows with width), a few
AdamW steps at a large learning rate on one batch.  For each recorded
activation the slope of ``log2 l1`` against ``log2 width`` measures how its
coordinates grow with width: under μP (``mup_causal_lm`` + ``MuAdamW``) the
attention and MLP outputs, the final norm and the logits stay flat after the
first update; under SP (the plain model + ``torch.optim.AdamW``) the
attention and MLP outputs grow about linearly with width (their updates are
sums over the width) and the logits faster than the square root.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.integrations.transformers.conftest import KINDS, batch, config, widths_of

from transformers import AutoModelForCausalLM  # noqa: E402

from fastmup.coord_check import get_coord_data  # noqa: E402
from fastmup.integrations.transformers import mup_causal_lm  # noqa: E402

WIDTHS = (32, 64, 128, 256)

#: per model: (attention output, MLP output, final norm, logits) of the last block
WATCHED = {
    "gpt2": ("transformer.h.1.attn:out[0]", "transformer.h.1.mlp", "transformer.ln_f", "lm_head"),
    "llama": ("model.layers.1.self_attn:out[0]", "model.layers.1.mlp", "model.norm", "lm_head"),
}


def slopes(df, module):
    """``{t: slope of log2 l1 against log2 width}`` for one module."""
    out = {}
    for t, sub in df[df["module"] == module].groupby("t"):
        sub = sub.sort_values("width")
        assert list(sub["width"]) == list(WIDTHS), module
        l1 = sub["l1"].to_numpy()
        out[t] = float(np.polyfit(np.log2(sub["width"]), np.log2(l1), 1)[0]) if (l1 > 0).all() else float("nan")
    return out


# tiny models: one thread is as fast as two and immune to oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", KINDS)
def test_coord_check_is_flat_in_mup_and_grows_in_sp(kind):
    base = config(kind, 32)
    delta = widths_of(base, 64)
    loader = [batch(0, n=8)]

    def lazy(width, mup):
        if mup:
            return lambda: mup_causal_lm(widths_of(base, width), base, delta)
        return lambda: AutoModelForCausalLM.from_config(widths_of(base, width))

    kw = dict(optimizer="adamw", lr=1e-2, nsteps=3, dict_in_out=True, show_progress=False)
    dfs = {mup: get_coord_data({w: lazy(w, mup) for w in WIDTHS}, loader, mup=mup, **kw) for mup in (True, False)}
    attn, mlp, _, logits = WATCHED[kind]
    report = {(mup, m): slopes(dfs[mup], m) for mup in dfs for m in WATCHED[kind]}
    msg = "\n".join(f"{'μP' if mup else 'SP'} {m}: " + ", ".join(f"t={t} {s:+.2f}" for t, s in v.items())
                    for (mup, m), v in report.items())
    # Measured: μP within ±0.25 (the logits after the first update of a zero
    # readout converge from below, the narrowest widths lagging); SP at least
    # +0.9 for the attention and MLP outputs and +0.6 for the logits.
    for m in WATCHED[kind]:
        for t in (2, 3):  # after one and two updates (t=1 is the init, where a zero readout gives 0)
            assert abs(report[(True, m)][t]) < 0.3, msg
    for t in (2, 3):
        assert report[(False, attn)][t] > 0.7, msg
        assert report[(False, mlp)][t] > 0.7, msg
        assert report[(False, logits)][t] > 0.45, msg
