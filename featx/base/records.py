"""Read access by key to result dataclasses, for callers written against the earlier plain-dict results."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class ItemAccess:
    """``result[key]``, ``result.get(key)`` and ``key in result`` over the fields of a result dataclass (read only).

    ``_unset(name, value)``: a subclass may hide fields that are not filled in yet (they read as absent).
    """

    def _unset(self, name: str, value: Any) -> bool:
        return False

    def _present(self, key: object) -> bool:
        return key in self.__dataclass_fields__ and not self._unset(key, getattr(self, key))

    def __getitem__(self, key: str) -> Any:
        if not self._present(key):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if self._present(key) else default

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if self._present(f.name)]

    def __contains__(self, key: object) -> bool:
        return self._present(key)
