"""Images under any fsspec URL (``s3://``, ``gs://``, ``az://``, ``file://``, ...): listing, stamps, reads.

featx writes no storage client: fsspec and its back-ends (s3fs, gcsfs, adlfs; the ``storage``, ``gcs`` and
``azure`` extras) do the talking, with credentials and endpoints from each library's own conventions (for S3:
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, the ``AWS_*`` keys); ``--storage-option KEY=VALUE`` passes anything else.

Reads never raise: an object that cannot be read becomes a recorded failure with its reason.  Timeouts,
throttling and server errors are retried with exponential backoff first; a URL that does not exist or
has no credentials is refused at discovery, before any work, with one line naming the URL and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Callable
from urllib.parse import urlsplit

from ..base.errors import FeatxError
from . import guards
from .folders import SPLIT_NAMES, Dataset, Sample, class_name, is_image_name, parse_manifest
from .splits import canonical_split

log = logging.getLogger(__name__)

# Transient faults (timeouts, throttling, server errors) are tried this many times, waiting
# BACKOFF_S * 2**attempt between tries (0.25 s, 0.5 s, 1 s, 2 s).
TRIES = 5
BACKOFF_S = 0.25
_TRANSIENT = ("timeout", "timed out", "throttl", "slowdown", "slow down", "503", "500", "502", "504",
              "serviceunavailable", "internalerror", "requestlimitexceeded", "toomanyrequests", "429",
              "connection", "reset by peer", "temporarily")
_EXTRAS = {"s3": "storage", "s3a": "storage", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
           "abfss": "azure", "adl": "azure"}
_STORAGE: dict = {}
_POOL: dict = {}  # pid -> executor (a DataLoader worker must not use its parent's threads)
_POOL_LOCK = threading.Lock()


def is_url(text: str) -> bool:
    return "://" in text


def parse_storage_options(pairs) -> dict:
    """``KEY=VALUE`` strings as fsspec keyword arguments (VALUE parsed as JSON when it is JSON: true, 3, {...})."""
    out = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise FeatxError(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. --storage-option anon=true")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def set_storage_options(options: dict) -> None:
    global _STORAGE
    _STORAGE = dict(options)


def filesystem(url: str):
    """(fsspec file system, path inside it) for ``url``, or a one-line error naming the extra to install."""
    import fsspec  # the storage extra; imported only when a URL is read

    proto = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **_STORAGE)
    except ImportError as exc:
        extra = _EXTRAS.get(proto, "storage")
        raise FeatxError(f"{url}: reading {proto}:// URLs needs {exc.name or 'its fsspec back-end'}: "
                         f"pip install 'featx[{extra}]'") from None
    except (ValueError, TypeError) as exc:
        raise FeatxError(f"{url}: {exc}; check the URL and --storage-option values") from None


def stamp_of_info(info: dict) -> tuple[int, int]:
    """(stamp, size) of an object: a number from its ETag (or MD5), else its modification time in ns."""
    size = int(info.get("size") or info.get("Size") or 0)
    for k in ("ETag", "etag", "md5Hash", "content_md5", "md5"):
        tag = info.get(k)
        if tag:
            return int(hashlib.sha1(str(tag).strip('"').encode()).hexdigest()[:15], 16), size
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        t = info.get(k)
        if isinstance(t, datetime):
            return int(t.timestamp() * 1e9), size
        if isinstance(t, (int, float)):
            return int(t * 1e9), size
        if isinstance(t, str):
            try:
                return int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1e9), size
            except ValueError:
                continue
    return 0, size


def refusal(url: str, exc: BaseException) -> FeatxError:
    """The one-line error for a URL that cannot be listed or opened at discovery."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    endpoint = _endpoint(url)
    dead = _unreachable(endpoint) if endpoint and ("credential" in low or "unable to locate" in low
                                                     or "connect" in low or "endpoint" in low) else ""
    if dead:
        return FeatxError(f"{url}: the endpoint {endpoint} cannot be reached ({dead}); start the server or fix "
                          "AWS_ENDPOINT_URL / --storage-option endpoint_url")
    if "could not connect" in low or "connection refused" in low or "endpointconnectionerror" in low:
        return FeatxError(f"{url}: the storage endpoint cannot be reached ({text.splitlines()[0][:200]}); check the "
                          "network and the endpoint (AWS_ENDPOINT_URL, --storage-option endpoint_url)")
    if "credential" in low or "nocredentials" in low or "unable to locate" in low:
        return FeatxError(f"{url}: no credentials found; set them as the storage library expects (for S3: "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), or pass --storage-option "
                          "anon=true for a public bucket")
    if isinstance(exc, PermissionError) or "accessdenied" in low or "403" in low or "forbidden" in low:
        return FeatxError(f"{url}: access denied ({exc}); use credentials that may read it")
    if isinstance(exc, FileNotFoundError) or "nosuchbucket" in low or "404" in low:
        return FeatxError(f"{url} does not exist; check the bucket and path (and AWS_ENDPOINT_URL for an "
                          "S3-compatible server)")
    return FeatxError(f"{url}: cannot list it ({text.splitlines()[0]}); check the URL, the endpoint and "
                      "--storage-option values")


def _endpoint(url: str) -> str:
    """The endpoint URL configured for an S3 URL (storage options, then AWS_ENDPOINT_URL[_S3]), or ""."""
    if url.split("://", 1)[0].lower() not in ("s3", "s3a"):
        return ""
    opts = _STORAGE.get("client_kwargs") or {}
    return str(_STORAGE.get("endpoint_url") or (opts.get("endpoint_url") if isinstance(opts, dict) else "")
               or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "")


def _unreachable(endpoint: str, timeout: float = 3.0) -> str:
    """Why a TCP connection to the endpoint's host and port fails ("" when it connects)."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return ""
    except ValueError as exc:
        return f"not a URL: {exc}"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def list_objects(url: str) -> tuple[object, str, dict[str, dict]]:
    """(fs, root path, {relative key: info}) of every object under ``url``; refuses a missing or empty URL."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        found = fs.find(path, detail=True)
    except Exception as exc:  # noqa: BLE001 - every back-end has its own exceptions; all refuse the same way
        raise refusal(url, exc) from None
    if not found:
        raise refusal(url, FileNotFoundError(url))
    out = {}
    for name, info in found.items():
        name = name.rstrip("/")
        if info.get("type", "file") == "file" and name.startswith(path + "/"):
            out[name[len(path) + 1:]] = info
    return fs, path, out


def layout_from_keys(keys: list[str], skipped: list) -> tuple[str, list[str], list[tuple[str, str, str]]]:
    """(layout, classes, [(key, class, split)]) for relative keys, with a local folder's rules:
    ``<split>/<class>/…`` when split folders exist, else ``<class>/…``; the same order as a folder walk."""
    keys = sorted((k for k in keys if is_image_name(k.rsplit("/", 1)[-1]) and
                   not any(c.startswith(".") for c in k.split("/"))), key=lambda k: k.split("/"))
    split_layout = any("/" in k and canonical_split(k.split("/", 1)[0]) for k in keys)
    rows = []
    for k in keys:
        parts = k.split("/")
        if split_layout:
            if not canonical_split(parts[0]):
                continue
            if len(parts) < 3:
                skipped.append((k, f"image directly in split folder {parts[0]!r}, not in a class folder"))
                continue
            rows.append((k, class_name(parts[1]), canonical_split(parts[0])))
        elif len(parts) < 2:
            skipped.append((k, "image directly in the dataset root, not in a class folder"))
        else:
            rows.append((k, class_name(parts[0]), "train"))
    classes = sorted({c for _, c, _ in rows})
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    rows.sort(key=lambda r: order[r[2]])  # stable: class folders, then the walk order, within a split
    return ("split" if split_layout else "flat"), classes, rows


def discover_folder(url: str, *, locator: Callable) -> Dataset:
    """A folder layout (``<split>/<class>/…`` or ``<class>/…``) under an fsspec URL."""
    fs, path, objects = list_objects(url)
    skipped: list[tuple[str, str]] = []
    layout, classes, rows = layout_from_keys(list(objects), skipped)
    if not rows:
        raise FeatxError(f"no images found under {url}; expected <split>/<class>/image or <class>/image")
    index = {c: i for i, c in enumerate(classes)}
    root = url.rstrip("/")
    samples = [Sample(locator("obj", f"{root}/{k}", *stamp_of_info(objects[k])), k, index[c], sp)
               for k, c, sp in rows]
    for p, reason in skipped:
        log.warning("skipped %s/%s: %s", root, p, reason)
    return Dataset(root, classes, samples, layout, skipped)


def store_of(url: str) -> tuple[str, str]:
    """(scheme, bucket) of a URL: ``s3://b/k`` -> ("s3", "b"); a local ``file:///x`` has no bucket ("")."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc


def foreign_row(row_url: str, manifest_url: str, *, allow_other_buckets: bool = False) -> str | None:
    """Why a manifest row must not be read, or None: a row stays on the manifest's own store.

    Why: the manifest comes from whoever wrote the bucket.  A row ``file:///home/me/secret.jpg`` in
    ``s3://their-bucket/list.csv`` would make featx read a local file (and one in another bucket, objects
    the user's credentials reach but the manifest's owner should not choose).  So a row uses the
    manifest's scheme, never a chained URL (``a::b``), and stays in its bucket unless ``--allow-other-buckets``.
    """
    scheme, bucket = store_of(manifest_url)
    row_scheme, row_bucket = store_of(row_url)
    if "::" in row_url or row_scheme != scheme:
        return (f"names another kind of store ({row_scheme or 'no scheme'}://, the manifest is on {scheme}://); "
                "rows of a manifest are read from its own store only")
    if row_bucket != bucket and not allow_other_buckets:
        return (f"is in bucket {row_bucket!r}, not the manifest's {bucket!r}; pass --allow-other-buckets to read "
                "other buckets of the same store")
    return None


def discover_manifest(url: str, *, locator: Callable, allow_other_buckets: bool = False) -> Dataset:
    """A ``path,label[,split]`` CSV at a URL; relative paths are relative to its folder, absolute ones are URLs
    on the manifest's own store (:func:`foreign_row`)."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rt", encoding="utf-8-sig", newline="") as fh:
            rows = parse_manifest(fh, url)
    except FeatxError:
        raise
    except Exception as exc:  # noqa: BLE001 - back-end specific errors all refuse the same way
        raise refusal(url, exc) from None
    base = url.rsplit("/", 1)[0]
    listed: dict[str, dict] = {}
    try:
        listed = {f"{base}/{k}": v for k, v in list_objects(base)[2].items()}
    except FeatxError:
        pass
    skipped: list[tuple[str, str]] = []
    classes = sorted({lab for _, lab, _, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples, seen = [], set()
    for p, lab, sp, lineno in rows:
        full = p if is_url(p) else f"{base}/{p.lstrip('/')}"
        key = full[len(base) + 1:] if full.startswith(base + "/") else full
        foreign = foreign_row(full, url, allow_other_buckets=allow_other_buckets)
        info = None if foreign else listed.get(full) or _info(fs, full)
        if foreign:
            skipped.append((full, f"listed in {url} line {lineno} {foreign}"))
        elif info is None:
            skipped.append((full, f"listed in {url} line {lineno} but missing"))
        elif info.get("type", "file") != "file":  # a FIFO, socket or device (of a file:// store): never opened
            skipped.append((full, f"listed in {url} line {lineno}: not an image file: not a regular file"))
        elif key in seen:
            skipped.append((full, f"listed in {url} line {lineno} is a duplicate; only the first is used"))
        else:
            seen.add(key)
            samples.append(Sample(locator("obj", full, *stamp_of_info(info)), key, index[lab], sp))
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    if not samples:
        raise FeatxError(f"manifest {url} lists no existing objects; paths are relative to {base}")
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples.sort(key=lambda s: (order[s.split], s.label, s.key))
    return Dataset(base, classes, samples, "manifest", skipped)


def _info(fs, url: str) -> dict | None:
    try:
        return fs.info(filesystem(url)[1])
    except Exception:  # noqa: BLE001 - missing or unreadable: the row is skipped with the reason
        return None


def _pool(n: int) -> ThreadPoolExecutor:
    key = (os.getpid(), n)
    with _POOL_LOCK:
        if key not in _POOL:
            _POOL[key] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="featx-read")
        return _POOL[key]


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    return any(t in text for t in _TRANSIENT)


def failure_reason(exc: BaseException, tries: int) -> str:
    """A recorded failure; starts with "cannot read" so the next run tries the object again."""
    if isinstance(exc, FileNotFoundError):
        return "cannot read: object not found (404)"
    if isinstance(exc, PermissionError) or "accessdenied" in str(exc).lower().replace(" ", ""):
        return "cannot read: access denied (403)"
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"cannot read: {type(exc).__name__}: {first}" + (f" (after {tries} tries)" if tries > 1 else "")


def read_one(url: str, start: int | None = None, size: int | None = None) -> tuple[bytes | None, str]:
    """The bytes of an object (or ``size`` bytes from ``start``), retrying transient faults with backoff."""
    for attempt in range(TRIES):
        try:
            fs, path = filesystem(url)
            if _is_local(fs):  # a file:// URL: the device guard of local files (a FIFO never blocks a read)
                return _read_local(path, start, size), ""
            if start is None or not size or size < 0:
                return fs.cat_file(path), ""
            return fs.cat_file(path, start=start, end=start + size), ""
        except FeatxError as exc:
            return None, f"cannot read: {exc}"
        except guards.IrregularFileError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a fault on one object must never stop the run
            if not is_transient(exc) or attempt == TRIES - 1:
                return None, failure_reason(exc, attempt + 1)
            log.debug("retrying %s after %s", url, exc)
            time.sleep(BACKOFF_S * 2**attempt)
    return None, "cannot read: no attempt made"


def _is_local(fs) -> bool:
    proto = getattr(fs, "protocol", ())
    proto = proto if isinstance(proto, (tuple, list)) else (proto,)
    return "file" in proto or "local" in proto


def _read_local(path: str, start: int | None, size: int | None) -> bytes:
    """A local file's bytes (or ``size`` of them from ``start``), opened only if it is a regular file."""
    with guards.open_regular(path) as fh:
        if start is None or not size or size < 0:
            return fh.read()
        fh.seek(start)
        return fh.read(size)


def read_ranges(items: list[tuple[str, int, int]], *, concurrency: int) -> list[tuple[bytes | None, str]]:
    """(url, start, size) byte ranges, ``concurrency`` at a time."""
    if len(items) == 1 or concurrency == 1:
        return [read_one(u, a, n) for u, a, n in items]
    return list(_pool(concurrency).map(lambda it: read_one(*it), items))
