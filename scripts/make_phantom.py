"""Write the synthetic phantom dataset (MSD layout) and print a one-line summary.

Usage: python scripts/make_phantom.py OUT_DIR [--num-cases 30] [--seed 0]
       [--shape 160 160 48] [--spacing 0.8 0.8 2.5] [--max-lesions 3]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.phantom import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    count_lesions,
    write_phantom_dataset,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the medseg synthetic CT phantom.")
    parser.add_argument("out_dir", type=Path, help="dataset root to create (or reuse)")
    parser.add_argument("--num-cases", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z")
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPACING),
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm",
    )
    parser.add_argument("--max-lesions", type=int, default=3)
    return parser.parse_args(argv)


def lesion_histogram(root: Path) -> dict[int, int]:
    """Cases per lesion count, read back from the written label maps."""
    meta = json.loads((root / "dataset.json").read_text())
    counts = Counter(
        count_lesions(np.asarray(nib.load(root / entry["label"]).dataobj))
        for entry in meta["training"]
    )
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = write_phantom_dataset(
        args.out_dir,
        num_cases=args.num_cases,
        seed=args.seed,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing),
        max_lesions=args.max_lesions,
    )
    histogram = " ".join(f"{k}:{v}" for k, v in lesion_histogram(root).items())
    print(f"{args.num_cases} phantom cases (lesions per case -> cases: {histogram}) at {root}")


if __name__ == "__main__":
    main()
