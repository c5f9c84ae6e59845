"""Predict images: `python src/predict.py ckpt_path=<ckpt> input=<path> output=<dir>`."""

from medseg.cli import predict

if __name__ == "__main__":
    predict()
