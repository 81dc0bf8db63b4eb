"""Several backbones in one run: ``featx embed DATA --backbone efficientnet_lite0,efficientnet_lite2``.

Each backbone fills its own ordinary cache (so each is resumable, works with ``--shard`` and
``--executor ray`` exactly as a one-backbone run), then a set file names them
(:mod:`featx.cache.multi`); ``featx probe`` on it chooses among every backbone's views and
their concatenation.  :func:`embed_files_multi` gives the same arrays for image files (predict,
``FeatureExtractor``) so that a head trained on a set applies to new images.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from ..base.errors import FeatxError
from ..cache.multi import MultiCache, compose_multi, split_view, write_set
from ..cache.store import FeatureCache
from ..config.settings import EmbedSettings
from .runner import embed

log = logging.getLogger(__name__)


def split_backbones(backbone: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (each once, in order)."""
    names = backbone.split(",") if isinstance(backbone, str) else list(backbone)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise FeatxError(f"--backbone {backbone!r}: name a backbone, or a comma list of them")
    if len(set(names)) != len(names):
        raise FeatxError(f"--backbone {backbone!r}: name each backbone once")
    return names


def embed_backbones(root=None, *, settings: EmbedSettings | None = None,
                    **overrides) -> tuple[list, MultiCache | None]:
    """Embed with each backbone of ``settings.backbone`` (``"a,b"``) in turn; returns (each run's result, the set).

    ``settings``/``overrides`` as for :func:`featx.embedding.runner.embed`.
    One backbone: ``([its FeatureCache or ShardResult], None)``, the same as :func:`featx.embed`.
    Several: one cache each, then the set file (not with ``shard``: run the command without it
    once every shard has finished, as for one backbone).  ``weights`` may only be ``"random"``
    with several backbones, and ``cache`` (one exact file) only with one.
    """
    s = settings if settings is not None else EmbedSettings()
    names = split_backbones(overrides.pop("backbone", s.backbone))
    weights = overrides.get("weights", s.weights)
    cache = overrides.get("cache", overrides.get("cache_path", s.cache_path))
    if len(names) > 1:
        if weights not in (None, "random"):
            raise FeatxError("--weights FILE fits one backbone; embed each backbone with its own command, "
                             "or drop --weights for several")
        if cache is not None:
            raise FeatxError("--cache names one file; with several backbones use --cache-dir")
    results = [embed(root, settings=s, **overrides, backbone=n) for n in names]
    if len(names) == 1 or not all(isinstance(r, FeatureCache) for r in results):
        return results, None
    path = write_set(results)
    log.info("wrote cache set %s (%s)", path, ", ".join(names))
    return results, MultiCache(path)


def embed_files_multi(paths: Sequence[str | os.PathLike], *, view: str, embed_one, backbones: dict | None = None,
                      **kwargs) -> dict:
    """:func:`featx.embedding.extractor.embed_files` for a set view (``VIEW@A`` or ``VIEW@A+B``).

    ``embed_one(paths, backbone=..., view=..., **kwargs)`` embeds with one member (``backbones``:
    already built ones by name); rows that failed with any member are failed.
    ``kwargs["weights"]`` may be a dict {backbone: weights}.
    """
    base, names = split_view(view)
    weights = kwargs.pop("weights", None)
    per = {}
    for n in names:
        w = weights.get(n) if isinstance(weights, dict) else weights
        per[n] = embed_one(paths, backbone=(backbones or {}).get(n, n), view=base, weights=w, **kwargs)
    ok = sorted(set.intersection(*(set(r["ok"]) for r in per.values())))
    failed = list(dict.fromkeys(f for r in per.values() for f in r["failed"]))
    rows = {n: {i: j for j, i in enumerate(r["ok"])} for n, r in per.items()}
    def get(n: str, _base: str) -> np.ndarray:
        X = per[n]["features"]
        return X[[rows[n][i] for i in ok]] if ok else X[:0]

    return {"features": compose_multi(view, get), "ok": ok, "failed": failed,
            "fingerprint": {"members": {n: r["fingerprint"] for n, r in per.items()}}, "cache": None}
