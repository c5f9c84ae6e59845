"""Runs that survive bad cases and bad output folders (issue 12, items 3, 6 and 7).

One bad case never stops the others (predict, eval in both modes, the test report, prepare):
whatever it raises, it is one line naming its file and the problem, the good cases are still
written, the run ends with exit status 1 and the list. An output that cannot be written
stops the run before any work. Every bad input is generated here from the phantom.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import pipeline
from medseg.cli import run_task
from medseg.data.cases import Case
from medseg.data.splits import split_cases
from medseg.errors import ConfigError, DataError, ResourceError
from medseg.prediction import Predictor, load_checkpoint, predict_cases
from medseg.utils.outputs import check_writable_folder

from .conftest import assert_clean_failure, compose_config, eval_overrides, run_script

LABELS = "labels={0: background, 1: liver, 2: lesion}"
# the first two voxel axes point the same way: no world grid (refused with a clear line)
DEGENERATE_SFORM = np.array([[2.5, 0, 0, 0], [2.5, 0, 0, 0], [0, 0, 7.5, 0], [0, 0, 0, 1]])


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_degenerate_copy(source: Path, target: Path | None = None) -> Path:
    """`source` with DEGENERATE_SFORM as its affine (data and header otherwise kept), saved
    to `target` (default: over `source`)."""
    target = target or source
    image = nib.load(source)
    copy = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    copy.header.set_sform(DEGENERATE_SFORM, code=1)
    copy.header.set_qform(None, code=0)
    copy.update_header = lambda: None  # keep the degenerate sform as it is when saving
    target.unlink(missing_ok=True)  # `target` may be a symlink to the shared phantom
    copy.to_filename(target)
    return target


def write_rgb_copy(source: Path, target: Path | None = None) -> Path:
    """`source`'s geometry with RGB voxels: the header opens and passes every check, then
    TorchIO fails to turn the data into a tensor (TypeError), an error no check of ours
    anticipates. Saved to `target` (default: over `source`)."""
    target = target or source
    image = nib.load(source)
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    target.unlink(missing_ok=True)  # `target` may be a symlink to the shared phantom
    nib.Nifti1Image(rgb, image.affine).to_filename(target)
    return target


def save_like(reference: Path, data: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(data, nib.load(reference).affine), path)
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary or staging files left in `folder` (atomic writes leave none)."""
    return sorted(p.name for p in folder.rglob(".*"))


def test_predict_goes_on_after_a_case_that_raises_deep_inside_a_library(
    trained_run, tmp_path, phantom_root
):
    _, run, _ = trained_run
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    images = phantom_root / "imagesTr"
    # sorted first: before the fix, its crash ended the run before the good cases
    bad = write_rgb_copy(images / "phantom_000.nii.gz", inputs / "a_rgb.nii.gz")
    singular = write_degenerate_copy(images / "phantom_001.nii.gz", inputs / "b_singular.nii.gz")
    for case_id in ("phantom_000", "phantom_001"):
        (inputs / f"{case_id}.nii.gz").symlink_to(images / f"{case_id}.nii.gz")
    output = tmp_path / "out"
    result = run_script(
        "predict.py",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"input={inputs}",
        f"output={output}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "save_probabilities=true",
    )
    assert_clean_failure(result, f"{bad}: cannot be read as an image (TypeError: ")
    assert_clean_failure(result, f"{singular}: the voxel-to-world affine is singular")
    assert_clean_failure(result, "2 of 4 input(s) could not be predicted", str(output))
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.nii.gz")) == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
        "probabilities/phantom_000.nii.gz",
        "probabilities/phantom_001.nii.gz",
    ]
    assert leftovers(output) == []
    # the traceback is kept for a bug report, in the log file only
    (log_file,) = (tmp_path / "logs").rglob("predict.log")
    assert "Traceback (most recent call last)" in log_file.read_text()


@pytest.fixture
def predictor(trained_run) -> Predictor:
    _, run, _ = trained_run
    return Predictor([load_checkpoint(run / "checkpoints" / "last.ckpt")], device="cpu")


def phantom_cases(phantom_root: Path, *numbers: int) -> list[Case]:
    images = phantom_root / "imagesTr"
    return [Case(f"phantom_{n:03d}", (images / f"phantom_{n:03d}.nii.gz",)) for n in numbers]


def test_a_case_whose_maps_cannot_all_be_written_leaves_none_of_them(
    predictor, phantom_root, tmp_path
):
    output = tmp_path / "out"
    output.mkdir()
    (output / "probabilities").write_text("a file where the probability maps' folder goes")
    cases = phantom_cases(phantom_root, 0, 1)
    run = predict_cases(predictor, cases, output, save_probabilities=True, progress=False)
    assert run.written == {}
    assert [f.split(": could not be predicted (")[0] for f in run.failures] == [
        str(c.images[0]) for c in cases
    ]
    assert all("FileExistsError" in f or "NotADirectoryError" in f for f in run.failures)
    assert sorted(p.name for p in output.iterdir()) == ["probabilities"]  # no label map


def test_running_out_of_memory_or_an_interrupt_stops_the_run(
    predictor, phantom_root, tmp_path, monkeypatch
):
    real_predict = predictor.predict
    cases = phantom_cases(phantom_root, 0, 1, 2)

    def fail_on_second(stop: BaseException):
        def predict(case: Case):
            if case.case_id == "phantom_001":
                raise stop
            return real_predict(case)

        return predict

    monkeypatch.setattr(predictor, "predict", fail_on_second(MemoryError()))
    with pytest.raises(ResourceError, match=r"phantom_001\.nii\.gz: ran out of memory"):
        predict_cases(predictor, cases, tmp_path / "oom", progress=False)
    # the case done before is kept; nothing after it was tried
    assert sorted(p.name for p in (tmp_path / "oom").iterdir()) == ["phantom_000.nii.gz"]

    monkeypatch.setattr(predictor, "predict", fail_on_second(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        predict_cases(predictor, cases, tmp_path / "interrupted", progress=False)


def test_eval_of_folders_scores_every_good_case_and_names_each_bad_one(tmp_path, phantom_root):
    labels, predictions = tmp_path / "labels", tmp_path / "predictions"
    labels.mkdir()
    predictions.mkdir()
    for n in range(7):
        name = f"phantom_{n:03d}.nii.gz"
        (labels / name).symlink_to(phantom_root / "labelsTr" / name)
    label = np.asanyarray(nib.load(labels / "phantom_000.nii.gz").dataobj).astype(np.float32)
    with_nan = label.copy()
    with_nan.flat[:12] = np.nan
    half = np.where(label > 0, 0.5, 0).astype(np.float32)
    unknown = np.where(label > 0, 7, 0).astype(np.uint8)
    reference = labels / "phantom_000.nii.gz"
    bad = {
        "phantom_000": (with_nan, "prediction has 12 non-finite voxels (NaN/Inf)"),
        "phantom_001": (
            half,
            "prediction has non-integer values (e.g. 0.5); a label map must hold integer "
            "label values",
        ),
        "phantom_002": (unknown, "prediction has label values [7] outside the label map"),
        "phantom_003": (None, "cannot read the prediction ("),
        "phantom_004": (label[:, :, :8], "prediction grid differs from the reference"),
    }
    for case_id, (data, _) in bad.items():
        path = predictions / f"{case_id}.nii.gz"
        if data is None:
            path.write_bytes(b"\x1f\x8b not a gzip stream")
        else:
            save_like(reference, data, path)
    for case_id in ("phantom_005", "phantom_006"):  # perfect predictions
        shutil.copy(labels / f"{case_id}.nii.gz", predictions / f"{case_id}.nii.gz")
    output = tmp_path / "eval"
    result = run_script(
        "eval.py",
        f"pred_dir={predictions}",
        f"label_dir={labels}",
        LABELS,
        f"paths.output_dir={output}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    for case_id, (_, problem) in bad.items():
        assert_clean_failure(result, f"{predictions / case_id}.nii.gz: {problem}")
    assert_clean_failure(result, "5 of 7 case(s) could not be scored", "test_metrics.csv")
    rows = read_csv(output / "test_metrics.csv")
    assert [(r["case_id"], float(r["dice_liver"])) for r in rows] == [
        ("phantom_005", 1.0),
        ("phantom_006", 1.0),
    ]
    summary = json.loads((output / "test_summary.json").read_text())
    assert summary["num_cases"] == 2 and len(summary["failures"]) == 5
    for failure, case_id in zip(summary["failures"], bad, strict=True):
        assert failure.startswith(f"{predictions / case_id}.nii.gz: ")
    assert (output / "plots" / "metrics.png").is_file()


def test_eval_of_a_checkpoint_scores_the_good_test_cases_and_lists_the_bad(
    trained_run, tmp_path, phantom_root
):
    _, run, _ = trained_run
    data = Path(shutil.copytree(phantom_root, tmp_path / "phantom"))
    ids = [f"phantom_{n:03d}" for n in range(8)]
    test_ids = sorted(split_cases(ids, test_fraction=0.5, num_folds=2).test)
    rgb, truncated, *good = test_ids
    write_rgb_copy(data / "imagesTr" / f"{rgb}.nii.gz")  # passes the checks; prediction fails
    label = data / "labelsTr" / f"{truncated}.nii.gz"
    label.write_bytes(label.read_bytes()[:200])  # fails the checks before prediction
    overrides = [o for o in eval_overrides(tmp_path, data) if "test_fraction" not in o]
    output = tmp_path / "eval"
    cfg = compose_config(
        "eval",
        [
            *overrides,
            "data.phantom=null",
            "data.test_fraction=0.5",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"paths.output_dir={output}",
        ],
    )
    with pytest.raises(DataError, match=r"^2 of 4 case\(s\) could not be scored") as raised:
        pipeline.evaluate(cfg)
    lines = str(raised.value).splitlines()[1:]
    assert len(lines) == 2
    assert f"{truncated}: {label}: " in lines[0]
    image = data / "imagesTr" / f"{rgb}.nii.gz"
    assert f"{image}: cannot be read as an image (TypeError: " in lines[1]
    assert [r["case_id"] for r in read_csv(output / "test_metrics.csv")] == good
    summary = json.loads((output / "test_summary.json").read_text())
    assert summary["failures"] == [line.removeprefix("  - ") for line in lines]
    written = sorted(p.name for p in (output / "predictions").iterdir())
    assert written == [f"{case_id}.nii.gz" for case_id in good]


def test_prepare_prepares_every_other_case_and_names_the_bad_one(tmp_path, phantom_root):
    data = Path(shutil.copytree(phantom_root, tmp_path / "phantom"))
    write_rgb_copy(data / "imagesTr" / "phantom_003.nii.gz")
    cache = tmp_path / "cache"
    result = run_script(
        "scripts/prepare.py",
        f"data.root={data}",
        "data.phantom=null",
        "data.preprocess.spacing=null",
        f"data.cache_dir={cache}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    image = data / "imagesTr" / "phantom_003.nii.gz"
    assert_clean_failure(result, f"phantom_003: {image}: cannot be read (TypeError: ")
    (root,) = cache.iterdir()
    expected = [f"phantom_{n:03d}" for n in range(8) if n != 3]
    assert sorted(p.name for p in root.iterdir()) == [*expected, "zarr.json"]
    assert all((root / case_id / "image" / "zarr.json").is_file() for case_id in expected)


def test_a_run_folder_hydra_cannot_create_is_one_line_before_any_work(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("a file, not a folder")
    result = run_script("train.py", f"paths.log_dir={file}/logs", f"paths.root_dir={tmp_path}")
    line = assert_clean_failure(result, "hydra.run.dir: ", f"{file}/logs/train/runs/")
    assert line.endswith(
        f"cannot be created: {file} is a file, not a folder (the run folder: "
        "set paths.log_dir or hydra.run.dir)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no phantom generated


@pytest.mark.parametrize(
    ("name", "overrides", "problem"),
    [
        (  # a path through a file; the checkpoint and input are missing too (noticed later)
            "predict",
            ["output={file}/out", "input={tmp}/missing", "ckpt_path={tmp}/x.ckpt"],
            "output: {file}/out cannot be created: {file} is a file, not a folder",
        ),
        (  # the run folder is an existing file
            "eval",
            ["ckpt_path={tmp}/x.ckpt"],
            "paths.output_dir: {file} is a file, not a folder",
        ),
        (  # the cache folder is an existing file; the phantom would be generated first
            "prepare",
            ["data.cache_dir={file}", "data.root={tmp}/phantom"],
            "data.cache_dir: {file} is a file, not a folder",
        ),
    ],
)
def test_an_output_that_cannot_be_written_stops_the_run_before_any_work(
    name, overrides, problem, tmp_path, capsys
):
    file = tmp_path / "notes.txt"
    file.write_text("a file, not a folder")
    run_folder = file if name == "eval" else tmp_path / "run"
    values = {"file": file, "tmp": tmp_path}
    cfg = compose_config(
        name,
        [
            *(o.format(**values) for o in overrides),
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={run_folder}",
        ],
    )
    with pytest.raises(SystemExit) as exited:  # as the command line runs it
        run_task(getattr(pipeline, {"eval": "evaluate"}.get(name, name)), cfg)
    assert exited.value.code == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert f"error: {problem.format(**values)}" in printed.out.splitlines()
    created = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert created <= {"notes.txt", "run", "run/result.json"}  # only the failed run's record
    assert file.read_text() == "a file, not a folder"


def test_writable_folder_check_names_the_key_the_path_and_the_problem(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    check_writable_folder("output", tmp_path / "new" / "deeper")  # creatable: fine
    check_writable_folder("output", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing created
    with pytest.raises(ConfigError, match=rf"^output: {file} is a file, not a folder$"):
        check_writable_folder("output", file)
    with pytest.raises(
        ConfigError, match=rf"^output: {file}/a/b cannot be created: {file} is a file, not a"
    ):
        check_writable_folder("output", file / "a" / "b")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=rf"^output: {locked}/out cannot be written: {locked}"):
        check_writable_folder("output", locked / "out")
