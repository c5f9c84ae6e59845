"""Preprocess a dataset once into the cache and print its fingerprint:
`python scripts/prepare.py data=msd data.root=/data/Task03_Liver` (see configs/prepare.yaml)."""

from medseg.cli import prepare

if __name__ == "__main__":
    prepare()
