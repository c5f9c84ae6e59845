"""Summarize a multirun: per-job table, mean/std over seeds per configuration, and a plot.

Usage: python scripts/summarize_sweep.py MULTIRUN_DIR [--metric val/dice_mean]

Writes sweep_jobs.csv, sweep_configs.csv, sweep_summary.md and sweep_plot.png into
MULTIRUN_DIR (`python src/train.py -m ...` does this by itself after every job).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.sweeps import summarize_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="logs/<task>/multiruns/<time>")
    parser.add_argument(
        "--metric", default=None, help="metric to plot (default: the jobs' optimized_metric)"
    )
    args = parser.parse_args(argv)
    try:
        written = summarize_sweep(args.sweep_dir, args.metric)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(written["sweep_summary.md"].read_text())
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
