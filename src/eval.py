"""Evaluate a checkpoint on the test split: `python src/eval.py ckpt_path=<ckpt>`."""

from medseg.cli import evaluate

if __name__ == "__main__":
    evaluate()
