"""`python src/train.py -m ...` runs one job per combination, each in its own folder."""

import yaml

from .conftest import run_script, tiny_overrides


def test_two_job_sweep_writes_two_run_folders(tmp_path, phantom_root):
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
    overrides = [o for o in overrides if not o.startswith("model.width")]
    result = run_script("train.py", "-m", "model.width=4,8", "debug=fast_dev_run", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    widths = [yaml.safe_load((job / "config.yaml").read_text())["model"]["width"] for job in jobs]
    assert widths == [4, 8]
    assert all((job / "test_metrics.csv").is_file() for job in jobs)
