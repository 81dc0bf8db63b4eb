"""Train/eval hold-outs and CV fold plans, shared by the probe, both head families and the fine-tune."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..base.errors import FeatxError

log = logging.getLogger(__name__)

# The fine-tune's early-stopping slice never needs more images than this (accuracy +-1%).
VAL_MAX = 10_000

# Names of a split that every input kind (folders, manifests, WebDataset, Parquet, datasets) accepts, lower case.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def canonical_split(name) -> str | None:
    """``train``, ``val`` or ``test`` for a split name or alias (any case, surrounding blanks), else None."""
    return SPLIT_ALIASES.get(str(name).strip().lower()) if name is not None else None


def train_eval_split(
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    test_size: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row indices (train, eval) shared by the probe and the fine-tune, plus a description.

    The evaluation split is the dataset's ``val`` split when it has one, else ``test``; only
    when neither exists is a stratified hold-out of ``test_size`` drawn from ``train`` with
    ``seed`` (classes too small to stratify fall back to a plain seeded shuffle).
    """
    labels = np.asarray(labels)
    splits = np.asarray(splits)
    train = np.flatnonzero(splits == "train")
    for name in ("val", "test"):
        ev = np.flatnonzero(splits == name)
        if len(ev):
            if not len(train):
                raise FeatxError(f"the dataset has a {name!r} split but no 'train' split to train on; add train/<class>/ images")
            return train, ev, {"kind": "split", "eval_split": name, "train_split": "train"}
    if not 0 < test_size < 1:
        raise FeatxError(f"--test-size must be between 0 and 1, got {test_size}")
    if len(train) < 2:
        raise FeatxError(
            f"only {len(train)} training image(s): a hold-out split needs at least 2; add images or a val/ split"
        )
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels[train]) if len(train) else np.array([])
    n_eval = int(np.ceil(test_size * len(train)))
    n_train = len(train) - n_eval
    present = int((counts > 0).sum())
    stratify = (
        labels[train]
        if len(counts) and counts[counts > 0].min() >= 2 and n_eval >= present and n_train >= present
        else None
    )
    if stratify is None:
        log.warning("some classes have fewer than 2 images: the hold-out split is not stratified")
        tr, ev = _holdout_keeping_every_class(train, labels[train], n_eval, seed)
    else:
        tr, ev = train_test_split(train, test_size=test_size, random_state=seed, stratify=stratify)
    return (
        np.sort(tr),
        np.sort(ev),
        {"kind": "holdout", "eval_split": "train (held out)", "test_size": test_size, "seed": seed,
         "stratified": stratify is not None},
    )


def _holdout_keeping_every_class(rows: np.ndarray, y: np.ndarray, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded hold-out of about ``n_eval`` rows that leaves every class at least one training row.

    Used when stratifying is impossible: a class with a single image stays in training (it
    could not be both learned and scored), so the head still sees every class.
    """
    rng = np.random.default_rng(seed)
    left = dict(zip(*np.unique(y, return_counts=True)))
    eval_pos: list[int] = []
    for i in rng.permutation(len(rows)):
        if len(eval_pos) >= n_eval:
            break
        if left[y[i]] >= 2:
            left[y[i]] -= 1
            eval_pos.append(int(i))
    if not eval_pos:
        raise FeatxError(
            f"every class has a single training image ({len(rows)} images): nothing can be held out for "
            "evaluation; add images, or a val/<class>/ split"
        )
    mask = np.zeros(len(rows), bool)
    mask[eval_pos] = True
    return rows[~mask], rows[mask]


def plan_folds(y: np.ndarray, folds: int) -> dict:
    """How many folds the training labels allow: fewer than asked when a class is small.

    Stratified k-fold needs every class in every fold, so k is capped at the smallest class
    count; with a class of a single image, stratification is impossible and plain shuffled
    k-fold is used.  Never raises for small classes: the returned ``note`` says what happened.
    """
    y = np.asarray(y)
    if folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {folds}")
    classes, counts = np.unique(y, return_counts=True)
    n = len(y)
    if len(classes) < 2:
        raise FeatxError(
            f"the training split has only {len(classes)} class(es); a classifier needs at least 2. "
            "Add images of other classes under train/<class>/"
        )
    smallest = int(counts.min())
    small_name = classes[int(counts.argmin())].item()  # a plain int or str in the message, not np.int64(1)
    if smallest >= folds:
        return {"requested": folds, "used": folds, "stratified": True, "note": ""}
    if smallest >= 2:
        note = (
            f"class {small_name!r} has only {smallest} training images, fewer than --folds {folds}: "
            f"using {smallest}-fold stratified cross-validation"
        )
        return {"requested": folds, "used": smallest, "stratified": True, "note": note}
    singles = [str(c) for c, k in zip(classes, counts) if k == 1]
    rest = counts[counts >= 2]
    if len(rest):
        used = int(min(folds, rest.min()))
        note = (
            f"{len(singles)} class(es) have a single training image ({', '.join(singles[:5])}"
            f"{', ...' if len(singles) > 5 else ''}): they stay in every CV training fold and are not scored; "
            f"using {used}-fold stratified cross-validation on the other classes. Add images for trustworthy "
            "hyperparameters"
        )
        return {"requested": folds, "used": used, "stratified": True, "note": note, "singletons_in_train": len(singles)}
    used = max(2, min(folds, n // 2))
    note = (
        "every class has a single training image, so cross-validation cannot score anything meaningful: "
        f"using plain shuffled {used}-fold cross-validation. Add images"
    )
    return {"requested": folds, "used": used, "stratified": False, "note": note}


def carve_validation(train_idx: np.ndarray, labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training rows into (fit, val) for early stopping: stratified, seeded.

    The evaluation rows are never touched, so the final number stays an honest estimate.
    """
    train_idx = np.asarray(train_idx)
    if fraction <= 0 or len(train_idx) < 4:
        return np.sort(train_idx), np.array([], dtype=np.int64)
    from sklearn.model_selection import train_test_split

    y = labels[train_idx]
    counts = np.bincount(y)
    present = int((counts > 0).sum())
    n_val = min(max(1, int(math.ceil(fraction * len(train_idx)))), VAL_MAX)
    stratify = y if counts[counts > 0].min() >= 2 and n_val >= present and len(train_idx) - n_val >= present else None
    fit, val = train_test_split(train_idx, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(fit), np.sort(val)


@dataclass(frozen=True)
class Split:
    """The train/evaluation rows of one run, computed once and handed to every stage that trains or scores.

    Why a type: ``featx compare`` used to compute the split three times (the run, the probe, each
    fine-tune) and only warned when they differed; now the run makes one ``Split`` and the probe, the
    fine-tunes and the audit read the same object.  ``test_size``/``seed`` say how it was drawn, so a
    stage given a split can check it against its own settings.
    """

    train: np.ndarray
    eval: np.ndarray
    desc: dict
    test_size: float
    seed: int

    @classmethod
    def of(cls, labels: np.ndarray, splits: np.ndarray, *, test_size: float = 0.2, seed: int = 0) -> "Split":
        """The split :func:`train_eval_split` draws for these rows."""
        tr, ev, desc = train_eval_split(labels, splits, test_size=test_size, seed=seed)
        return cls(tr, ev, desc, float(test_size), int(seed))

    @classmethod
    def of_cache(cls, fc, *, test_size: float = 0.2, seed: int = 0) -> "Split":
        return cls.of(fc.labels(), fc.split_array(), test_size=test_size, seed=seed)

    def check_matches(self, *, test_size: float, seed: int, n_rows: int, what: str) -> None:
        """Refuse a split drawn with other settings (or for another cache) than ``what`` asks for."""
        held_out = self.desc.get("kind") == "holdout"
        if held_out and (float(test_size) != self.test_size or int(seed) != self.seed):
            raise FeatxError(f"{what}: the split given was drawn with test_size={self.test_size}, seed={self.seed}, "
                             f"not test_size={test_size}, seed={seed}; pass the same settings, or no split")
        self.check_rows(n_rows, what=what)

    def check_rows(self, n_rows: int, *, what: str) -> None:
        """Refuse a split that names rows the cache does not have (a split of another cache)."""
        top = max(int(self.train.max(initial=-1)), int(self.eval.max(initial=-1)))
        if top >= n_rows:
            raise FeatxError(f"{what}: the split given names row {top}, but the cache has {n_rows} rows; "
                             "compute the split from this cache (Split.of_cache)")

    def to_dict(self) -> dict:
        return dict(self.desc, n_train=int(len(self.train)), n_eval=int(len(self.eval)))
