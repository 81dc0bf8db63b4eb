"""Compatibility alias: the exceptions live in :mod:`featx.base.errors`."""

from .base.errors import CacheLockedError, CacheMismatchError, CacheWriteError, FeatxError

__all__ = ["FeatxError", "CacheMismatchError", "CacheLockedError", "CacheWriteError"]
