"""Sweep reports: what each job ran and scored, and how configurations compare over seeds.

Every run folder gets a ``result.json`` (status, final metrics, error) from the entry point.
:func:`summarize_sweep` reads the job folders of a multirun (``<job>/.hydra/overrides.yaml``
and ``<job>/result.json``) and writes, into the multirun folder:

- ``sweep_jobs.csv``: one row per job: its overrides that vary across the sweep, its status
  (completed, failed, or incomplete when it has no result yet), its final metrics, its error;
- ``sweep_configs.csv``: one row per configuration (jobs that differ only in ``seed``): the
  number of jobs, failures and seeds, and mean and sample std of every metric over its
  completed jobs;
- ``sweep_summary.md``: both tables in Markdown, with the overrides common to all jobs;
- ``sweep_plot.png``: the sweep's metric per configuration (each job a dot, mean ± std).

:class:`SweepSummaryCallback` (a Hydra callback, see configs/hydra/default.yaml) rewrites the
report after every job, so it is there even when a sweep is cut short.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from medseg.utils.io import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SEED_KEY = "seed"


def write_job_result(
    output_dir: str | Path,
    status: str,
    metrics: Mapping[str, float] | None = None,
    error: str | None = None,
) -> Path:
    """``result.json`` of a run: status (completed / failed), final metrics, error message."""
    result = {"status": status, "metrics": dict(metrics or {}), "error": error}
    text = json.dumps(result, indent=2, allow_nan=True) + "\n"
    return atomic_write_text(Path(output_dir) / RESULT_FILE, text)


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float]
    error: str | None


@dataclass
class SweepSummary:
    jobs: list[Job]
    varying: list[str]
    common: dict[str, str]
    metrics: list[str]
    configs: list[dict[str, Any]]


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """The jobs of a multirun folder, in job-number order."""
    folders = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    folders.sort(key=lambda p: (len(p.name), p.name))  # job numbers: 0, 1, ..., 10
    jobs = []
    for folder in folders:
        overrides = _parse_overrides(yaml.safe_load((folder / ".hydra/overrides.yaml").read_text()))
        result_path = folder / RESULT_FILE
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        jobs.append(
            Job(
                name=folder.name,
                overrides=overrides,
                status=result.get("status", "incomplete"),
                metrics={k: float(v) for k, v in result.get("metrics", {}).items()},
                error=result.get("error"),
            )
        )
    return jobs


def _parse_overrides(overrides: Sequence[str] | None) -> dict[str, str]:
    parsed = OverridesParser.create().parse_overrides(list(overrides or []))
    return {
        (o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"): (
            o.get_value_element_as_str()
        )
        for o in parsed
    }


def build_summary(jobs: Sequence[Job]) -> SweepSummary:
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    common = {
        k: jobs[0].overrides[k]
        for k in keys
        if all(job.overrides.get(k) == jobs[0].overrides.get(k) for job in jobs)
    }
    varying = [k for k in keys if k not in common]
    metrics = sorted({m for job in jobs for m in job.metrics})
    grouping = [k for k in varying if k != SEED_KEY]
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.overrides.get(k, "") for k in grouping), []).append(job)
    configs = []
    for values, members in groups.items():
        done = [job for job in members if job.status == "completed"]
        row: dict[str, Any] = dict(zip(grouping, values, strict=True))
        row["jobs"] = len(members)
        row["failed"] = sum(job.status == "failed" for job in members)
        row["seeds"] = " ".join(job.overrides.get(SEED_KEY, "-") for job in done)
        for metric in metrics:
            scores = [job.metrics[metric] for job in done if metric in job.metrics]
            scores = [s for s in scores if not math.isnan(s)]
            row[f"{metric} mean"] = statistics.fmean(scores) if scores else math.nan
            row[f"{metric} std"] = statistics.stdev(scores) if len(scores) > 1 else math.nan
        configs.append(row)
    return SweepSummary(list(jobs), varying, common, metrics, configs)


def job_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    rows = []
    for job in summary.jobs:
        row: dict[str, Any] = {"job": job.name, "status": job.status}
        row |= {k: job.overrides.get(k, "") for k in summary.varying}
        row |= {m: job.metrics.get(m, math.nan) for m in summary.metrics}
        row["error"] = job.error or ""
        rows.append(row)
    return rows


def summarize_sweep(sweep_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Write the sweep report into `sweep_dir`; returns the written files by name.

    Args:
        sweep_dir: a multirun folder (``logs/<task>/multiruns/<time>``).
        metric: the metric to plot; by default the jobs' ``optimized_metric``.
    """
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (<job>/.hydra/overrides.yaml)")
    summary = build_summary(jobs)
    metric = metric or _optimized_metric(sweep_dir, jobs)
    written = {
        "sweep_jobs.csv": atomic_write_text(sweep_dir / "sweep_jobs.csv", _csv(job_rows(summary))),
        "sweep_configs.csv": atomic_write_text(
            sweep_dir / "sweep_configs.csv", _csv(summary.configs)
        ),
    }
    plot = sweep_dir / "sweep_plot.png"
    if metric and any(metric in job.metrics for job in jobs):
        written["sweep_plot.png"] = _plot(summary, metric, plot)
    else:
        plot.unlink(missing_ok=True)
    markdown = _markdown(summary, sweep_dir, metric, "sweep_plot.png" in written)
    written["sweep_summary.md"] = atomic_write_text(sweep_dir / "sweep_summary.md", markdown)
    return written


def _optimized_metric(sweep_dir: Path, jobs: Sequence[Job]) -> str | None:
    for job in jobs:
        config = sweep_dir / job.name / "config.yaml"
        if config.is_file():
            return (yaml.safe_load(config.read_text()) or {}).get("optimized_metric")
    return None


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return lines


def _markdown(summary: SweepSummary, sweep_dir: Path, metric: str | None, plot: bool) -> str:
    counts = {s: sum(job.status == s for job in summary.jobs) for s in ("completed", "failed")}
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(summary.jobs)} jobs: {counts['completed']} completed, {counts['failed']} failed, "
        f"{len(summary.jobs) - sum(counts.values())} incomplete.",
        "",
        "Common overrides: "
        + (", ".join(f"`{k}={v}`" for k, v in summary.common.items()) or "none"),
        "",
        "## Configurations (mean ± sample std over the completed jobs)",
        "",
        *_markdown_table(_mean_std_cells(summary)),
        "",
        "## Jobs",
        "",
        *_markdown_table(job_rows(summary)),
        "",
    ]
    if plot:
        lines += [f"![{metric} per configuration](sweep_plot.png)", ""]
    return "\n".join(lines)


def _mean_std_cells(summary: SweepSummary) -> list[dict[str, Any]]:
    """Configuration rows with one "mean ± std" cell per metric."""
    rows = []
    for config in summary.configs:
        row = {k: v for k, v in config.items() if not k.endswith((" mean", " std"))}
        for metric in summary.metrics:
            mean, std = config[f"{metric} mean"], config[f"{metric} std"]
            row[metric] = _cell(mean) + ("" if math.isnan(std) else f" ± {std:.4f}")
        rows.append(row)
    return rows


def _config_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return "\n".join(f"{k}={row[k]}" for k in keys) or "all jobs"


def _plot(summary: SweepSummary, metric: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    from medseg.plots import save_figure  # matplotlib: imported only when a plot is drawn

    keys = [k for k in summary.varying if k != SEED_KEY]
    labels = [_config_label(row, keys) for row in summary.configs]
    figure = Figure(figsize=(max(5.0, 1.5 * len(labels) + 2), 4))
    axes = figure.subplots()
    for x, row in enumerate(summary.configs):
        scores = [
            job.metrics[metric]
            for job in summary.jobs
            if job.status == "completed"
            and metric in job.metrics
            and all(job.overrides.get(k, "") == row[k] for k in keys)
        ]
        axes.scatter([x] * len(scores), scores, color="tab:blue", alpha=0.6, zorder=3)
        mean, std = row[f"{metric} mean"], row[f"{metric} std"]
        if not math.isnan(mean):
            axes.errorbar(
                x,
                mean,
                yerr=0 if math.isnan(std) else std,
                fmt="_",
                color="black",
                markersize=20,
                capsize=6,
                zorder=4,
            )
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlim(-0.5, len(labels) - 0.5)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per configuration\n(dots: jobs; bars: mean ± std)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


class SweepSummaryCallback(Callback):
    """Hydra callback: rewrite the sweep report after every job and at the end of a multirun."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and rank_zero_only.rank == 0:
            self._summarize(Path(config.hydra.runtime.output_dir).parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = self._summarize(Path(config.hydra.sweep.dir))
        if "sweep_summary.md" in written:
            log.info("sweep summary: %s", written["sweep_summary.md"])

    @staticmethod
    def _summarize(sweep_dir: Path) -> dict[str, Path]:
        # A report that cannot be written must not fail the job or the sweep.
        try:
            return summarize_sweep(sweep_dir)
        except Exception:
            log.exception("could not summarize the sweep in %s", sweep_dir)
            return {}
