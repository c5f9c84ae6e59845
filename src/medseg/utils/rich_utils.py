"""Rich console output: the composed config as a tree, metric tables, error messages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import rich
import rich.markup
import rich.syntax
import rich.table
import rich.tree
from omegaconf import DictConfig, OmegaConf

# Print these groups first, in this order; the rest follow alphabetically.
CONFIG_ORDER = ("data", "model", "stage", "loss", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, resolve: bool = True) -> None:
    """Print the composed config as a tree with one branch per top-level key."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in CONFIG_ORDER if k in cfg] + sorted(k for k in cfg if k not in CONFIG_ORDER)
    for key in keys:
        branch = tree.add(key, style="bold yellow", guide_style="dim")
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=resolve)
            if isinstance(value, DictConfig)
            else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def print_error(message: str) -> None:
    """A user error as the entry points print it: ``error: <message>``."""
    # soft_wrap: one line however long (the terminal wraps it; a captured log stays greppable)
    rich.get_console().print(
        f"[bold red]error:[/bold red] {rich.markup.escape(message)}", soft_wrap=True
    )


def _format(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "-" if math.isnan(value) else f"{value:.4f}"


def print_summary_table(title: str, summaries: Mapping[str, Mapping[str, Mapping]]) -> None:
    """One row per class, one column per metric: ``mean ± std (n)``."""
    table = rich.table.Table(title=title, header_style="bold")
    table.add_column("class")
    for metric in summaries:
        table.add_column(metric, justify="right")
    classes = list(next(iter(summaries.values()), {}))
    for name in classes:
        cells = []
        for stats in summaries.values():
            s = stats[name]
            cells.append(
                "-" if s["n"] == 0 else f"{_format(s['mean'])} ± {_format(s['std'])} ({s['n']})"
            )
        table.add_row(name, *cells)
    rich.print(table)


def print_fingerprint(fingerprint: Mapping, cache: object, size_bytes: int) -> None:
    """The dataset fingerprint (as written to fingerprint.json) as a table."""
    table = rich.table.Table(
        title=f"{fingerprint['num_cases']} cases prepared in {cache} ({size_bytes / 1e6:.1f} MB)",
        header_style="bold",
    )
    table.add_column("property")
    for column in ("median", "min", "max"):
        table.add_column(column, justify="right")
    for key, name in (
        ("spacing", "spacing (mm)"),
        ("shape", "shape"),
        ("cropped_shape", "cropped"),
    ):
        stats = fingerprint[key]
        table.add_row(name, *(_vector(stats[c]) for c in ("median", "min", "max")))
    for channel, stats in fingerprint["foreground_intensities"].items():
        if stats is not None:
            low, high = stats["percentile_00_5"], stats["percentile_99_5"]
            row = f"{stats['median']:.1f} ({low:.1f}..{high:.1f})"
            table.add_row(f"{channel} foreground (0.5-99.5 %)", row, "", "")
    rich.print(table)


def _vector(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def print_task_table(title: str, tasks: Mapping[str, Mapping]) -> None:
    """One row per task and metric: the model's value and, for case-level tasks, that of the
    trivial baseline (majority class, or the training mean)."""
    table = rich.table.Table(title=title, header_style="bold")
    for column in ("task", "metric", "model", "baseline"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, summary in tasks.items():
        if "baseline" in summary:
            baseline = summary["baseline"]
            for metric, value in summary.items():
                if isinstance(value, float):
                    reference = baseline.get(metric)
                    table.add_row(
                        task,
                        metric,
                        _format(value),
                        "-" if reference is None else _format(reference),
                    )
        else:
            for name, stats in summary.get("dice", {}).items():
                table.add_row(task, f"dice_{name} (mean)", _format(stats["mean"]), "-")
            if "mae_mm" in summary:
                table.add_row(task, "mae_mm (mean)", _format(summary["mae_mm"]["mean"]), "-")
    rich.print(table)
