"""Loader time per batch: medseg's cached patch pipeline vs a stock TorchIO Queue vs numpy.

Usage: python scripts/bench_loader.py [--cases 4] [--epochs 3] [--patch 64 64 64]
       [--batch-size 2] [--augmentation default] [--sizes 96x96x96 256x256x160]

For each volume size, writes synthetic CT cases (HU, int16, 1 mm, liver-like organ and
lesions) as .nii.gz in a temporary folder, then measures in one process, with augmentation
on and no worker processes, on one thread as a DataLoader worker runs. Loader figures are the
CPU time a batch costs (process time: what a worker spends; unlike wall time it does not
grow when other processes share the CPU):

- stock (nii.gz): a TorchIO Queue with a LabelSampler over the NIfTI files, preprocessing
  and augmenting whole volumes at each load (TorchIO RandomAffine with the preset's
  parameters plus the preset's other transforms);
- stock (in RAM): the same with volumes preprocessed once and kept in memory;
- numpy memmap: random crops of a memory-mapped .npy volume (no augmentation): the floor;
- medseg: SegmentationDataModule.train_dataloader() over the Zarr cache (prepared first,
  timed separately);
- the bf16 training step (forward, deep-supervision loss, backward, SGD step) of the
  default model (configs/model/resse_unet_tiny.yaml) on one batch of patches. The reference
  is its CPU time on one thread divided by the threads torch uses (the fastest the step can
  run with all of them: it errs against the loader); the wall time of the fastest of
  --step-repeats steps on all threads is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from hydra import compose, initialize_config_dir

from medseg.cli import config_dir
from medseg.data.augment import build_augmentation
from medseg.data.cache import cache_size_bytes
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.preprocess import build_preprocessing, preprocess_settings
from medseg.losses import deep_supervision_loss
from medseg.module import build_module
from medseg.trusted import trusted_instantiate
from medseg.utils.config import register_resolvers

LABELS = {"0": "background", "1": "organ", "2": "lesion"}
PROBABILITIES = {0: 0.2, 1: 0.3, 2: 0.5}
PREPROCESS = {"intensity": {"mode": "ct_window", "window": [-160, 240]}}


def synthetic_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A body ellipse (soft tissue) in air with an organ and a few lesions, in HU."""
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 for n in shape]
    body = sum(((a - c) / (0.45 * n)) ** 2 for a, c, n in zip(axes, centre, shape, strict=True))
    organ_centre = [c + rng.uniform(-0.1, 0.1) * n for c, n in zip(centre, shape, strict=True)]
    organ = sum(
        ((a - c) / (0.22 * n)) ** 2 for a, c, n in zip(axes, organ_centre, shape, strict=True)
    )
    label = np.zeros(shape, np.uint8)
    label[organ < 1] = 1
    for _ in range(3):
        spot = [c + rng.uniform(-0.08, 0.08) * n for c, n in zip(organ_centre, shape, strict=True)]
        radius = 0.03 * min(shape)
        lesion = sum(((a - c) / radius) ** 2 for a, c in zip(axes, spot, strict=True)) < 1
        label[lesion & (label == 1)] = 2
    image = np.where(body < 1, 40.0, -1000.0)
    image[label == 1] = 60
    image[label == 2] = 20
    image += rng.normal(0, 15, shape)
    return image.astype(np.int16), label


def write_dataset(root: Path, shape: Sequence[int], num_cases: int) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "memmap").mkdir()
    rng = np.random.default_rng(0)
    for index in range(num_cases):
        image, label = synthetic_case(shape, rng)
        name = f"case_{index:03d}"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        normalized = np.clip((image.astype(np.float32) + 160) / 200 - 1, -1, 1)
        np.save(root / "memmap" / f"{name}.npy", normalized[None])
    meta = {"labels": LABELS, "modality": {"0": "CT"}}
    (root / "dataset.json").write_text(json.dumps(meta))


def per_batch(batches: Callable[[], int]) -> float:
    """CPU seconds per batch of one call that produces ``batches()`` batches."""
    start = time.process_time()
    count = batches()
    return (time.process_time() - start) / count


def stock_augmentation(preset: str) -> tio.Compose:
    """The preset as TorchIO transforms on whole volumes (RandomAffine for the spatial part)."""
    augmentation = build_augmentation(preset)
    transforms = []
    spatial = augmentation.spatial
    if spatial is not None:
        transforms.append(
            tio.RandomAffine(scales=spatial.scales, degrees=spatial.degrees, p=spatial.probability)
        )
    if augmentation.transforms is not None:
        transforms += augmentation.transforms.transforms
    return tio.Compose(transforms)


def stock_queue_seconds(subjects, transform, args, epochs: int) -> float:
    dataset = tio.SubjectsDataset(subjects, transform=transform)
    queue = tio.Queue(
        dataset,
        max_length=args.queue_length,
        samples_per_volume=args.samples_per_volume,
        sampler=tio.LabelSampler(args.patch, "label", PROBABILITIES),
        num_workers=0,
    )
    loader = torch.utils.data.DataLoader(
        queue, batch_size=args.batch_size, collate_fn=lambda patches: patches
    )
    return per_batch(lambda: sum(1 for _ in range(epochs) for _ in loader))


def memmap_seconds(root: Path, ids: Sequence[str], args, batches: int) -> float:
    volumes = [np.load(root / "memmap" / f"{i}.npy", mmap_mode="r") for i in ids]
    rng = np.random.default_rng(0)
    patch = np.asarray(args.patch)

    def crops() -> int:
        for _ in range(batches):
            batch = []
            for _ in range(args.batch_size):
                volume = volumes[rng.integers(len(volumes))]
                corner = [
                    rng.integers(0, n - p + 1) for n, p in zip(volume.shape[1:], patch, strict=True)
                ]
                box = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
                batch.append(torch.from_numpy(np.array(volume[(slice(None), *box)])))
            torch.stack(batch)
        return batches

    return per_batch(crops)


def training_step_seconds(args, repeats: int) -> tuple[float, float]:
    """A bf16 training step of the default model, as the trainer runs it: (CPU seconds on
    one thread, wall seconds on all threads), each the fastest of ``repeats``."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_epochs=1"])
    module = build_module(
        cfg.model, cfg.stage, cfg.loss, 1, {int(k): v for k, v in LABELS.items()}, args.patch
    )
    net = next(iter(module.nets.values()))  # the default stage config has one stage
    optimizer = trusted_instantiate(module.hparams.optimizer, "optimizer", "model.optimizer")(
        params=net.parameters()
    )
    image = torch.randn(args.batch_size, 1, *args.patch)
    target = torch.randint(0, 3, (args.batch_size, 1, *args.patch))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = deep_supervision_loss(module.loss, net(image), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    threads = torch.get_num_threads()
    cpu, wall = [], []
    for count in (1, threads):
        torch.set_num_threads(count)
        step()  # warms up oneDNN for this thread count
        for _ in range(repeats):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            step()
            (cpu if count == 1 else wall).append(
                time.process_time() - start_cpu if count == 1 else time.perf_counter() - start_wall
            )
    return min(cpu), min(wall)


def bench_size(shape, args, step: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as folder:
        root = Path(folder) / "data"
        write_dataset(root, shape, args.cases)
        dm = SegmentationDataModule(
            root,
            preprocess=PREPROCESS,
            cache_dir=Path(folder) / "cache",
            patch_size=args.patch,
            batch_size=args.batch_size,
            samples_per_volume=args.samples_per_volume,
            queue_length=args.queue_length,
            num_workers=0,
            label_probabilities=PROBABILITIES,
            augmentation=args.augmentation,
            test_fraction=0.0,
            num_folds=2,
        )
        start = time.perf_counter()
        dm.prepare_data()
        prepare = (time.perf_counter() - start) / args.cases
        dm.setup("fit")
        train_ids = list(dm.split.train)
        torch.manual_seed(0)
        ours = per_batch(lambda: sum(1 for _ in range(args.epochs) for _ in dm.train_dataloader()))

        preprocessing = build_preprocessing(**preprocess_settings(PREPROCESS))
        augmentation = stock_augmentation(args.augmentation)
        files = [
            tio.Subject(
                image=tio.ScalarImage(root / "imagesTr" / f"{i}.nii.gz"),
                label=tio.LabelMap(root / "labelsTr" / f"{i}.nii.gz"),
            )
            for i in train_ids
        ]
        stock_files = stock_queue_seconds(
            files, tio.Compose([preprocessing, augmentation]), args, epochs=1
        )
        in_ram = [preprocessing(s) for s in files]
        for subject in in_ram:
            subject.load()
        stock_ram = stock_queue_seconds(in_ram, augmentation, args, epochs=1)
        memmap = memmap_seconds(root, train_ids, args, batches=50)
        return {
            "shape": "x".join(map(str, shape)),
            "prepare_s_per_case": prepare,
            "cache_mb": cache_size_bytes(dm.cache_root) / 1e6,
            "stock_files": stock_files,
            "stock_ram": stock_ram,
            "memmap": memmap,
            "ours": ours,
            "step": step,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of medseg's loader")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--samples-per-volume", type=int, default=8)
    parser.add_argument("--queue-length", type=int, default=16)
    parser.add_argument("--augmentation", default="default")
    parser.add_argument("--sizes", nargs="+", default=["96x96x96", "256x256x160"])
    parser.add_argument("--step-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    register_resolvers()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    step_cpu, step_wall = training_step_seconds(args, args.step_repeats)
    step = step_cpu / threads
    torch.set_num_threads(1)  # as torch.utils.data workers do
    rows = [bench_size([int(n) for n in s.split("x")], args, step) for s in args.sizes]

    patch = "x".join(map(str, args.patch))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nload average {load} on {os.cpu_count()} CPUs\n"
        f"bf16 training step of the default model on a batch of {args.batch_size} x {patch}: "
        f"{step_cpu * 1e3:.0f} ms CPU on 1 thread -> reference {step * 1e3:.0f} ms on "
        f"{threads} threads (measured wall: {step_wall * 1e3:.0f} ms)\n"
        f"loader CPU time per batch, augmentation '{args.augmentation}', 1 thread, no workers:"
    )
    header = (
        f"{'volume':>12} {'stock nii.gz':>13} {'stock in RAM':>13} {'numpy memmap':>13} "
        f"{'medseg':>8} {'% of step':>10} {'vs nii.gz':>10} {'vs RAM':>7} {'prepare/case':>13}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['shape']:>12} {r['stock_files'] * 1e3:>10.1f} ms {r['stock_ram'] * 1e3:>10.1f} ms "
            f"{r['memmap'] * 1e3:>10.2f} ms {r['ours'] * 1e3:>5.1f} ms "
            f"{100 * r['ours'] / r['step']:>9.1f}% {r['stock_files'] / r['ours']:>9.1f}x "
            f"{r['stock_ram'] / r['ours']:>6.1f}x {r['prepare_s_per_case']:>11.2f} s"
        )
    first, last = rows[0], rows[-1]
    growth = last["ours"] / first["ours"]
    checks = [
        (
            "loader <= 5% of the training step at every size",
            all(r["ours"] <= 0.05 * r["step"] for r in rows),
        ),
        (f"per-patch cost grows <= 1.5x ({growth:.2f}x)", growth <= 1.5),
        (
            f">= 5x faster than the stock Queue at {last['shape']} "
            f"({last['stock_files'] / last['ours']:.1f}x)",
            last["stock_files"] >= 5 * last["ours"],
        ),
    ]
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
