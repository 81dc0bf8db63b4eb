"""Exceptions whose message tells the user what to do next."""


class FeatxError(Exception):
    """A user-facing error: the message names the file or option and the fix."""


class CacheMismatchError(FeatxError):
    """A cache exists but was written with other settings (backbone, weights, preprocessing)."""


class CacheLockedError(FeatxError):
    """Another process holds the cache's lock."""


class CacheWriteError(FeatxError):
    """Writing the cache failed (disk full, quota, file-size limit); committed work is kept."""


class FileWriteError(FeatxError, OSError):
    """A file could not be written (disk full, quota, permissions): the message names it and the fix.

    Also an OSError, so code that handles a failed write as an OSError still does."""
