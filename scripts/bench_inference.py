"""Benchmark medseg's sliding-window inference against its floor and MONAI's.

Times, in one process on the same volume and network (the default model, resse_unet_tiny):
  - floor: the network's forward pass over the pre-cut windows alone, in the same batches;
  - medseg: ``medseg.inference.sliding_window_inference`` (Gaussian blending);
  - monai: ``monai.inferers.sliding_window_inference`` in Gaussian mode (sigma_scale 0.125).
Methods are interleaved over the repeats so that load from other processes hits them alike;
the median and the minimum are printed with the ratios to the floor, then the same ratio
measured inside each call (total time / time spent in the network; immune to load that
changes between calls on a shared machine), the largest difference
between medseg's and MONAI's outputs, and each method's peak resident memory above the
process's memory before it ran (sampled every millisecond).

Needs the `bench` extra (MONAI): pip install -e ".[bench]"

    python scripts/bench_inference.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference as monai_sliding_window
from omegaconf import OmegaConf

from medseg.inference import sliding_window_inference, window_starts
from medseg.models.unet import ResidualSEUNet
from medseg.module import TRAINING_KEYS

SHAPE = (192, 192, 96)
WINDOW = (64, 64, 64)
OVERLAP = 0.5
BATCH = 4
NUM_CLASSES = 3
MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "resse_unet_tiny.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")


def default_network() -> ResidualSEUNet:
    """The default model's network (its config minus the training-only keys)."""
    config = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIG))
    network = {k: v for k, v in config.items() if k not in ("defaults", *TRAINING_KEYS)}
    return ResidualSEUNet(1, NUM_CLASSES, **network).eval()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


class PeakMemory:
    """Peak resident memory above the level at entry, sampled by a thread every millisecond."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = default_network()
    image = torch.randn(1, 1, *SHAPE)

    corners = list(
        itertools.product(
            *(window_starts(s, w, OVERLAP) for s, w in zip(SHAPE, WINDOW, strict=True))
        )
    )
    windows = [
        image[(..., *(slice(c, c + w) for c, w in zip(corner, WINDOW, strict=True)))]
        for corner in corners
    ]
    batches = [torch.cat(windows[i : i + BATCH]) for i in range(0, len(windows), BATCH)]

    def floor() -> torch.Tensor:
        for batch in batches:
            out = net(batch)
        return out

    network_seconds = {"medseg": 0.0, "monai": 0.0}

    def timed(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network, adding the time spent inside it to `network_seconds[name]`."""

        def run(batch: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = net(batch)
            network_seconds[name] += time.perf_counter() - start
            return out

        return run

    def medseg() -> torch.Tensor:
        return sliding_window_inference(
            image, timed("medseg"), WINDOW, overlap=OVERLAP, batch_size=BATCH
        )

    def monai() -> torch.Tensor:
        return monai_sliding_window(
            image,
            WINDOW,
            BATCH,
            timed("monai"),
            overlap=OVERLAP,
            mode="gaussian",
            sigma_scale=0.125,
        )

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "floor": floor,
        "medseg": medseg,
        "monai": monai,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    memory: dict[str, float] = dict.fromkeys(methods, 0.0)
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, method in methods.items():  # warm-up: oneDNN picks its kernels on first use
            outputs[name] = method()
        network_seconds.update(medseg=0.0, monai=0.0)
        for _ in range(args.repeats):
            for name, method in methods.items():
                with PeakMemory() as peak:
                    start = time.perf_counter()
                    method()
                    times[name].append(time.perf_counter() - start)
                memory[name] = max(memory[name], peak.extra_mib)

    difference = (outputs["medseg"] - outputs["monai"]).abs().max().item()
    print(
        f"volume {SHAPE}, window {WINDOW}, overlap {OVERLAP}, batch {BATCH}: "
        f"{len(windows)} windows in {len(batches)} batches; network resse_unet_tiny "
        f"({sum(p.numel() for p in net.parameters()):,} parameters), float32, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats, torch {torch.__version__}"
    )
    floor_median = statistics.median(times["floor"])
    floor_min = min(times["floor"])
    print(
        f"{'method':<8} {'median s':>9} {'min s':>8} {'median/floor':>13} {'min/floor':>10} "
        f"{'peak MiB':>9}"
    )
    for name in methods:
        median, best = statistics.median(times[name]), min(times[name])
        print(
            f"{name:<8} {median:>9.3f} {best:>8.3f} {median / floor_median:>13.3f} "
            f"{best / floor_min:>10.3f} {memory[name]:>9.1f}"
        )
    # The same ratio measured inside each call (immune to load changing between calls):
    # total time over the time spent in the network during that call.
    for name in ("medseg", "monai"):
        share = sum(times[name]) / network_seconds[name]
        print(f"{name}: total / network time within the same calls = {share:.3f}")
    print(
        f"max |medseg - monai| = {difference:.2e} (output range {outputs['monai'].min():.2f} "
        f"to {outputs['monai'].max():.2f})"
    )


if __name__ == "__main__":
    main()
