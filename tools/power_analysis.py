"""How many training seeds a schedule comparison needs, from the training-seed spread an ablation
report measured: the pooled std of the bound perplexity over training seeds of
every row trained with several seeds, then the smallest difference a two-sided 95% two-sample
t-test detects with 80% power for n seeds per row, and the seeds each effect size would need.

    .venv/bin/python tools/power_analysis.py reports/ablation/report/report.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ablation.statistics import detectable, seeds_for
from pipeline.ablation.tables import by_row, train_seed_stats
from pipeline.artifacts import read_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="an ablation report.json")
    ap.add_argument("--metric", default="ppl_token", choices=["ppl_token", "ppl_word"])
    args = ap.parse_args(argv)
    report = read_json(args.report)
    repeated = {row: runs for row, runs in by_row(report["rows"]).items() if len(runs) > 1}
    if not repeated:
        print(f"error: {args.report} has no row trained with more than one seed", file=sys.stderr)
        return 1
    stats = {row: train_seed_stats(runs, args.metric) for row, runs in repeated.items()}
    df = sum(n - 1 for _, _, n in stats.values())
    pooled = math.sqrt(sum((n - 1) * s * s for _, s, n in stats.values()) / df)
    level = sum(m for m, _, _ in stats.values()) / len(stats)
    print(f"{args.metric}: training-seed std per row (budget {report['budget']['train_steps']} steps):")
    for row, (mean, std, n) in stats.items():
        print(f"  {row}: mean {mean:.1f}, std {std:.2f} over {n} seeds")
    print(f"pooled std {pooled:.2f} ({100 * pooled / level:.2f}% of {level:.1f}; {df} degrees of freedom)")
    print("seeds per row -> smallest difference detected (95% two-sided, 80% power):")
    for n in (2, 3, 4, 5, 6, 8, 10, 12):
        d = detectable(pooled, n)
        print(f"  {n:>2}: {d:6.1f} ({100 * d / level:.1f}%)")
    print("difference -> seeds per row needed:")
    for percent in (1, 2, 3, 5):
        print(f"  {percent}% ({level * percent / 100:.1f}): {seeds_for(pooled, level * percent / 100)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
