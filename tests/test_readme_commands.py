"""Every command line of README.md's ```bash blocks, as a user types it.

The commands run in a copy of the repository (its tracked and new files, with `shared`
beside it as in our workspace), with the project environment's `python` and `medseg-*`
scripts first on PATH importing the copy's code, and nothing else set: no MEDSEG_ROOT, no
path overrides. Training commands get only `debug=fast_dev_run` or tiny limits added.
Placeholders (`<ckpt>`, `/data/Task03_Liver`, ...) are filled with what earlier commands
produced, or with tiny datasets written here.

- Each command is either run (RUNS) or listed with the reason it is not (NOT_RUN): a new
  README command fails `test_every_readme_command_is_handled` until it is handled.
- `test_readme_command_composes` composes and resolves every Hydra command's config
  exactly as typed, one config per job of a sweep (what `--cfg job` shows for one run).
- `test_readme_command_runs` runs them. Most take a minute or more on a CPU and are marked
  slow; CI runs the README's sweep (`-m model.width=8,16 seed=1,2,3`, six fast_dev_run jobs
  from a fresh checkout: the phantom and its cache are made first) and the prepare of a
  dataset.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import pytest
import zarr
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from medseg.data.phantom import write_phantom_dataset
from tests.conftest import REPO, TINY_PHANTOM

README = REPO / "README.md"

# What a training command may get added: one batch of everything (runs land in
# logs/debug/...), or one short epoch when a later command needs the run's checkpoint.
FAST = ("debug=fast_dev_run",)
LIMITS = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
)
# A run continued from such a checkpoint: one more short epoch.
ONE_MORE_EPOCH = ("trainer.max_epochs=2", *LIMITS[1:])

# Config of each Hydra entry point.
ENTRY_POINTS = {
    "src/train.py": "train",
    "src/eval.py": "eval",
    "src/predict.py": "predict",
    "scripts/prepare.py": "prepare",
    "medseg-train": "train",
    "medseg-eval": "eval",
    "medseg-predict": "predict",
    "medseg-prepare": "prepare",
}

# Commands these tests do not run, and why. Hydra commands among them are still composed.
NOT_RUN = {
    "make train": "sets up a venv, then 15 epochs on the phantom (~6 min); the run it makes "
    "(`python src/train.py`) is run below with tiny limits",
    "make test": "runs this suite (recursive); CI runs it",
    "make test-all": "runs this suite with the slow tests (recursive)",
    "make lint": "CI's lint job; from the copy, make would first reinstall the environment",
    ".venv/bin/pre-commit install": "installs git hooks into the checkout",
    '.venv/bin/pip install -e ".[bench]"': "installs packages (MONAI)",
    ".venv/bin/python scripts/bench_inference.py --repeats 5": "a benchmark of minutes; needs "
    "MONAI from the bench extra",
    "python scripts/bench_loader.py": "a benchmark (~3 min)",
    "python src/train.py trainer=gpu": "needs a CUDA GPU; on a CPU-only machine Lightning "
    "stops with 'No supported gpu backend found!'",
    "python src/train.py trainer=gpu trainer.precision=16-mixed": "needs a CUDA GPU",
    "python src/train.py -m hparams_search=optuna hydra.sweeper.n_trials=40": "the study run "
    "below with twice the trials (~8 min of fast_dev_run trials)",
    "python src/train.py -m hydra/launcher=slurm trainer=ddp trainer.devices=4 "
    "hydra.launcher.gpus_per_node=4 hydra.launcher.partition=<partition> seed=1,2,3": "submits "
    "jobs to a SLURM cluster with GPUs",
}

# Values that stand in for placeholders when a command is only composed.
EXAMPLE_VALUES = {
    "<run>": "2026-01-01_00-00-00_000000",
    "<ckpt>": "logs/train/runs/2026-01-01_00-00-00_000000/checkpoints/last.ckpt",
    "<file or folder>": "scans/",
    "<folder>": "out/",
    "<predictions>": "out/",
    "<labels>": "data/phantom/labelsTr",
    "<partition>": "gpu",
    "<same overrides>": "",
    "<time>": "2026-01-01_00-00-00_000000",
}

# Example dataset folders of the README, each filled with a copy of the tiny phantom.
EXAMPLE_DATASETS = (
    "/data/Task03_Liver",
    "/data/My Scans/Task03 Liver",
    "/data/Müller/Leber",
    "/data/Site A",
    "/data/Site B",
)


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            command = re.sub(r"(^|\s)#.*$", "", line).strip()
            if command:
                commands.append(command)
    return list(dict.fromkeys(commands))


def hydra_entry(argv: list[str]) -> tuple[str, list[str], bool] | None:
    """(config name, overrides, multirun) of a Hydra command line, else None."""
    if argv[0] == "python" and len(argv) > 1 and argv[1] in ENTRY_POINTS:
        name, args = ENTRY_POINTS[argv[1]], argv[2:]
    elif argv[0] in ENTRY_POINTS:
        name, args = ENTRY_POINTS[argv[0]], argv[1:]
    else:
        return None
    multirun = "-m" in args or "--multirun" in args
    return name, [a for a in args if a not in ("-m", "--multirun")], multirun


def sweep_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of each job Hydra's basic sweeper launches (one job without -m)."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


# ---------------------------------------------------------------------------------------
# Running commands in a copy of the repository


@dataclass
class Outcome:
    """A README command as it ran: the filled command, its result and the run folders
    (logs/<task>/runs/*) and multirun folders (logs/<task>/multiruns/*) it created."""

    command: str
    result: subprocess.CompletedProcess
    runs: list[Path]
    sweeps: list[Path]

    @property
    def console(self) -> str:
        return (self.result.stdout + self.result.stderr)[-6000:]

    @property
    def run(self) -> Path:
        assert len(self.runs) == 1, f"{self.command} made run folders {self.runs}"
        return self.runs[0]

    @property
    def sweep(self) -> Path:
        assert len(self.sweeps) == 1, f"{self.command} made multirun folders {self.sweeps}"
        return self.sweeps[0]


Fill = Callable[["Workspace"], str]


@dataclass(frozen=True)
class Run:
    """How a README command is run for real: what is added to it, which placeholders are
    filled otherwise than by DEFAULT_FILL, the README commands whose results it needs first,
    and what it must have written (checked after exit status 0)."""

    check: Callable[[Workspace, Outcome], None]
    add: tuple[str, ...] = ()
    fill: Mapping[str, Fill] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    ci: bool = False


class Workspace:
    """A copy of the repository in which README commands run, each at most once."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "repo"
        self.outcomes: dict[str, Outcome] = {}
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
        for name in filter(None, files):
            if (REPO / name).is_file():
                (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, self.repo / name)
        if (REPO.parent / "shared").is_dir():
            (root / "shared").symlink_to(REPO.parent / "shared")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MEDSEG_ROOT"}
        bin_dir = Path(sys.executable).parent  # the environment's python and medseg-* scripts
        return env | {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(self.repo / "src"),
            "HYDRA_FULL_ERROR": "0",
        }

    def outcome(self, command: str) -> Outcome:
        """Run the README command (and what it needs first) once; its outcome."""
        if command not in self.outcomes:
            spec = RUNS[command]
            for needed in spec.after:
                self.succeeded(needed, command)
            self.outcomes[command] = self.run(self.fill(command, spec.fill), spec.add)
        return self.outcomes[command]

    def succeeded(self, command: str, needed_by: str) -> Outcome:
        outcome = self.outcome(command)
        if outcome.result.returncode != 0:
            pytest.fail(f"{command!r}, needed by {needed_by!r}, failed:\n{outcome.console}")
        return outcome

    def fill(self, command: str, fills: Mapping[str, Fill]) -> str:
        for text, value in ({**DEFAULT_FILL, **fills}).items():
            if text in command:
                command = command.replace(text, value(self))
        assert not re.search(r"<[a-z ]+>", command), f"unfilled placeholder in {command!r}"
        return command

    def run(self, command: str, add: tuple[str, ...] = ()) -> Outcome:
        before = self._log_folders()
        line = " ".join([command, *map(shlex.quote, add)])
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=self.repo,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        new = sorted(self._log_folders() - before)
        runs = [p for p in new if p.parent.name == "runs"]
        sweeps = [p for p in new if p.parent.name == "multiruns"]
        return Outcome(line, result, runs, sweeps)

    def _log_folders(self) -> set[Path]:
        return set((self.repo / "logs").glob("*/runs/*")) | set(
            (self.repo / "logs").glob("*/multiruns/*")
        )

    def dataset(self, readme_path: str) -> str:
        """A copy of the tiny phantom at the README's example dataset path (under tmp)."""
        tiny = write_phantom_dataset(self.root / "tiny_phantom", **TINY_PHANTOM)
        target = self.root / "datasets" / readme_path.removeprefix("/data/")
        if not target.exists():
            shutil.copytree(tiny, target)
        return str(target)

    def scans(self) -> str:
        """`scans/` of the prediction examples: two images of the phantom."""
        self.succeeded(TRAIN, "scans/")
        scans = self.repo / "scans"
        scans.mkdir(exist_ok=True)
        for image in sorted((self.repo / "data" / "phantom" / "imagesTr").iterdir())[:2]:
            shutil.copy2(image, scans / image.name)
        return "scans/"

    def labels_of_predictions(self) -> str:
        """The phantom's labels of the cases `<predictions>` holds (eval pairs them all)."""
        predictions = self.succeeded(TRAIN, "<labels>").run / "predictions"
        labels = self.root / "labels"
        labels.mkdir(exist_ok=True)
        for prediction in predictions.glob("*.nii.gz"):
            shutil.copy2(self.repo / "data" / "phantom" / "labelsTr" / prediction.name, labels)
        return str(labels)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.repo))


def last_checkpoint(command: str) -> Fill:
    return lambda ws: (
        ws.relative(ws.succeeded(command, "a checkpoint").run) + ("/checkpoints/last.ckpt")
    )


# The commands whose results others use.
TRAIN = "python src/train.py"
CONTINUE = "python src/train.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt"
LIVER_CASCADE = "python src/train.py experiment=liver_cascade"
SWEEP = "python src/train.py -m model.width=8,16 seed=1,2,3"
CONVERT = "python scripts/convert_to_zarr.py data/phantom data/phantom.zarr"

DEFAULT_FILL: dict[str, Fill] = {
    "<run>": lambda ws: ws.succeeded(TRAIN, "<run>").run.name,
    "<ckpt>": last_checkpoint(TRAIN),
    "fold0.ckpt": last_checkpoint(TRAIN),
    "fold1.ckpt": last_checkpoint(CONTINUE),
    "<file or folder>": lambda ws: "data/phantom/imagesTr/phantom_000.nii.gz",
    "<folder>": lambda ws: "predicted/",
    "<predictions>": lambda ws: (
        ws.relative(ws.succeeded(TRAIN, "<predictions>").run) + "/predictions"
    ),
    "<labels>": lambda ws: ws.labels_of_predictions(),
    "<same overrides>": lambda ws: "",  # the run continued had none (only limits added)
    "logs/train/multiruns/<time>": lambda ws: ws.relative(ws.succeeded(SWEEP, "<time>").sweep),
    "scans/": lambda ws: ws.scans(),
    **{path: (lambda ws, path=path: ws.dataset(path)) for path in EXAMPLE_DATASETS},
}


# ---------------------------------------------------------------------------------------
# What each command must have written


def completed(run: Path) -> None:
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed", f"{run}/result.json: {result}"


def assert_test_report(run: Path) -> None:
    """A finished run's test report: predictions, per-case metrics, summary."""
    completed(run)
    for name in ("test_metrics.csv", "test_summary.json"):
        assert (run / name).is_file(), f"{run} has no {name}"
    assert list((run / "predictions").glob("*.nii.gz")), f"{run} has no predictions"


def training_run(ws: Workspace, outcome: Outcome) -> None:
    """A run folder logs/train/runs/<time>/ as the README's table lists it."""
    run = outcome.run
    assert run.parent == ws.repo / "logs" / "train" / "runs"
    assert_test_report(run)
    for name in ("config.yaml", "train.log", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (run / name).is_file(), f"{run} has no {name}"


def debug_run(ws: Workspace, outcome: Outcome) -> None:
    assert outcome.run.parent == ws.repo / "logs" / "debug" / "runs"
    assert_test_report(outcome.run)


def resumed_in_place(ws: Workspace, outcome: Outcome) -> None:
    """`resume=true` with hydra.run.dir: the run folder itself is continued."""
    assert outcome.runs == []
    assert_test_report(ws.succeeded(TRAIN, "resume").run)


def sweep(ws: Workspace, outcome: Outcome) -> None:
    """A multirun folder with one completed job folder per combination, and the report with
    one row per configuration (the jobs that differ only in `seed`)."""
    _, overrides, multirun = hydra_entry(shlex.split(outcome.command))
    expected = len(sweep_jobs(overrides, multirun))
    folder = outcome.sweep
    jobs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == expected, f"{folder}: {[p.name for p in jobs]}, expected {expected}"
    for job in jobs:
        assert_test_report(job)
    for name in ("sweep_jobs.csv", "sweep_configs.csv", "sweep_summary.md"):
        assert (folder / name).is_file(), f"{folder} has no {name}"
    configurations = sweep_jobs([o for o in overrides if not o.startswith("seed=")], multirun)
    with (folder / "sweep_configs.csv").open() as table:
        assert len(list(csv.DictReader(table))) == len(configurations)


def optuna_study(ws: Workspace, outcome: Outcome) -> None:
    folder = outcome.sweep
    assert len([p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]) == 20
    assert (folder / "optimization_results.yaml").is_file()
    assert (folder / "sweep_summary.md").is_file()


def evaluation(ws: Workspace, outcome: Outcome) -> None:
    run = outcome.run
    assert run.parent == ws.repo / "logs" / "eval" / "runs"
    completed(run)
    for name in ("test_metrics.csv", "test_summary.json"):
        assert (run / name).is_file(), f"{run} has no {name}"


def predictions_in(folder: str, *also: str) -> Callable[[Workspace, Outcome], None]:
    """Every input's prediction in `folder`, on the input's grid (and the `also` folders)."""

    def check(ws: Workspace, outcome: Outcome) -> None:
        inputs = shlex.split(outcome.command)
        source = ws.repo / next(a for a in inputs if a.startswith("input=")).split("=", 1)[1]
        images = sorted(source.iterdir()) if source.is_dir() else [source]
        for image in images:
            name = image.name
            written = ws.repo / folder / name
            assert written.is_file(), f"no prediction {written}"
            assert nib.load(written).shape == nib.load(image).shape
            for extra in also:
                assert (ws.repo / folder / extra / name).is_file(), f"no {extra}/{name}"

    return check


def prepared(ws: Workspace, outcome: Outcome) -> None:
    """The dataset's cache with its fingerprint, and the suggested overrides printed."""
    assert "suggested overrides:" in outcome.result.stdout
    caches = [p for p in (ws.repo / "data" / "cache").iterdir() if p.is_dir()]
    root = next(
        c
        for c in caches
        if zarr.open_group(str(c), mode="r").attrs["medseg"]["source"] in outcome.command
    )
    assert (root / "fingerprint.json").is_file()


def converted(ws: Workspace, outcome: Outcome) -> None:
    store = zarr.open_group(str(ws.repo / "data" / "phantom.zarr"), mode="r")
    assert len(list(store.group_keys())) == 30


def summarized(ws: Workspace, outcome: Outcome) -> None:
    folder = ws.repo / shlex.split(outcome.command)[-1]
    for name in ("sweep_jobs.csv", "sweep_configs.csv", "sweep_summary.md"):
        assert (folder / name).is_file(), f"{folder} has no {name}"


RUNS: dict[str, Run] = {
    TRAIN: Run(training_run, LIMITS),
    "python src/train.py model=resse_unet_m trainer.max_epochs=3 data.batch_size=1": Run(
        debug_run, FAST
    ),
    "python src/train.py experiment=phantom_resse_m": Run(debug_run, FAST),
    "python src/train.py data=msd data.root=/data/Task03_Liver "
    "data.preprocess.spacing=[1.5,1.5,1.5]": Run(debug_run, FAST),
    SWEEP: Run(sweep, FAST, ci=True),
    "python src/train.py debug=fast_dev_run": Run(debug_run),
    CONTINUE: Run(training_run, ONE_MORE_EPOCH),
    "python scripts/prepare.py data=msd 'data.root=\"/data/My Scans/Task03 Liver\"'": Run(prepared),
    "python scripts/prepare.py data=msd 'data.root=\"/data/Müller/Leber\"'": Run(prepared),
    'python src/train.py -m data=msd \'data.root="/data/Site A","/data/Site B"\'': Run(sweep, FAST),
    LIVER_CASCADE: Run(training_run, LIMITS),
    "python src/train.py stage=single": Run(debug_run, FAST),
    "python src/train.py experiment=brats_cascade": Run(debug_run, FAST),
    "python src/train.py experiment=liver_cascade finetune.ckpt_path=<ckpt> "
    "finetune.stages=[lesion]": Run(debug_run, FAST, {"<ckpt>": last_checkpoint(LIVER_CASCADE)}),
    "python src/train.py experiment=phantom_multitask": Run(debug_run, FAST),
    "python src/train.py experiment=brats_multitask": Run(debug_run, FAST),
    "python src/eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt": Run(evaluation),
    "python src/eval.py ckpt_path=[fold0.ckpt,fold1.ckpt]": Run(evaluation),
    "python src/eval.py pred_dir=<predictions> label_dir=<labels> "
    'labels="{0: background, 1: liver, 2: lesion}"': Run(evaluation),
    "python src/predict.py ckpt_path=<ckpt> input=<file or folder> output=<folder>": Run(
        predictions_in("predicted")
    ),
    "python src/predict.py ckpt_path=[fold0.ckpt,fold1.ckpt] input=scans/ output=out/": Run(
        predictions_in("out")
    ),
    "python src/predict.py ckpt_path=<ckpt> input=scans/ output=out/ "
    "prediction.mirror_axes=[0,1,2] save_probabilities=true": Run(
        predictions_in("out", "probabilities")
    ),
    "python src/train.py -m model.width=8,16 loss.dice_weight=0.5,1.0 seed=1,2,3": Run(sweep, FAST),
    "python src/train.py -m experiment=liver_cascade,phantom_resse_m seed=1,2,3": Run(sweep, FAST),
    "python src/train.py -m experiment=liver_cascade loss=dice_ce,focal_dice seed=1,2,3": Run(
        sweep, FAST
    ),
    "python src/train.py -m hparams_search=optuna": Run(optuna_study, FAST),
    "python scripts/summarize_sweep.py logs/train/multiruns/<time>": Run(summarized),
    "python src/train.py trainer=ddp": Run(debug_run, FAST),
    "python src/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2": Run(
        debug_run, FAST
    ),
    "python src/train.py <same overrides> ckpt_path=logs/train/runs/<run>/checkpoints/"
    "last.ckpt": Run(training_run, ONE_MORE_EPOCH),
    "python src/train.py <same overrides> hydra.run.dir=logs/train/runs/<run> resume=true": Run(
        resumed_in_place, LIMITS
    ),
    "python scripts/prepare.py data=msd data.root=/data/Task03_Liver": Run(prepared, ci=True),
    CONVERT: Run(converted, after=(TRAIN,)),
    "python src/train.py data=zarr data.root=data/phantom.zarr "
    "data.preprocess.intensity.mode=ct_window ++data.preprocess.intensity.window=[-160,240]": Run(
        debug_run, FAST, after=(CONVERT,)
    ),
    "python src/train.py experiment=phantom_2d": Run(debug_run, FAST),
}

COMMANDS = readme_commands(README.read_text())
HYDRA_COMMANDS = [c for c in COMMANDS if hydra_entry(shlex.split(c)) is not None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"))


def test_every_readme_command_is_handled():
    unhandled = [c for c in COMMANDS if (c in RUNS) == (c in NOT_RUN)]
    assert not unhandled, f"README commands neither run nor listed (or both): {unhandled}"
    stale = sorted((set(RUNS) | set(NOT_RUN)) - set(COMMANDS))
    assert not stale, f"commands no longer in the README: {stale}"


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=HYDRA_COMMANDS)
def test_readme_command_composes(command, workspace, monkeypatch):
    """The config of every job, composed from the copy's configs and resolved in the copy,
    as the command would run it; paths given on the command line arrive unchanged."""
    for text, value in EXAMPLE_VALUES.items():
        command = command.replace(text, value)
    name, overrides, multirun = hydra_entry(shlex.split(command))
    monkeypatch.chdir(workspace.repo)
    with initialize_config_dir(str(workspace.repo / "configs"), version_base="1.3"):
        for job in sweep_jobs(overrides, multirun):
            cfg = compose(name, overrides=job, return_hydra_config=True)
            resolved = resolve_job(cfg, workspace.root / "job", multirun)
            for key, path in command_line_paths(job).items():
                assert OmegaConf.select(resolved, key) == path, key


def command_line_paths(overrides: list[str]) -> dict[str, str]:
    """Config key -> value of the overrides that give a path (outside `hydra`)."""
    paths = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        value, key = override.value(), override.key_or_group
        if isinstance(value, str) and "/" in value and not key.startswith("hydra"):
            paths[key] = value
    return paths


def resolve_job(cfg: DictConfig, output_dir: Path, multirun: bool) -> DictConfig:
    """The job's config resolved as in a run, without the `hydra` node. A sweep's folder is
    resolved first, as Hydra does before any job (and its runtime config) exists."""
    if multirun:
        OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_resolution_failure=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        return OmegaConf.create(OmegaConf.to_container(job, resolve=True))
    finally:
        HydraConfig.instance().cfg = None


def run_params() -> list:
    params = []
    for command in COMMANDS:
        if command not in RUNS:
            continue
        marks = [] if RUNS[command].ci else [pytest.mark.slow]
        if "brats" in command:
            shared = REPO.parent / "shared" / "data" / "brats2013"
            marks.append(pytest.mark.skipif(not shared.is_dir(), reason=f"{shared} is absent"))
        params.append(pytest.param(command, marks=marks, id=command))
    return params


@pytest.mark.parametrize("command", run_params())
def test_readme_command_runs(command, workspace):
    outcome = workspace.outcome(command)
    assert outcome.result.returncode == 0, f"{outcome.command}:\n{outcome.console}"
    assert "Traceback" not in outcome.console, outcome.console
    RUNS[command].check(workspace, outcome)
