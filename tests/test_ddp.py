"""DDP: two CPU processes (gloo) train on disjoint shares of the cases into one run folder."""

import csv
import re

import pytest

from medseg.data.datamodule import rank_share
from medseg.data.splits import split_cases
from medseg.errors import ConfigError

from .conftest import TINY_PHANTOM, run_script, tiny_overrides

CASES = [f"phantom_{i:03d}" for i in range(TINY_PHANTOM["num_cases"])]


def test_two_cpu_processes_train_on_disjoint_cases(tmp_path, phantom_root):
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
    result = run_script(
        "train.py",
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.num_folds=3",  # 4 train, 2 val, 2 test cases
        "callbacks.rich_progress_bar=null",
        f"hydra.run.dir={run}",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    split = split_cases(CASES, 0.25, 3, 0, 0)
    # One run folder: rank 0 logs to train.log, rank 1 to train_ddp_process_1.log beside it.
    logs = {0: run / "train.log", 1: run / "train_ddp_process_1.log"}
    shares = {
        (rank, name): re.search(rf"rank {rank} of 2: {name} cases \[(.*)\]", path.read_text())
        for rank, path in logs.items()
        for name in ("train", "val", "test")
    }
    shares = {key: found.group(1).replace("'", "").split(", ") for key, found in shares.items()}
    for name, cases in (("train", split.train), ("val", split.val), ("test", split.test)):
        assert not set(shares[0, name]) & set(shares[1, name])
        assert sorted(shares[0, name] + shares[1, name]) == sorted(cases)
    with (run / "test_metrics.csv").open() as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == list(split.test)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]


def test_rank_shares_are_disjoint_and_training_shares_equal_in_size():
    ids = ["a", "b", "c", "d", "e"]
    assert [rank_share("val", ids, r, 2) for r in range(2)] == [["a", "c", "e"], ["b", "d"]]
    assert [rank_share("train", ids, r, 2) for r in range(2)] == [["a", "c", "e"], ["b", "d", "b"]]
    with pytest.raises(ConfigError, match="the test split has 1 case"):
        rank_share("test", ["a"], 0, 2)
