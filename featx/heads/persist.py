"""Saved heads: joblib file + JSON sidecar (sha256, backbone fingerprint), verified on load."""

from __future__ import annotations

import json
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..base.errors import FeatxError
from ..base.io import sha256_file, write_json
FINGERPRINT_KEYS = ("backbone", "weights_sha256", "preprocess")

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "featx-head/1"


def _sha256(path: str | os.PathLike) -> str:

    return sha256_file(path)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_head(estimator, path: str | os.PathLike, *, sidecar: dict) -> Path:
    """Write ``path`` (joblib) and its JSON sidecar (with the file's sha256); returns ``path``."""
    import joblib
    import sklearn

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    joblib.dump(estimator, tmp)
    os.replace(tmp, path)
    meta = dict(sidecar)
    meta.update(
        format=SIDECAR_FORMAT,
        sha256=_sha256(path),
        model_file=path.name,
        featx_version=__version__,
        sklearn_version=sklearn.__version__,
        joblib_version=joblib.__version__,
        python_version=platform.python_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )

    write_json(sidecar_path(path), meta)
    return path


def load_head(path: str | os.PathLike) -> tuple[Any, dict]:
    """Load a saved head after checking its sidecar and sha256; returns (estimator, sidecar).

    Heads are pickles: a file whose checksum does not match its sidecar is never unpickled.
    """
    import joblib
    import sklearn

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".joblib")
    if not path.is_file():
        raise FeatxError(f"head file {str(path)!r} does not exist; pass a .joblib file written by `featx probe`")
    sc = sidecar_path(path)
    if not sc.is_file():
        raise FeatxError(
            f"head {str(path)!r} has no sidecar {sc.name}; featx refuses to unpickle a head it cannot verify. "
            "Re-create it with `featx probe`"
        )
    try:
        meta = json.loads(sc.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeatxError(f"head sidecar {str(sc)!r} is unreadable ({exc}); re-create the head with `featx probe`") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "sha256" not in meta:
        raise FeatxError(f"{str(sc)!r} is not a featx head sidecar ({SIDECAR_FORMAT}); re-create the head with `featx probe`")
    digest = _sha256(path)
    if digest != meta["sha256"]:
        raise FeatxError(
            f"head {str(path)!r} does not match the sha256 in {sc.name} (file {digest[:12]}..., sidecar "
            f"{str(meta['sha256'])[:12]}...): it was modified or damaged, so it was NOT unpickled. "
            "Re-create it with `featx probe`"
        )
    if meta.get("sklearn_version") != sklearn.__version__:
        log.warning(
            "head %s was saved with scikit-learn %s, this is %s; predictions may differ",
            path, meta.get("sklearn_version"), sklearn.__version__,
        )
    est = joblib.load(path)
    return est, meta


def check_head_compatible(sidecar: dict, fingerprint: dict, *, dim: int | None = None, what: str = "these features") -> None:
    """Refuse to apply a head to features from another backbone, weights or preprocessing."""
    trained = sidecar.get("fingerprint_dict") or {}
    def show(k: str, v: Any) -> str:
        return repr(v[:12] + "...") if k == "weights_sha256" and isinstance(v, str) else repr(v)

    diffs = [
        f"{k}: head trained on {show(k, trained.get(k))}, {what} has {show(k, fingerprint.get(k))}"
        for k in FINGERPRINT_KEYS
        if trained.get(k) != fingerprint.get(k)
    ]
    if dim is not None and sidecar.get("dim") not in (None, dim):
        diffs.append(f"feature dimension: head expects {sidecar.get('dim')}, {what} has {dim}")
    if diffs:
        raise FeatxError(
            f"head {sidecar.get('model_file', '?')} does not fit {what}: " + "; ".join(diffs)
            + f". Embed the images with --backbone {trained.get('backbone')} (same weights), or train a head on "
            "this cache with `featx probe`"
        )
