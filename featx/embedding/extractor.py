"""Embed arbitrary image files, and a scikit-learn transformer that does it inside a Pipeline.

``embed_files`` turns a list of image paths into a feature matrix with a backbone, either in
memory (the embed stage's DataLoader and forward pass) or through a featx HDF5 cache (a CSV
manifest handed to :func:`featx.embedding.runner.embed`, so a rerun reuses every finished image).  Bad
images are returned as ``failed``, never raised.

``FeatureExtractor`` wraps it as a transformer so that
``make_pipeline(FeatureExtractor("efficientnet_lite0"), LogisticRegression())`` trains on a
list of paths.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ..base.cuda import rows_to_device
from ..base.errors import FeatxError
from ..base.progress import progress_bar
from ..base.runtime import default_workers, resolve_device
from ..cache.multi import is_multi_view, split_view
from ..cache.store import FeatureCache, fingerprint_digest
from ..cache.views import available_views, check_view, compose_from, parts_for, view_dim
from ..data.folders import Sample
from .backbones import Backbone, create_backbone
from .engines.chunks import cache_fingerprint, default_engine, split_parts
from .engines.cpu import forward_fn, iter_cpu_batches
from .multi import embed_files_multi
from .runner import embed

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "nan")


def resolve_weights(fingerprint: dict, weights_source: str | None) -> str | None:
    """The ``weights`` argument that rebuilds a backbone recorded in a cache or head sidecar."""
    if weights_source == "random":
        return "random"
    if weights_source and os.path.isfile(weights_source):
        return weights_source
    return None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "x"


def embed_files(
    paths: Sequence[str | os.PathLike],
    *,
    backbone: Any = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = 0,
    progress: bool = False,
    check: Callable[[dict, int], None] | None = None,
    view: str | None = None,
) -> dict:
    """Features of the images at ``paths``.

    ``backbone``: a name (built with ``weights``) or a :class:`featx.embedding.backbones.Backbone`.
    ``cache_dir``: embed through a featx cache there (resumable, reused on reruns) instead of
    in memory.  ``check(fingerprint, dim)`` runs before any image is embedded (e.g. to refuse a
    head trained on other features).  Returns ``{"features": [n_ok, dim] float32, "ok":
    indices into paths, "failed": [(path, reason)], "fingerprint": dict, "cache": path|None}``.
    ``view``: a feature view (:mod:`featx.cache.views`; default ``final``); a backbone given by
    name is built with the parts that view needs.
    """

    if is_multi_view(view):  # VIEW@A+B: each named backbone, then the set's composition
        res = embed_files_multi(paths, view=view, embed_one=embed_files, weights=weights, cache_dir=cache_dir,
                                device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
                                backbones=backbone if isinstance(backbone, dict) else None)
        if check is not None:
            check(res["fingerprint"], int(res["features"].shape[1]))
        return res
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if isinstance(backbone, Backbone):
        bb = backbone
    else:
        parts, tta = parts_for(view)
        bb = create_backbone(str(backbone), weights=weights, views=parts, tta=tta)
    view = check_view(view, available_views(bb.widths), where=f"backbone {bb.name} as built")
    dev = resolve_device(device)
    fp = cache_fingerprint(bb, "float32", device=dev, engine=default_engine(dev) if cache_dir is not None else "cpu")
    if check is not None:
        check(fp, view_dim(view, bb.widths))
    workers = default_workers() if num_workers is None else int(num_workers)
    if cache_dir is not None:
        return _embed_via_cache(paths, bb, fp, weights=weights, cache_dir=Path(cache_dir), device=device,
                                batch_size=batch_size, num_workers=workers, progress=progress, view=view)
    res = _embed_in_memory(paths, bb, fp, device=dev, batch_size=batch_size,
                           num_workers=workers, progress=progress)
    res["features"] = compose_from(view, split_parts(res["features"], bb.layout))
    return res


def _embed_in_memory(paths, bb, fp, *, device, batch_size, num_workers, progress) -> dict:
    import torch


    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    samples = [Sample(p, p, 0, "train") for p in paths]
    fwd = forward_fn(bb, device)
    feats = np.full((len(paths), bb.out_dim), np.nan, dtype=np.float32)
    failed: list[tuple[str, str]] = []
    bad: set[int] = set()
    with progress_bar(total=len(paths), unit="img", disable=not progress, desc="embed") as bar:
        for idx, x, errs, _mt, _sz in iter_cpu_batches(
            samples, bb, batch_size=batch_size, num_workers=num_workers, pin=device.startswith("cuda")
        ):
            ok = [j for j, e in enumerate(errs) if not e]
            if ok:
                feats[[idx[j] for j in ok]] = fwd(rows_to_device(x, ok, device))
            for j, e in enumerate(errs):
                if e:
                    failed.append((paths[idx[j]], e))
                    bad.add(idx[j])
            bar.update(len(idx))
    ok_idx = [i for i in range(len(paths)) if i not in bad]
    return {"features": feats[ok_idx], "ok": ok_idx, "failed": failed, "fingerprint": fp, "cache": None}


def _embed_via_cache(paths, bb, fp, *, weights, cache_dir: Path, device, batch_size, num_workers, progress,
                     view: str) -> dict:

    cache_dir.mkdir(parents=True, exist_ok=True)
    real = {p: Path(p).resolve().as_posix() for p in paths}
    failed: list[tuple[str, str]] = [(p, "file not found") for p in paths if not os.path.exists(p)]
    present = [p for p in paths if os.path.exists(p)]
    # The file list below is a UTF-8 manifest: a name that is not UTF-8 (café.jpg saved as Latin-1) is failed.
    failed += [(p, "file name is not UTF-8 text; rename the file (e.g. `convmv -f latin1 -t utf-8`) to predict on it")
               for p in present if not _is_utf8(real[p])]
    present = [p for p in present if _is_utf8(real[p])]
    if not present:
        return {"features": np.zeros((0, view_dim(view, bb.widths)), np.float32), "ok": [],
                "failed": failed, "fingerprint": fp, "cache": None}
    digest = hashlib.sha256("\n".join(sorted(real[p] for p in present)).encode()).hexdigest()[:12]
    manifest = cache_dir / f"files-{digest}.csv"
    if not manifest.exists():
        tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label"])
            for p in present:
                w.writerow([real[p], "_"])
        os.replace(tmp, manifest)
    cache_path = cache_dir / f"files-{digest}__{_slug(bb.name)}__{fingerprint_digest(fp)[:10]}.h5"
    fc = embed(
        manifest=manifest, cache=cache_path, backbone=bb.name, weights=weights, device=device,
        batch_size=batch_size, num_workers=num_workers, progress=progress, views=bb.parts, tta=bb.tta,
    )
    if not isinstance(fc, FeatureCache):  # pragma: no cover - embed always returns one
        fc = FeatureCache(cache_path)
    row = {k: i for i, k in enumerate(fc.keys())}
    bad = dict(fc.failed)
    X = fc.features(view=view) if len(fc) else np.zeros((0, fc.view_dim(view)), np.float32)
    ok_idx, rows = [], []
    for i, p in enumerate(paths):
        k = real[p]
        if k in row:
            ok_idx.append(i)
            rows.append(row[k])
        elif k in bad:
            failed.append((p, bad[k]))
        elif os.path.exists(p):
            failed.append((p, "not embedded (skipped by discovery)"))
    return {"features": X[rows] if rows else np.zeros((0, X.shape[1]), np.float32), "ok": ok_idx, "failed": failed,
            "fingerprint": fp, "cache": str(cache_path)}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a file name's undecodable bytes, kept as surrogates
        return False


def _as_paths(X) -> list[str]:
    """A list/array/Series of paths (or a one-column 2-D array/DataFrame) as a list of str."""
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    if isinstance(X, (str, os.PathLike)):
        raise ValueError("FeatureExtractor expects a list of image paths, not a single path; wrap it in a list")
    arr = np.asarray(X, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"FeatureExtractor expects a list of image paths (1-D), got an array of shape {arr.shape}"
        )
    out = []
    for v in arr:
        if not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"FeatureExtractor expects image paths (str or os.PathLike), got {type(v).__name__}: {v!r}")
        out.append(os.fspath(v))
    return out


def _fingerprint(bb) -> dict:
    """A backbone's cache fingerprint, or ``{"members": {name: fingerprint}}`` of a set's backbones."""
    if isinstance(bb, dict):
        return {"members": {n: cache_fingerprint(b, "float32") for n, b in bb.items()}}
    return cache_fingerprint(bb, "float32")


def _network(fp: dict) -> dict:
    """What of a fingerprint names the network: backbone, weights, preprocessing (of every member)."""
    if "members" in fp:
        return {n: _network(f) for n, f in fp["members"].items()}
    return {k: fp.get(k) for k in ("backbone", "weights_sha256", "preprocess")}


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: a list of image paths -> the frozen backbone's features.

    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.linear_model import LogisticRegression
    >>> clf = make_pipeline(FeatureExtractor("efficientnet_lite0"), LogisticRegression())
    >>> clf.fit(train_paths, train_labels).score(val_paths, val_labels)  # doctest: +SKIP

    ``cache_dir``: embed through a featx cache there, so transforming the same list of images
    again (another run, another head) reads the cache instead of running the network.  In a
    grid search over a pipeline, use ``Pipeline(memory=...)`` so that each CV fold's features
    are computed once for all candidates.  ``on_error``: ``"raise"`` (a bad image is an error
    naming it) or ``"nan"`` (its row is NaN).  ``fit`` only builds the backbone; the network is
    not pickled with the transformer but rebuilt (and its fingerprint checked) on first use.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        *,
        weights: str | None = None,
        device: str = "auto",
        batch_size: int = 32,
        num_workers: int | None = 0,
        cache_dir: str | None = None,
        on_error: str = "raise",
        view: str = "final",
    ) -> None:
        self.view = view
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.on_error = on_error

    # -- sklearn API
    def fit(self, X=None, y=None):
        """Build the backbone (the features need no fitting); ``X`` is not read."""
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

        bb = self._build()
        self.backbone_ = bb
        self.fingerprint_ = _fingerprint(bb)
        if isinstance(bb, dict):  # a set view VIEW@A+B: one backbone per member
            base = split_view(self.view)[0]
            self.n_features_out_ = sum(view_dim(base, b.widths) for b in bb.values())
        else:
            self.n_features_out_ = view_dim(self.view, bb.widths)
        return self

    def _build(self):
        """The backbone with the parts ``view`` needs (:func:`featx.cache.views.parts_for`); for a
        set view (``final@efficientnet_lite0+efficientnet_lite2``) {name: backbone} of its members."""
        if is_multi_view(self.view):
            base, names = split_view(self.view)
            parts, tta = parts_for(base)
            return {n: create_backbone(n, weights=self.weights, views=parts, tta=tta) for n in names}
        parts, tta = parts_for(self.view)
        return create_backbone(self.backbone, weights=self.weights, views=parts, tta=tta)

    def transform(self, X) -> np.ndarray:
        """Features ``[len(X), dim]`` (float32) of the images at the paths in ``X``."""
        check_is_fitted(self, "fingerprint_")
        paths = _as_paths(X)
        if not paths:
            return np.zeros((0, self.n_features_out_), dtype=np.float32)
        bb = self._get_backbone()
        res = embed_files(
            paths, backbone=bb, weights=self.weights, device=self.device, batch_size=self.batch_size,
            num_workers=self.num_workers, cache_dir=self.cache_dir, view=self.view,
        )
        if res["failed"] and self.on_error == "raise":
            shown = "; ".join(f"{p}: {r}" for p, r in res["failed"][:5])
            more = f" (and {len(res['failed']) - 5} more)" if len(res["failed"]) > 5 else ""
            raise FeatxError(
                f"{len(res['failed'])} image(s) could not be embedded: {shown}{more}. Remove or fix them, or use "
                "FeatureExtractor(on_error='nan') to get NaN rows instead"
            )
        out = np.full((len(paths), self.n_features_out_), np.nan, dtype=np.float32)
        out[res["ok"]] = res["features"]
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "fingerprint_")
        prefix = _slug(self.backbone).replace("-", "_").replace(".", "_")
        return np.asarray([f"{prefix}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        return tags

    # -- pickling: the network is rebuilt, not stored
    def _get_backbone(self):
        bb = getattr(self, "backbone_", None)
        if bb is None:
            bb = self._build()
            fp = _fingerprint(bb)
            if _network(fp) != _network(self.fingerprint_):
                raise FeatxError(
                    f"FeatureExtractor was fitted with backbone {self.fingerprint_} but rebuilding it here gives "
                    f"{fp}; pass the same weights file (weights=...) as when it was fitted"
                )
            self.backbone_ = bb
        return bb

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("backbone_", None)
        return state
