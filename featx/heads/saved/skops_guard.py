"""Checks of a skops head and its sidecar before anything in them is built or used.

Why: a head is the file strangers send.  A skops archive can point many array nodes at one
large entry, so the sum of its entries (what a zip-bomb check counts) understates what loading
allocates: every reference is counted here, before anything is unpacked.  A sidecar's fields
are read as typed values (a list of class names, integer estimator classes, ...): a wrong type
is a one-line error, not a traceback deep in ``featx predict``.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from ...base.errors import FeatxError

MAX_SCHEMA_BYTES = 64 << 20
# scikit-learn helpers that featx's own heads hold and skops does not trust by default
# (a fitted search's scorer, SVC's probability calibration, CV splitters).
SKLEARN_HELPERS = frozenset({
    "sklearn.metrics._scorer._Scorer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


def _references(node: Any, out: list[str], depth: int = 0) -> None:
    if depth > 200:
        raise ValueError("its schema nests deeper than 200 levels")
    if isinstance(node, dict):
        if isinstance(node.get("file"), str):
            out.append(node["file"])
        for v in node.values():
            _references(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _references(v, out, depth + 1)


def check_archive(data: bytes, path, limit: int) -> None:
    """Refuse a skops archive whose entries, counted once per reference, would unpack beyond ``limit``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            sizes = {i.filename: max(i.file_size, 0) for i in zf.infolist()}
            if sizes.get("schema.json", 0) > MAX_SCHEMA_BYTES:
                raise ValueError(f"its schema.json is {sizes['schema.json']} bytes")
            schema = json.loads(zf.read("schema.json")) if "schema.json" in sizes else None
        refs: list[str] = []
        _references(schema, refs)
    except (zipfile.BadZipFile, KeyError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise FeatxError(f"head {str(path)!r} is not a readable skops file ({exc}); it was NOT loaded. "
                         "Re-create it with `featx probe`") from None
    total = sum(sizes.get(r, 0) for r in refs) + sizes.get("schema.json", 0)
    if total > limit:
        shared = len(refs) - len(set(refs))
        raise FeatxError(f"head {str(path)!r} would unpack to {total} bytes ({len(refs)} array references"
                         + (f", {shared} of them to entries already used" if shared else "")
                         + f", from a {len(data)}-byte file: a zip bomb?); it was NOT loaded. Re-create it with `featx probe`")


def _is(value: Any, kind: str) -> bool:
    if value is None:
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "str_or_str_dict":  # a cache set's heads (featx.cache.multi): {backbone: value}
        return isinstance(value, str) or (isinstance(value, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()))
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "int_list":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


SIDECAR_FIELDS = {"classes": "str_list", "estimator_classes": "int_list", "fingerprint_dict": "dict", "view": "str",
                  "backbone": "str", "head": "str", "dim": "int", "model_file": "str", "weights_source": "str_or_str_dict",
                  "sha256": "str"}


_KIND_TEXT = {"str_or_str_dict": "str or {backbone: str}"}


def check_sidecar_fields(meta: dict, sidecar) -> None:
    """Raise FeatxError naming the first sidecar field whose value has the wrong type."""
    for key, kind in SIDECAR_FIELDS.items():
        if not _is(meta.get(key), kind):
            shown = type(meta[key]).__name__
            raise FeatxError(f"head sidecar {str(sidecar)!r}: field {key!r} should be {_KIND_TEXT.get(kind, kind.replace('_', ' of '))}, "
                             f"not {shown}; re-create the head with `featx probe`")
    classes, est = meta.get("classes") or [], meta.get("estimator_classes") or []
    if classes and any(not 0 <= c < len(classes) for c in est):
        raise FeatxError(f"head sidecar {str(sidecar)!r}: estimator_classes index beyond its {len(classes)} classes; "
                         "re-create the head with `featx probe`")


def check_classifier(est: Any, path) -> None:
    """A loaded head must at least predict: anything else is refused before it sees a feature."""
    if not callable(getattr(est, "predict", None)):
        raise FeatxError(f"head {str(path)!r} holds a {type(est).__name__}, not a classifier (it has no predict); "
                         "re-create the head with `featx probe`")
