"""The claims as markdown for the ablation report (`pipeline.ablation.writeup`): each claim's
verdict, then every comparison's interval, what it covers and how many seeds it rests on."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.ablation.claims import UNSURE


def _fmt_interval(c: dict) -> str:
    return f"{c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"


def _fmt_verdict(c: dict) -> str:
    """An undecided training-seed comparison says what deciding it would take."""
    if c["verdict"] == UNSURE and c.get("seeds_needed"):
        return f"{UNSURE} at this budget, would need ~{c['seeds_needed']} training seeds per row"
    return c["verdict"]


def _fmt_pairs(pairs: Sequence[dict]) -> str:
    cells = [
        f"`{p['a']}` vs `{p['b']}`: {p['verdict']}" + (" (reference, does not decide)" if p["reference"] else "")
        for p in pairs
    ]
    return "   - per pair, on its deciding comparisons: " + "; ".join(cells)


def markdown_claims(claims: Sequence[dict]) -> str:
    """One paragraph per claim: verdict, then each comparison's interval and what it covers."""
    out = []
    for claim in claims:
        out.append(f"{claim['claim']}. **{claim['text']}: {claim['verdict']}.**")
        if claim.get("pairs"):
            out.append(_fmt_pairs(claim["pairs"]))
        for c in claim["comparisons"]:
            if "consecutive" in c:
                cells = ", ".join(
                    f"{s}: {p:.1f}±{(sd or 0):.1f} ({t:.2f} s)"
                    for s, p, sd, t in zip(c["steps"], c["ppl_token"], c["ppl_token_std"], c["seconds_per_sample"])
                )
                out.append(
                    f"   - `{c['a']}` steps → PPL/token ± eval-seed std (s/sample): {cells}; "
                    f"most minus fewest steps {_fmt_interval(c['most_vs_fewest'])}; "
                    f"time rises with steps: {c['time_increases_with_steps']} → {c['verdict']}"
                )
                continue
            how = f"paired over {c['n_a']} evaluation seeds" if c.get("paired") else f"n={c['n_a']}+{c['n_b']}"
            if not c.get("paired") and c.get("df") is not None and math.isfinite(c["high"]):
                how += f", t at {c['df']:.2f} df"
            line = f"   - `{c['a']}` − `{c['b']}` PPL/token: {_fmt_interval(c)} (95%, {c['covers']}, {how}) → {_fmt_verdict(c)}"
            if c.get("reference"):
                line += " (reference row: shown, does not decide the claim)"
            if c.get("eval_only_verdict"):
                line += (
                    f" (against evaluation noise alone: {c['eval_only_verdict']}, but the gap is smaller than "
                    f"the {c['training_seed_spread']:.1f} between two training seeds of one row)"
                )
            if "bert_lower_at_every_eval_step" in c:
                line += (
                    f"; validation bound (nats/token) at the start {c['start_val_bound_bert']:.2f} vs "
                    f"{c['start_val_bound_random']:.2f}, then lower at every later eval step: "
                    f"{c['bert_lower_at_every_eval_step']}; "
                    f"BERT reaches random's final validation bound at step {c['first_step_bert_reaches_random_final']}"
                )
            out.append(line)
    return "\n".join(out) + "\n"
