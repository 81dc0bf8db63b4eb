"""Augmented training views (``featx embed --train-views K``).

Each *training* image is also embedded K times through the fine-tune's training augmentation
(random-resized crop + horizontal flip, :meth:`Preprocess.train_transform`), seeded per image
and view, so a rerun, a shard or a Ray actor produces the same rows.  The probe trains on them
with CV folds grouped by image and evaluates on the plain view: the frozen backbone + augmented
views of the fine-tune's ``head`` strategy, from the cache, for K extra passes over the
training split.

An augmented view is an ordinary unit of work whose key is the image's key plus a tag naming
the recipe and the view number (``KEY\\x00aug:<recipe>:<k>``): chunk files, resume, shards and
Ray carry it like any image, and a changed recipe gets new keys (so it is embedded again, never
mixed).  The finished cache keeps these rows apart, in its ``augmented/`` group.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

from ...base.errors import FeatxError
from ...cache.store import AUG_SEP as SEP
from ...cache.store import image_key
from ..backbones import TRAIN_MIN_SCALE as MIN_SCALE  # the fine-tune's own augmentation

SEED = 0
RECIPE = f"rrc{MIN_SCALE:g}-flip-s{SEED}"


# Views per training image at most, and augmented rows in all: checked before any list is built (10^8 views
# per image once ran 66 s into a MemoryError).  Each view is a pass over the training split.
MAX_TRAIN_VIEWS = 100
MAX_VIEW_ROWS = 20_000_000


def check_train_views(k: int | None) -> int | None:
    """``k`` as an int (None: keep what the cache stores), or a FeatxError for a negative or huge count."""
    if k is None:
        return None
    if int(k) < 0:
        raise FeatxError(f"--train-views must be 0 (none) or a positive number of views per training image, got {k}")
    if int(k) > MAX_TRAIN_VIEWS:
        raise FeatxError(f"--train-views {k}: at most {MAX_TRAIN_VIEWS} views per training image (each is another pass "
                         "over the training split); pass a smaller number, e.g. --train-views 8")
    return int(k)


def aug_key(key: str, k: int) -> str:
    return f"{key}{SEP}{RECIPE}:{k}"


def is_aug(key: str) -> bool:
    return SEP in key


def parse(key: str) -> tuple[str, int] | None:
    """(image key, view number) of an augmented-view key; None for a plain image."""
    if SEP not in key:
        return None
    return image_key(key), int(key.rsplit(":", 1)[1])


def view_seed(key: str) -> int:
    """The seed of one augmented view: the same on every machine and run (not Python's hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "little")


def add_train_views(samples: Sequence, k: int) -> list:
    """``samples`` followed by ``k`` augmented views of each training sample."""
    n_train = sum(1 for s in samples if s.split == "train")
    if n_train * k > MAX_VIEW_ROWS:
        raise FeatxError(f"--train-views {k}: {n_train:,} training images x {k} views = {n_train * k:,} rows, more than "
                         f"{MAX_VIEW_ROWS:,}; pass a smaller --train-views")
    extra = [replace(s, key=aug_key(s.key, i)) for s in samples if s.split == "train" for i in range(k)]
    return list(samples) + extra


def drop_views_of_failed(samples: Sequence, index: dict, *, retried: set) -> list:
    """``samples`` without the augmented views of images known not to load (they would fail again
    on every run, and the finished cache never stores them); images being ``retried`` keep theirs."""
    failed = {k for k, e in index.items() if e[0] == "failed" and not is_aug(k) and k not in retried}
    if not failed:
        return list(samples)
    return [s for s in samples if not (is_aug(s.key) and image_key(s.key) in failed)]


def describe(k: int) -> str:
    return f"{k} views per training image: random-resized crop (scale {MIN_SCALE:g}-1) + horizontal flip, seed {SEED}"
