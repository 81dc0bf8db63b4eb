"""Train/evaluation splits (data/splits.py): ``Split``, ``train_eval_split``, ``plan_folds``, and bad data sets
through the probe (it trains or says what to add)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, assert_ok, rgb, run_cli, small_dataset


def _only_val(root: Path) -> Path:
    small_dataset(root, per_class=3)
    (root / "train").rename(root / "val")
    return root


def _singles(root: Path) -> Path:
    return small_dataset(root, classes=("a", "b", "c"), per_class=1)


def _one_single(root: Path) -> Path:
    small_dataset(root, classes=("a", "b"), per_class=6)
    (root / "train" / "lonely").mkdir()
    rgb(5).save(root / "train" / "lonely" / "x.png")
    return root


def _ghost_val(root: Path) -> Path:
    small_dataset(root, classes=("a", "b"), per_class=6, val=2)
    (root / "val" / "ghost").mkdir()
    rgb(6).save(root / "val" / "ghost" / "x.png")
    return root


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda r: small_dataset(r, classes=("only",), per_class=6), "needs at least 2"),
        (_singles, "every class has a single training image"),
        (_only_val, "no 'train' split"),
        (_one_single, None),
        (_ghost_val, None),
    ],
    ids=["one-class", "one-image-per-class", "no-train-split", "class-with-one-image", "val-class-not-in-train"],
)
@pytest.mark.slow
def test_bad_datasets_end_to_end_through_the_probe(tmp_path: Path, make, error: str | None) -> None:
    """Embedding always works; the probe either trains or says what to add."""
    data = make(tmp_path / "d")
    cache = tmp_path / "c.h5"
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    res = run_cli("probe", cache, "--head", "logreg", "--n-jobs", "1", "--out-dir", tmp_path / "out")
    if error:
        assert_clean_error(res, error)
    else:
        assert_ok(res)
        assert (tmp_path / "out" / "metrics.json").is_file()


# --------------------------------------------------------------------------- the functions themselves


def test_the_val_split_is_the_evaluation_split_when_there_is_one() -> None:
    import numpy as np

    from featx.data.splits import Split, train_eval_split

    labels = np.array([0, 1, 0, 1, 0, 1])
    splits = np.array(["train", "train", "val", "val", "test", "train"])
    tr, ev, desc = train_eval_split(labels, splits)
    assert tr.tolist() == [0, 1, 5] and ev.tolist() == [2, 3] and desc["eval_split"] == "val"
    tr, ev, desc = train_eval_split(labels, np.where(splits == "val", "train", splits))
    assert ev.tolist() == [4] and desc == {"kind": "split", "eval_split": "test", "train_split": "train"}
    s = Split.of(labels, splits)
    assert s.to_dict() == {"kind": "split", "eval_split": "val", "train_split": "train", "n_train": 3, "n_eval": 2}


def test_a_holdout_is_stratified_seeded_and_disjoint() -> None:
    import numpy as np

    from featx.data.splits import train_eval_split

    labels = np.repeat([0, 1, 2], 10)
    splits = np.array(["train"] * 30)
    tr, ev, desc = train_eval_split(labels, splits, test_size=0.2, seed=3)
    assert len(ev) == 6 and sorted(np.bincount(labels[ev]).tolist()) == [2, 2, 2]
    assert not set(tr) & set(ev) and len(tr) + len(ev) == 30
    assert desc == {"kind": "holdout", "eval_split": "train (held out)", "test_size": 0.2, "seed": 3, "stratified": True}
    again, _, _ = train_eval_split(labels, splits, test_size=0.2, seed=3)
    other, _, _ = train_eval_split(labels, splits, test_size=0.2, seed=4)
    assert (again == tr).all() and not (other == tr).all()


def test_split_refuses_other_settings_and_rows_of_another_cache() -> None:
    import numpy as np
    import pytest

    from featx.base.errors import FeatxError
    from featx.data.splits import Split

    s = Split.of(np.repeat([0, 1], 10), np.array(["train"] * 20), test_size=0.2, seed=0)
    s.check_matches(test_size=0.2, seed=0, n_rows=20, what="compare")
    with pytest.raises(FeatxError, match="compare: the split given was drawn with test_size=0.2, seed=0, not test_size=0.3"):
        s.check_matches(test_size=0.3, seed=0, n_rows=20, what="compare")
    with pytest.raises(FeatxError, match="names row 19, but the cache has 10 rows"):
        s.check_rows(10, what="probe")


def test_train_eval_split_errors_say_what_to_add() -> None:
    import numpy as np
    import pytest

    from featx.base.errors import FeatxError
    from featx.data.splits import train_eval_split

    with pytest.raises(FeatxError, match="--test-size must be between 0 and 1, got 1.5"):
        train_eval_split(np.array([0, 1, 0]), np.array(["train"] * 3), test_size=1.5)
    with pytest.raises(FeatxError, match="only 1 training image"):
        train_eval_split(np.array([0]), np.array(["train"]))
    with pytest.raises(FeatxError, match="a 'val' split but no 'train' split"):
        train_eval_split(np.array([0, 1]), np.array(["val", "val"]))


def test_plan_folds_caps_k_at_the_smallest_class_and_never_raises_for_small_classes() -> None:
    import numpy as np
    import pytest

    from featx.base.errors import FeatxError
    from featx.data.splits import plan_folds

    assert plan_folds(np.repeat([0, 1], 5), 5) == {"requested": 5, "used": 5, "stratified": True, "note": ""}
    p = plan_folds(np.array([0] * 10 + [1] * 3), 5)
    assert p["used"] == 3 and p["stratified"] and "has only 3 training images, fewer than --folds 5" in p["note"]
    p = plan_folds(np.array([0] * 6 + [1] * 4 + [2]), 5)
    assert p["used"] == 4 and p["singletons_in_train"] == 1 and "1 class(es) have a single training image" in p["note"]
    p = plan_folds(np.arange(6), 5)
    assert p == {"requested": 5, "used": 3, "stratified": False, "note": p["note"]} and "plain shuffled" in p["note"]
    with pytest.raises(FeatxError, match="--folds must be at least 2"):
        plan_folds(np.repeat([0, 1], 5), 1)
    with pytest.raises(FeatxError, match="only 1 class"):
        plan_folds(np.zeros(5, int), 3)


def test_carve_validation_leaves_the_evaluation_rows_alone() -> None:
    import numpy as np

    from featx.data.splits import canonical_split, carve_validation

    labels = np.repeat([0, 1], 20)
    train = np.arange(0, 40, 2)  # half the rows; the others stand for evaluation rows
    fit, val = carve_validation(train, labels, fraction=0.25, seed=0)
    assert len(val) == 5 and set(fit) | set(val) == set(train) and not set(fit) & set(val)
    f0, v0 = carve_validation(train[:3], labels, fraction=0.25, seed=0)
    assert f0.tolist() == train[:3].tolist() and len(v0) == 0  # too few rows to carve anything
    assert [canonical_split(s) for s in (" Training ", "VALID", "testing", "dev", None)] == ["train", "val", "test", None, None]
