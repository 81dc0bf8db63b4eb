"""Saved heads: a skops file (or, for compatibility, joblib) + JSON sidecar (sha256, backbone fingerprint).

Heads are the files people share ("here is my classifier"), so loading one must not run code.
The default format is skops (``NAME.skops``): loading it only ever builds objects of types on an
allow-list (what skops trusts itself, scikit-learn's estimators, scorers and metric functions,
and featx's own head classes); a file naming any other type is refused with that type's name.
joblib files (``NAME.joblib``) are pickles, and unpickling runs whatever code the file carries:
they are loaded only with ``trust=True`` (``featx predict --trust``), after the sidecar check.
Whether a file is skops or a pickle is decided from its bytes (a skops file is a zip archive),
never from its name or its sidecar, which come from the same stranger as the file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import platform
import re
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...base.choices import HEAD_FORMATS
from ...base.errors import FeatxError
from ...base.files import check_regular, read_regular
from ...base.io import atomic_write_bytes, sha256_file, write_json
from ...base.version import __version__
from .skops_guard import SKLEARN_HELPERS, check_archive, check_classifier, check_sidecar_fields

# "precision" is set only by feature-changing runtimes (openvino-bf16); absent on both sides it matches.
FINGERPRINT_KEYS = ("backbone", "weights_sha256", "preprocess", "precision")

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "featx-head/1"
HEAD_SUFFIXES = {"skops": ".skops", "joblib": ".joblib"}
MAX_UNPACKED_BYTES = 1 << 30  # a skops head bigger than its file by more than this (and 100x) is refused

# A dotted Python name, no component that is a test module (never imported to judge a name).
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_NEVER_IMPORTED = re.compile(r"(^|\.)(tests?|conftest|_?testing|externals|experimental|_build_utils)(\.|$)")


def _sha256(path: str | os.PathLike) -> str:

    return sha256_file(path)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


# --------------------------------------------------------------------------- which types a head may hold


# Where the head classes lived before heads/ was split into sub-packages: heads saved then name these modules.
LEGACY_MODULES: dict[str, str] = {
    "featx.heads.linear_path": "featx.heads.estimators.linear_path",
    "featx.heads.torch_heads": "featx.heads.estimators.torch_heads",
    "featx.heads.dino_knn": "featx.heads.estimators.dino_knn",
    "featx.heads.search": "featx.heads.tuning.cv",
    "featx.heads.selection": "featx.heads.tuning.selection",
    "featx.heads.streaming": "featx.heads.stream.linear",
    "featx.heads.stream_knn": "featx.heads.stream.knn",
}


def alias_legacy_modules(names: list[str] | None = None) -> None:
    """Let heads saved before the split load: each old module name (of ``names``, or all) aliases its new home."""
    for old, new in LEGACY_MODULES.items():
        if old not in sys.modules and (names is None or any(n.startswith(old + ".") for n in names)):
            sys.modules[old] = importlib.import_module(new)


def _resolve(name: str) -> Any:
    """The object a dotted name refers to (longest importable module prefix + attributes), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - not a module: try a shorter prefix
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except Exception:  # noqa: BLE001 - the attribute does not exist
            return None
        return obj
    return None


def _is_estimator_or_splitter(obj: Any) -> bool:
    from sklearn.base import BaseEstimator  # scikit-learn is heavy: only when a head is saved or loaded
    from sklearn.model_selection import BaseCrossValidator

    return isinstance(obj, type) and issubclass(obj, (BaseEstimator, BaseCrossValidator))


def is_trusted_type(name: str) -> bool:
    """Whether a type a skops file names (beyond skops' own trusted set) may be loaded.

    featx's heads: ``featx.heads.*`` classes (defined in featx.heads, wherever they are
    re-exported from) that are scikit-learn estimators or CV splitters.  scikit-learn, beyond
    the estimators skops trusts itself: only the helpers featx's heads hold (a search's scorer,
    SVC's calibration: :data:`~featx.heads.saved.skops_guard.SKLEARN_HELPERS`), CV splitters, and
    public metric functions (what a fitted ``GridSearchCV``'s scorer refers to).  Anything else
    (e.g. ``sklearn.metrics._dist_metrics.MahalanobisDistance32``, which skops lists as
    untrusted) is refused.
    """
    if not _DOTTED.match(name) or _NEVER_IMPORTED.search(name):
        return False
    if name.startswith("featx.heads."):
        obj = _resolve(name)
        return (
            _is_estimator_or_splitter(obj)
            and obj.__module__.startswith("featx.heads.")
            and obj.__name__ == name.rsplit(".", 1)[1]
        )
    if not name.startswith("sklearn."):
        return False
    obj = _resolve(name)
    module = getattr(obj, "__module__", None) or ""
    if obj is None or not module.startswith("sklearn.") or getattr(obj, "__name__", None) != name.rsplit(".", 1)[1]:
        return False
    if isinstance(obj, type):  # beyond what skops trusts: only the helpers featx's heads hold, and CV splitters
        from sklearn.model_selection import BaseCrossValidator  # heavy: see above

        return name in SKLEARN_HELPERS or issubclass(obj, BaseCrossValidator)
    import sklearn.metrics  # heavy: see above

    return callable(obj) and getattr(sklearn.metrics, obj.__name__, None) is obj


def refused_types(names: list[str]) -> list[str]:
    """The names in ``names`` that :func:`is_trusted_type` refuses."""
    return [n for n in names if not is_trusted_type(n)]


# --------------------------------------------------------------------------- save


def _head_bytes(estimator, fmt: str, path: Path) -> bytes:
    """The file's bytes; a skops dump is checked to load again under the allow-list."""
    if fmt == "joblib":
        import joblib  # heavy: only when a head is saved

        buf = io.BytesIO()
        joblib.dump(estimator, buf)
        return buf.getvalue()
    import skops.io as sio  # optional-ish and heavy: only when a head is saved

    data = sio.dumps(estimator)
    bad = refused_types(sio.get_untrusted_types(data=data))
    if bad:
        raise FeatxError(
            f"head {path.name}: {type(estimator).__name__} holds types featx would refuse to load "
            f"({', '.join(bad)}); heads must hold scikit-learn/numpy objects (a featx bug: please report it). "
            "Save it with format='joblib' (`featx probe --format joblib`) meanwhile"
        )
    return data


def save_head(estimator, path: str | os.PathLike, *, sidecar: dict, format: str = "skops") -> Path:
    """Write the head (``format`` "skops" or "joblib") and its JSON sidecar; returns the head's path.

    The suffix follows the format (``svm.joblib`` with format "skops" is written as
    ``svm.skops``), so callers may pass any name.  The sidecar (``svm.json``) records the file's
    sha256, its name and format, and the versions that wrote it.
    """
    import joblib  # heavy: only when a head is saved
    import sklearn

    if format not in HEAD_FORMATS:
        raise FeatxError(f"head format {format!r}: expected one of {', '.join(HEAD_FORMATS)}")
    path = Path(path).with_suffix(HEAD_SUFFIXES[format])
    data = _head_bytes(estimator, format, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    meta = dict(sidecar)
    meta.update(
        format=SIDECAR_FORMAT,
        sha256=_sha256(path),
        model_file=path.name,
        model_format=format,
        featx_version=__version__,
        sklearn_version=sklearn.__version__,
        joblib_version=joblib.__version__,
        python_version=platform.python_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if format == "skops":
        import skops  # heavy: see above

        meta["skops_version"] = skops.__version__

    write_json(sidecar_path(path), meta)
    for other in HEAD_SUFFIXES.values():  # one sidecar per name: a head of the other format would no longer match it
        if other != path.suffix:
            path.with_suffix(other).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- load


def _head_file(path: Path) -> Path:
    """The head file for ``path``: itself, or for a sidecar (``.json``) the file it names."""
    if path.suffix != ".json" and (path.exists() or path.suffix in HEAD_SUFFIXES.values()):
        return path
    if path.suffix == ".json" and path.is_file():
        try:
            named = json.loads(path.read_text(encoding="utf-8")).get("model_file")
        except (OSError, ValueError, AttributeError):
            named = None
        # Only a plain file name beside the sidecar: a sidecar must not point elsewhere.
        if isinstance(named, str) and named and Path(named).name == named and named not in (".", ".."):
            return path.with_name(named)
    for suffix in HEAD_SUFFIXES.values():
        if path.with_suffix(suffix).is_file():
            return path.with_suffix(suffix)
    return path.with_suffix(".skops") if path.suffix == ".json" else path


def _verified_sidecar(path: Path, data: bytes) -> dict:
    """The sidecar of ``path`` after checking that it describes exactly these bytes."""
    sc = sidecar_path(path)
    if not sc.is_file():
        raise FeatxError(
            f"head {str(path)!r} has no sidecar {sc.name}; featx refuses to load a head it cannot verify. "
            "Re-create it with `featx probe`"
        )
    try:
        meta = json.loads(read_regular(sc, "head sidecar").decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise FeatxError(f"head sidecar {str(sc)!r} is unreadable ({exc}); re-create the head with `featx probe`") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "sha256" not in meta:
        raise FeatxError(f"{str(sc)!r} is not a featx head sidecar ({SIDECAR_FORMAT}); re-create the head with `featx probe`")
    if meta.get("model_file") not in (None, path.name):
        raise FeatxError(
            f"sidecar {sc.name} describes {str(meta.get('model_file'))!r}, not {path.name!r}, so {path.name} was NOT "
            "loaded (a head saved in the other format has replaced its sidecar?). Re-create it with `featx probe`"
        )
    check_sidecar_fields(meta, sc)
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise FeatxError(
            f"head {str(path)!r} does not match the sha256 in {sc.name} (file {digest[:12]}..., sidecar "
            f"{str(meta['sha256'])[:12]}...): it was modified or damaged, so it was NOT unpickled or loaded. "
            "Re-create it with `featx probe`"
        )
    return meta


def _load_skops(path: Path, data: bytes) -> Any:
    """Build the head from a skops file, trusting only :func:`is_trusted_type` types."""
    import skops.io as sio  # heavy: only when a head is loaded

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        unpacked = sum(max(i.file_size, 0) for i in zf.infolist())
    if unpacked > max(MAX_UNPACKED_BYTES, 100 * len(data)):  # featx writes skops files uncompressed
        raise FeatxError(
            f"head {str(path)!r} would unpack to {unpacked} bytes from {len(data)} (a zip bomb?); it was NOT "
            "loaded. Re-create it with `featx probe`"
        )
    check_archive(data, path, max(MAX_UNPACKED_BYTES, 100 * len(data)))  # every array reference counted
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # noqa: BLE001 - a zip that is not a readable skops file
        raise FeatxError(f"head {str(path)!r} is not a readable skops file ({exc}); re-create it with `featx probe`") from None
    alias_legacy_modules(untrusted)
    bad = refused_types(untrusted)
    if bad:
        raise FeatxError(
            f"head {str(path)!r} names types featx does not trust: {', '.join(bad)}; it was NOT loaded. "
            "featx loads only scikit-learn and featx head types: re-create the head with `featx probe`"
        )
    try:
        return sio.loads(data, trusted=untrusted)
    except Exception as exc:  # noqa: BLE001 - malformed content of trusted types
        raise FeatxError(f"head {str(path)!r} could not be loaded ({type(exc).__name__}: {exc}); re-create it with `featx probe`") from None


def load_head(path: str | os.PathLike, *, trust: bool = False) -> tuple[Any, dict]:
    """Load a saved head after checking its sidecar and sha256; returns (estimator, sidecar).

    A skops head only ever builds allowed types (see :func:`is_trusted_type`).  A pickle
    (joblib) can run code when loaded: it is refused unless ``trust`` is True
    (``featx predict --trust``), and even then only when it matches its sidecar.  A sha256 that
    matches proves the file is undamaged, not who made it: a stranger sends both files.
    """
    import sklearn  # heavy: only when a head is loaded

    path = _head_file(Path(path))
    check_regular(path, "head file")  # a FIFO would block the read for ever
    if not path.is_file():
        raise FeatxError(f"head file {str(path)!r} does not exist; pass a .skops or .joblib file written by `featx probe`")
    try:
        data = read_regular(path, "head file")  # hashed and loaded from the same bytes: no swap in between
    except OSError as exc:
        raise FeatxError(f"head file {str(path)!r} cannot be read ({exc.strerror or exc}); check its permissions") from None
    meta = _verified_sidecar(path, data)
    is_skops = zipfile.is_zipfile(io.BytesIO(data))
    if not is_skops and not trust:
        raise FeatxError(
            f"head {str(path)!r} is a pickle; pickles can run code: pass --trust if you trust its source, "
            "or re-save it with featx probe (skops)"
        )
    if meta.get("sklearn_version") != sklearn.__version__:
        log.warning(
            "head %s was saved with scikit-learn %s, this is %s; predictions may differ",
            path, meta.get("sklearn_version"), sklearn.__version__,
        )
    if is_skops:
        est = _load_skops(path, data)
        check_classifier(est, path)
        return est, meta
    log.warning(
        "loading the pickled head %s because trust was given (--trust): unpickling runs any code the file "
        "holds, and a matching sha256 only shows it is undamaged, not who made it; prefer .skops heads",
        path,
    )
    import joblib  # heavy: only for trusted pickles

    alias_legacy_modules()
    try:
        return joblib.load(io.BytesIO(data)), meta
    except Exception as exc:  # noqa: BLE001 - e.g. a class that no longer exists
        raise FeatxError(
            f"head {str(path)!r} could not be unpickled ({type(exc).__name__}: {exc}); re-create it with `featx probe`"
        ) from None


def _member_diffs(trained: dict, fingerprint: dict, what: str) -> list[str]:
    """Differences of the member backbones of a cache set (featx.cache.multi); none for one backbone."""
    a, b = trained.get("members"), fingerprint.get("members")
    if a is None and b is None:
        return []
    if not isinstance(a, dict) or not isinstance(b, dict) or list(a) != list(b):
        return [f"backbones: head trained on {list(a or {}) or 'one backbone'}, {what} has {list(b or {}) or 'one'}"]
    return [f"backbone {n}: {k} differs" for n in a for k in FINGERPRINT_KEYS if a[n].get(k) != b[n].get(k)]


def check_head_compatible(sidecar: dict, fingerprint: dict, *, dim: int | None = None, what: str = "these features") -> None:
    """Refuse to apply a head to features from another backbone, weights or preprocessing."""
    trained = sidecar.get("fingerprint_dict") or {}
    def show(k: str, v: Any) -> str:
        return repr(v[:12] + "...") if k == "weights_sha256" and isinstance(v, str) else repr(v)

    diffs = [
        f"{k}: head trained on {show(k, trained.get(k))}, {what} has {show(k, fingerprint.get(k))}"
        for k in FINGERPRINT_KEYS
        if trained.get(k) != fingerprint.get(k)
    ] + _member_diffs(trained, fingerprint, what)
    if dim is not None and sidecar.get("dim") not in (None, dim):
        diffs.append(f"feature dimension: head expects {sidecar.get('dim')}, {what} has {dim}")
    if diffs:
        raise FeatxError(
            f"head {sidecar.get('model_file', '?')} does not fit {what}: " + "; ".join(diffs)
            + f". Embed the images with --backbone {trained.get('backbone')} (same weights), or train a head on "
            "this cache with `featx probe`"
        )
