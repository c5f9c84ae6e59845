"""Interrupted and concurrent runs, and paths that need quoting (issue 12, items 11-13).

Ctrl-C ends a command with one line and exit status 130, leaving only complete files; what
a killed prepare left half-written is removed by the next one; two processes preparing one
project folder take turns, so nothing is prepared twice; quoted paths with spaces and
non-ASCII letters work.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from medseg import pipeline
from medseg.checkpoints import load_checkpoint
from medseg.utils.locks import lock_path
from tests.conftest import REPO, TINY_MODEL, compose_config, eval_overrides, tiny_data_overrides

INTERRUPTED = 130


def start_script(script: str, *args: str, output: Path) -> subprocess.Popen:
    """Start src/<script> (or scripts/x.py) as a user would, in its own process group as a
    terminal starts a command, its console going to `output`."""
    path = REPO / script if "/" in script else REPO / "src" / script
    with output.open("w") as console:
        return subprocess.Popen(
            [sys.executable, str(path), *args],
            cwd=REPO,
            env={**os.environ, "HYDRA_FULL_ERROR": "0"},
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never got there (exit status {process.poll()}):\n{output.read_text()}")
        time.sleep(0.05)


def press_ctrl_c(process: subprocess.Popen, output: Path) -> str:
    """Send SIGINT to the command's process group (what Ctrl-C in a terminal does); return
    its console after it ended with status 130, one `interrupted:` line and no traceback."""
    os.killpg(process.pid, signal.SIGINT)
    status = process.wait(timeout=120)
    console = output.read_text()
    assert status == INTERRUPTED, console
    assert "Traceback" not in console and "KeyboardInterrupt" not in console, console
    assert len([line for line in console.splitlines() if "interrupted:" in line]) == 1, console
    return console


def hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders of atomic writes, and lock files."""
    return [
        p for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name or ".lock" in p.name
    ]


def finished_files(folder: Path) -> list[Path]:
    """The NIfTI files in `folder`, without the hidden temporary ones being written."""
    return sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def cache_arrays(cache_root: Path) -> dict[str, np.ndarray]:
    """Every array of every case of a cache, by '<case>/<array path>'."""
    arrays = {}
    for case in sorted(p for p in cache_root.iterdir() if p.is_dir()):
        for name, array in zarr.open_group(str(case), mode="r").arrays():
            arrays[f"{case.name}/{name}"] = np.asarray(array[:])
        for group in ("locations", "foreground_slices"):
            for name, array in zarr.open_group(str(case / group), mode="r").arrays():
                arrays[f"{case.name}/{group}/{name}"] = np.asarray(array[:])
    return arrays


def only_cache(root: Path) -> Path:
    caches = [p for p in (root / "data" / "cache").iterdir() if p.is_dir()]
    assert len(caches) == 1, caches
    return caches[0]


def assert_same_cache(cache_root: Path, reference: dict[str, np.ndarray]) -> None:
    arrays = cache_arrays(cache_root)
    assert sorted(arrays) == sorted(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(arrays[name], array, err_msg=name)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, phantom_root) -> dict[str, np.ndarray]:
    """The tiny phantom's cache as one process alone prepares it."""
    root = tmp_path_factory.mktemp("reference")
    pipeline.prepare(compose_config("prepare", eval_overrides(root, phantom_root)))
    return cache_arrays(only_cache(root))


def test_ctrl_c_stops_training_and_prediction_with_one_line(tmp_path, phantom_root):
    run = tmp_path / "run"
    overrides = [o for o in tiny_data_overrides(tmp_path, phantom_root) if "max_epochs" not in o]
    output = tmp_path / "train.txt"
    training = start_script(
        "train.py",
        *overrides,
        *TINY_MODEL,
        f"paths.output_dir={run}",
        "trainer.max_epochs=1000",
        output=output,
    )
    last = run / "checkpoints" / "last.ckpt"
    wait_for(last.is_file, training, output)
    console = press_ctrl_c(training, output)
    assert f"interrupted: train stopped ({run}); " in console
    assert f"continue with ckpt_path={last}" in console
    assert load_checkpoint(last)["epoch"] >= 0  # complete, loadable
    assert hidden_leftovers(run) == []
    result = (run / "result.json").read_text()
    assert '"status": "failed"' in result and "interrupted (Ctrl-C)" in result

    inputs = tmp_path / "scans"
    inputs.mkdir()
    for copy in range(5):  # 40 inputs: still predicting when Ctrl-C comes
        for image in (phantom_root / "imagesTr").iterdir():
            (inputs / f"copy{copy}_{image.name}").symlink_to(image)
    predictions = tmp_path / "predictions"
    output = tmp_path / "predict.txt"
    predicting = start_script(
        "predict.py",
        f"paths.root_dir={tmp_path}",
        f"ckpt_path={last}",
        f"input={inputs}",
        f"output={predictions}",
        output=output,
    )
    wait_for(lambda: bool(finished_files(predictions)), predicting, output)
    console = press_ctrl_c(predicting, output)
    assert "interrupted: predict stopped (" in console
    written = finished_files(predictions)
    assert 1 <= len(written) < 40
    for path in written:  # every file there is a whole prediction
        assert nib.load(path).get_fdata().shape == (48, 48, 16)
    assert hidden_leftovers(predictions) == []


def test_ctrl_c_while_generating_the_phantom_leaves_nothing(tmp_path):
    output = tmp_path / "prepare.txt"
    preparing = start_script("scripts/prepare.py", f"paths.root_dir={tmp_path}", output=output)
    data = tmp_path / "data"
    wait_for(lambda: any(data.glob(".phantom.tmp-*")), preparing, output)
    console = press_ctrl_c(preparing, output)
    assert "interrupted: prepare stopped (" in console
    assert sorted(p.name for p in data.iterdir()) == []  # no phantom, staging or lock


KILLED_AT_THIRD_CASE = """
import os, signal, sys
from medseg.data import zarr_store

install = zarr_store._replace
installed = []

def install_or_die(staging, path):  # dies with the third case built but not yet in place
    installed.append(path)
    if len(installed) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    install(staging, path)

zarr_store._replace = install_or_die
from medseg.cli import prepare
prepare()
"""


def test_prepare_after_a_kill_removes_its_leftovers(tmp_path, phantom_root, reference_cache):
    script = tmp_path / "killed_prepare.py"
    script.write_text(KILLED_AT_THIRD_CASE)
    overrides = eval_overrides(tmp_path, phantom_root)
    killed = subprocess.run(
        [sys.executable, str(script), *overrides], cwd=REPO, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    cache = only_cache(tmp_path)
    assert [p.name for p in cache.glob(".phantom_002.tmp-*")], "the kill left no staging folder"
    assert not (cache / "phantom_002").exists()

    pipeline.prepare(compose_config("prepare", overrides))
    assert hidden_leftovers(tmp_path / "data") == []
    assert (cache / "fingerprint.json").is_file()
    assert_same_cache(cache, reference_cache)


def test_a_running_prepare_keeps_its_staging_folders(tmp_path, phantom_root):
    """The staging folder of a prepare that holds the lock is not a leftover: the next
    prepare waits for the lock, and only then removes what the holder left."""
    cfg = compose_config("prepare", eval_overrides(tmp_path, phantom_root))
    pipeline.prepare(cfg)
    cache = only_cache(tmp_path)
    staging = cache / ".phantom_000.tmp-0123456789abcdef"
    staging.mkdir()
    with lock_path(cache).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = threading.Thread(target=pipeline.prepare, args=(cfg,))
        second.start()
        second.join(timeout=2)
        assert second.is_alive() and staging.is_dir()  # waiting, nothing removed
        fcntl.flock(held, fcntl.LOCK_UN)
    second.join(timeout=60)
    assert not second.is_alive()
    assert not staging.exists()


def test_two_processes_prepare_one_project_folder_once(tmp_path, reference_cache):
    """Two prepares started together in one project folder (as parallel sweep jobs): the
    phantom is generated once, every case prepared once, both succeed, the cache is the one
    a single process prepares. The folder's name holds a space and a non-ASCII letter,
    quoted as the README says."""
    root = tmp_path / "Projekt Müller"
    paths = ("paths.root_dir=", "paths.output_dir=", "data.root=")
    settings = [o for o in eval_overrides(root, root) if not o.startswith(paths)]
    outputs = [tmp_path / "first.txt", tmp_path / "second.txt"]
    processes = [
        start_script(
            "scripts/prepare.py",
            *settings,
            f'paths.root_dir="{root}"',
            f'data.root="{root}/data/phantom"',
            f'paths.output_dir="{root}/run {n}"',
            output=output,
        )
        for n, output in enumerate(outputs)
    ]
    statuses = [p.wait(timeout=600) for p in processes]
    consoles = "".join(o.read_text() for o in outputs)
    assert statuses == [0, 0], consoles
    assert consoles.count(f"generating a 8-case phantom into {root}/data/phantom") == 1, consoles
    for case in range(8):
        assert consoles.count(f"preparing phantom_{case:03d} ") == 1, consoles
    assert hidden_leftovers(root / "data") == []
    assert_same_cache(only_cache(root), reference_cache)
    for n in range(2):
        assert '"status": "completed"' in (root / f"run {n}" / "result.json").read_text()
