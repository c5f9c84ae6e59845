"""Sweeps: one job per combination, failures isolated, Optuna studies, reports, SLURM launcher."""

import csv
import json
import os
import runpy
import statistics
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from medseg.sweeps import summarize_sweep, write_job_result

from .conftest import CONFIG_DIR, REPO, run_script, tiny_overrides

# one batch of everything; debug configs have no callbacks or loggers
FAST = ["debug=fast_dev_run"]


def sweep(tmp_path: Path, phantom_root: Path, *args: str, task: str = "debug"):
    """Run `train.py -m` on the tiny phantom; returns (result, multirun folder)."""
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
    overrides = [o for o in overrides if not o.startswith("model.width")]
    result = run_script("train.py", "-m", *overrides, *args)
    folders = list((tmp_path / "logs" / task / "multiruns").iterdir())
    assert len(folders) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    return result, folders[0]


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_by_two_sweep_with_a_failing_value_runs_every_job_and_summarizes(
    tmp_path, phantom_root
):
    result, folder = sweep(tmp_path, phantom_root, "model.width=4,abc", "seed=1,2", *FAST)
    assert result.returncode == 1  # a job failed: reported after all jobs ran
    jobs = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    assert (folder / "0" / "test_metrics.csv").is_file()
    assert (folder / "1" / "test_metrics.csv").is_file()
    failed = json.loads((folder / "2" / "result.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"] == "ConfigError: model.width must be a positive integer, got 'abc'"
    assert "model.width must be a positive integer" in (folder / "2" / "debug.log").read_text()

    rows = read_csv(folder / "sweep_jobs.csv")
    assert [(r["job"], r["model.width"], r["seed"], r["status"]) for r in rows] == [
        ("0", "4", "1", "completed"),
        ("1", "4", "2", "completed"),
        ("2", "abc", "1", "failed"),
        ("3", "abc", "2", "failed"),
    ]
    columns = list(rows[0])
    assert columns[:4] == ["job", "status", "model.width", "seed"] and columns[-1] == "error"
    assert {"val/dice_mean", "test/dice_mean", "test/dice_liver"} <= set(columns)
    for row in rows[:2]:
        result_json = json.loads((folder / row["job"] / "result.json").read_text())
        assert float(row["test/dice_mean"]) == result_json["metrics"]["test/dice_mean"]

    configs = read_csv(folder / "sweep_configs.csv")
    assert [(c["model.width"], c["jobs"], c["failed"], c["seeds"]) for c in configs] == [
        ("4", "2", "0", "1 2"),
        ("abc", "2", "2", ""),
    ]
    scores = [float(r["val/dice_mean"]) for r in rows[:2]]
    assert float(configs[0]["val/dice_mean mean"]) == pytest.approx(statistics.fmean(scores))
    assert float(configs[0]["val/dice_mean std"]) == pytest.approx(statistics.stdev(scores))
    markdown = (folder / "sweep_summary.md").read_text()
    assert "4 jobs: 2 completed, 2 failed, 0 incomplete." in markdown
    assert "![val/dice_mean per configuration](sweep_plot.png)" in markdown
    assert (folder / "sweep_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_study_runs_trials_and_reports_the_best(tmp_path, phantom_root):
    result, folder = sweep(
        tmp_path, phantom_root, "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    rows = read_csv(folder / "sweep_jobs.csv")
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert best["best_value"] == pytest.approx(max(float(r["val/dice_mean"]) for r in rows))
    assert set(best["best_params"]) == {
        "model.width",
        "model.optimizer.lr",
        "loss.dice_weight",
        "data.augmentation",
    }


def test_local_ddp_inside_a_multirun_is_refused(tmp_path, phantom_root):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    result, folder = sweep(tmp_path, phantom_root, *FAST, *ddp)
    assert result.returncode == 1
    error = json.loads((folder / "0" / "result.json").read_text())["error"]
    assert "cannot run inside a local multirun" in error


def fake_sweep(folder: Path, jobs: list[tuple[list[str], str, dict]]) -> Path:
    for number, (overrides, status, metrics) in enumerate(jobs):
        job = folder / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if status != "incomplete":
            error = "boom" if status == "failed" else None
            write_job_result(job, status, metrics, error)
    return folder


def test_summary_means_and_stds_over_seeds(tmp_path):
    folder = fake_sweep(
        tmp_path / "sweep",
        [
            (["loss.dice_weight=0.5", "seed=1", "debug=x"], "completed", {"val/dice_mean": 0.5}),
            (["loss.dice_weight=0.5", "seed=2", "debug=x"], "completed", {"val/dice_mean": 0.7}),
            (["loss.dice_weight=0.5", "seed=3", "debug=x"], "failed", {}),
            (["loss.dice_weight=1.0", "seed=1", "debug=x"], "completed", {"val/dice_mean": 0.8}),
            (["loss.dice_weight=1.0", "seed=2", "debug=x"], "incomplete", {}),
        ],
    )
    written = summarize_sweep(folder, metric="val/dice_mean")
    assert sorted(written) == [
        "sweep_configs.csv",
        "sweep_jobs.csv",
        "sweep_plot.png",
        "sweep_summary.md",
    ]
    configs = read_csv(folder / "sweep_configs.csv")
    assert list(configs[0]) == [
        "loss.dice_weight",
        "jobs",
        "failed",
        "seeds",
        "val/dice_mean mean",
        "val/dice_mean std",
    ]
    assert (
        configs[0]["jobs"] == "3" and configs[0]["failed"] == "1" and configs[0]["seeds"] == "1 2"
    )
    assert float(configs[0]["val/dice_mean mean"]) == pytest.approx(0.6)
    assert float(configs[0]["val/dice_mean std"]) == pytest.approx(0.1414213562)
    assert float(configs[1]["val/dice_mean mean"]) == pytest.approx(0.8)
    assert configs[1]["val/dice_mean std"] == "nan"  # one completed job: no spread
    statuses = [r["status"] for r in read_csv(folder / "sweep_jobs.csv")]
    assert statuses == ["completed", "completed", "failed", "completed", "incomplete"]
    markdown = (folder / "sweep_summary.md").read_text()
    assert "5 jobs: 3 completed, 1 failed, 1 incomplete." in markdown
    assert "Common overrides: `debug=x`" in markdown
    assert "| 0.5 | 3 | 1 | 1 2 | 0.6000 ± 0.1414 |" in markdown


def test_summarize_script(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "scripts" / "summarize_sweep.py"))
    folder = fake_sweep(tmp_path / "sweep", [(["seed=1"], "completed", {"val/dice_mean": 0.5})])
    assert script["main"]([str(folder)]) == 0
    assert "1 jobs: 1 completed" in capsys.readouterr().out
    assert script["main"]([str(tmp_path / "sweep" / "0")]) == 1
    assert "no job folders" in capsys.readouterr().err


def test_slurm_launcher_config_gives_a_valid_sbatch_script(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        f"paths.root_dir={tmp_path}",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4

    # submitit refuses to build a SLURM executor where `srun` is missing: give it a dummy.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    # As the Hydra launcher does: generic keys as they are, the others prefixed "slurm_".
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"_target_", "submitit_folder", "max_num_timeout"}
    executor.update_parameters(
        **{
            key if key in generic else f"slurm_{key}": value
            for key, value in launcher.items()
            if key not in skip
        }
    )
    script = executor._executor._make_submission_file_text("python -m job", "0")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=1440",
    ):
        assert line in script


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_in_their_own_processes(tmp_path, phantom_root):
    result, folder = sweep(
        tmp_path, phantom_root, "hydra/launcher=submitit_local", "model.width=4,abc", *FAST
    )
    assert result.returncode == 1
    rows = read_csv(folder / "sweep_jobs.csv")
    assert [(r["model.width"], r["status"]) for r in rows] == [
        ("4", "completed"),
        ("abc", "failed"),
    ]
    assert list((folder / ".submitit").iterdir())
