"""What the fine-tune feeds the network: image rows, the training augmentation, the loaders.

Why its own module: the augmentation is built from the backbone's own preprocessing (size,
interpolation, mean/std), so fine-tune and probe see images prepared the same way; a file that
fails to load becomes a flagged blank image instead of stopping a long run.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ..base.runtime import worker_init
from ..data.images import load_or_blank
from ..embedding.backbones import TRAIN_MIN_SCALE

log = logging.getLogger(__name__)


class ImageRows(Dataset):
    """Map-style dataset over (path, label) rows; a file that fails to load yields ok=False."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, rows: np.ndarray, transform, *, crop: int, draft: int | None):
        self.paths = paths
        self.labels = labels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.crop = crop
        self.draft = draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = int(self.rows[i])
        x, err = load_or_blank(self.paths[r], self.transform, crop=self.crop, draft_size=self.draft)
        if err:
            log.warning("skipping %s: %s", self.paths[r], err)
        return x, int(self.labels[r]), not err


def train_transform(pre, *, min_scale: float = TRAIN_MIN_SCALE):
    """Training augmentation built from the backbone's own preprocessing (size, interpolation, mean/std)."""
    return pre.train_transform(min_scale=min_scale)


def make_loader(ds: Dataset, *, batch_size: int, num_workers: int, cuda: bool) -> DataLoader:
    """In-order batches (the order is drawn by the loop, so a resume can skip what was done)."""
    kw: dict = {}
    if num_workers > 0:
        kw.update(prefetch_factor=4, worker_init_fn=worker_init, persistent_workers=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda, **kw)


class RowLoaders:
    """Builds loaders over rows of one cache with the training or the evaluation transform."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, pre, *, min_scale: float, batch_size: int,
                 num_workers: int, cuda: bool) -> None:
        self.paths, self.labels, self.pre = paths, labels, pre
        self.eval_tf = pre.pil_transform()
        self.train_tf = train_transform(pre, min_scale=min_scale)
        self.batch_size, self.num_workers, self.cuda = batch_size, num_workers, cuda

    def train(self, rows: np.ndarray, *, epoch: int = 0) -> DataLoader:
        """The epoch's training images (``epoch`` only matters to :class:`featx.finetune.features.FeatureLoaders`)."""
        ds = ImageRows(self.paths, self.labels, rows, self.train_tf, crop=self.pre.crop, draft=self.pre.resize)
        return make_loader(ds, batch_size=self.batch_size, num_workers=self.num_workers, cuda=self.cuda)

    def evaluation(self, rows: np.ndarray) -> DataLoader:
        ds = ImageRows(self.paths, self.labels, rows, self.eval_tf, crop=self.pre.crop, draft=self.pre.resize)
        return make_loader(ds, batch_size=self.batch_size * 2, num_workers=self.num_workers, cuda=self.cuda)
