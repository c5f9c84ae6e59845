import pytest

from medseg.data.splits import split_cases
from medseg.errors import ConfigError

IDS = [f"case_{i:02d}" for i in range(23)]


def test_split_is_deterministic_disjoint_and_complete():
    split = split_cases(IDS, test_fraction=0.2, num_folds=5, fold=2, seed=7)
    assert split == split_cases(list(reversed(IDS)), test_fraction=0.2, num_folds=5, fold=2, seed=7)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(IDS)
    assert set().union(*parts) == set(IDS)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(split.test) == 5


def test_folds_share_the_test_set_and_partition_the_rest():
    splits = [split_cases(IDS, num_folds=4, fold=f, seed=1) for f in range(4)]
    assert len({s.test for s in splits}) == 1
    validation = [c for s in splits for c in s.val]
    assert sorted(validation) == sorted(set(IDS) - set(splits[0].test))


def test_seed_changes_the_split():
    assert split_cases(IDS, seed=0).test != split_cases(IDS, seed=1).test


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fold": 5}, r"data.fold must be an integer in \[0, 5\)"),
        ({"num_folds": 1}, "data.num_folds must be an integer >= 2"),
        ({"test_fraction": 1.0}, r"data.test_fraction must be in \[0, 1\)"),
    ],
)
def test_invalid_split_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        split_cases(IDS, **kwargs)


def test_too_few_cases_for_the_folds():
    with pytest.raises(ConfigError, match="needs at least 5 cases outside the test set"):
        split_cases(IDS[:4], num_folds=5)
