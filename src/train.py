"""Train a segmentation model: `python src/train.py [overrides]` (see configs/train.yaml)."""

from medseg.cli import train

if __name__ == "__main__":
    train()
