"""What identifies a cache: the data it holds, and the embedding settings that made its features.

Why: two data sets embedded with the same backbone and preprocessing share their *embedding
settings* (what older featx called the cache's "fingerprint"), so the settings alone cannot tell
one data set's results from another's.  The *data identity* is a digest of the rows themselves:
their keys, labels and splits, and the class names.  A cache's identity is the pair; every run
records the identity of what it read, and the report, compare, few-shot and audit join artifacts
only when the identities are equal.  An artifact without an identity (written by an older featx)
is never joined to another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

IDENTITY_VERSION = 1


def data_digest(keys: Sequence[str], labels: np.ndarray, splits: np.ndarray, classes: Sequence[str]) -> str:
    """sha256 of the rows' keys, labels and splits, in row order, and of the class names."""
    h = hashlib.sha256(f"featx-data-v{IDENTITY_VERSION}\n".encode())
    h.update(json.dumps(list(classes)).encode())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    for key, split in zip(keys, np.asarray(splits).astype(str)):
        h.update(f"\n{split}\t".encode())
        h.update(key.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheIdentity:
    """The data a cache (or cache set) holds and the embedding settings of its features."""

    data: str
    embedding_settings: str

    @property
    def digest(self) -> str:
        """One digest of both: equal only for the same rows embedded with the same settings."""
        return hashlib.sha256(f"{self.data}:{self.embedding_settings}".encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.digest[:12]

    def to_dict(self) -> dict:
        return {"digest": self.digest, "data": self.data, "embedding_settings": self.embedding_settings}

    @classmethod
    def from_record(cls, doc: Any) -> "CacheIdentity | None":
        """The identity a run's JSON recorded, or None (an older run, or a damaged record)."""
        if not isinstance(doc, dict):
            return None
        ident = doc.get("identity")
        for where in ("cache", "source"):  # compare.json's cache summary, fewshot.json's source
            if not isinstance(ident, dict) and isinstance(doc.get(where), dict):
                ident = doc[where].get("identity")
        if not isinstance(ident, dict):
            return None
        data, emb = ident.get("data"), ident.get("embedding_settings")
        if not (isinstance(data, str) and isinstance(emb, str)):
            return None
        return cls(data, emb)


def identity_of(fc) -> CacheIdentity:
    """The identity of a FeatureCache or MultiCache (computed from its rows; memoised on the object)."""
    found = getattr(fc, "_identity_memo", None)
    if found is None:
        found = CacheIdentity(data_digest(fc.keys(), fc.labels(), fc.split_array(), fc.classes), fc.embedding_settings)
        try:
            fc._identity_memo = found
        except AttributeError:  # a read-only stand-in: compute again next time
            pass
    return found


def same_source(a: Any, b: Any) -> bool:
    """Whether two run records (dicts holding ``identity``) name the same cache; False when either has none."""
    ia, ib = CacheIdentity.from_record(a), CacheIdentity.from_record(b)
    return ia is not None and ib is not None and ia == ib
