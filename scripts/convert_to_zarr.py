"""Write an MSD-layout dataset (NIfTI, NRRD, MetaImage files or DICOM folders) as Zarr.

Usage: python scripts/convert_to_zarr.py SRC_DIR OUT.zarr [--no-canonical]
Then train on it in place: python src/train.py data=zarr data.root=OUT.zarr
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.data.cases import discover_cases, validate_cases
from medseg.data.zarr_store import convert_to_zarr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="dataset folder (imagesTr/, labelsTr/, ...)")
    parser.add_argument("out", type=Path, help="Zarr dataset to write (one group per case)")
    parser.add_argument(
        "--no-canonical", action="store_true", help="keep the files' axis order (default: RAS)"
    )
    args = parser.parse_args(argv)
    dataset = discover_cases(args.src)
    validate_cases(dataset)
    out = convert_to_zarr(dataset, args.out, canonical=not args.no_canonical)
    print(f"{len(dataset.cases)} cases written to {out}")


if __name__ == "__main__":
    main()
