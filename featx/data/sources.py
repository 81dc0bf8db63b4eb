"""Where images live: local folders, fsspec URLs, WebDataset shards and Parquet tables, behind one interface.

Every input kind becomes the same :class:`~featx.data.folders.Dataset` of samples, so resume, incremental
runs, ``--shard`` and Ray work unchanged.  A sample's ``path`` is a *locator*: a local file path as
before, or ``fx:KIND:STAMP:SIZE:ARGS|URL`` for anything else, which says everything a process needs to
read the sample's bytes (a DataLoader worker, a Ray actor on another node) and its freshness stamp:

- ``fx:obj:…|s3://b/x.jpg``        a whole object (a file under an fsspec URL root or manifest);
- ``fx:rng:…:OFFSET|…/a-000.tar``  a byte range (an image member of a WebDataset shard);
- ``fx:pq:…:RG:ROW:COL|…/t.parquet`` a cell of a Parquet table (row ROW of row group RG, column COL).

``STAMP`` is an integer from the object's ETag (else its modification time) and ``SIZE`` its size, both
read at discovery: they take the place of a local file's mtime and size in the cache, so a changed object
(a new ETag) is embedded again and an unchanged one reused.  Credentials never enter a locator: storage
options are set per process (:func:`configure`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from ..base.errors import FeatxError
from . import guards, inputs, parquet, remote, webdataset
from .folders import Dataset, discover

log = logging.getLogger(__name__)

PREFIX = "fx:"
KINDS = ("obj", "rng", "pq")


@dataclass(frozen=True)
class SourceOptions:
    """How to read inputs that are not a local folder: the ``featx embed`` options of the same names
    (their defaults live in :class:`featx.config.settings.EmbedSettings`)."""

    image_column: str
    label_column: str
    read_concurrency: int  # concurrent reads per DataLoader worker
    storage_options: tuple[str, ...] = ()  # KEY=VALUE pairs passed to fsspec
    split_column: str | None = None
    split: str | None = None  # split of every WebDataset/Parquet sample (default: from names / "train")
    data_root: str | None = None  # folder that path-only image cells of a table are relative to
    class_names: str | None = None  # classes.txt / classes.json naming WebDataset cls numbers
    allow_other_buckets: bool = False  # rows of a manifest in a bucket may name other buckets of its store
    max_image_bytes: int = parquet.MAX_CELL_BYTES  # a larger tar member, object or table cell is failed, not read

    def fs_options(self) -> dict:
        return remote.parse_storage_options(self.storage_options)


@dataclass(frozen=True)
class Locator:
    kind: str
    url: str
    stamp: int
    size: int
    args: tuple[str, ...] = field(default=())


def make_locator(kind: str, url: str, stamp: int, size: int, *args) -> str:
    """The ``path`` of a sample that is not a local file (see the module docstring)."""
    tail = "".join(f":{quote(str(a), safe='')}" for a in args)
    return f"{PREFIX}{kind}:{int(stamp)}:{int(size)}{tail}|{url}"


def is_local(path: str) -> bool:
    """True for a plain local file path (read with the local loaders as before)."""
    return not path.startswith(PREFIX)


def parse_locator(path: str) -> Locator:
    head, url = path.split("|", 1)
    parts = head.split(":")
    return Locator(parts[1], url, int(parts[2]), int(parts[3]), tuple(unquote(a) for a in parts[4:]))


def stamp_of(path: str) -> tuple[int, int]:
    """(mtime-or-ETag stamp, size) of a sample: a local file's ``os.stat``, a locator's stored values.

    Raises OSError for a local file that is gone (as ``os.stat``).
    """
    if is_local(path):
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    loc = parse_locator(path)
    return loc.stamp, loc.size


_OPTIONS: SourceOptions | None = None  # None: not configured (reads one at a time, no storage options)


def configure(options: SourceOptions | None) -> None:
    """Set this process's storage options (the driver, then each Ray actor; DataLoader workers inherit them)."""
    global _OPTIONS
    _OPTIONS = options
    remote.set_storage_options(options.fs_options() if options else {})


def current_options() -> SourceOptions | None:
    return _OPTIONS


def kind_of(root, manifest) -> str:
    """"folder", "remote", "webdataset", "parquet" or "several" for the data argument(s) (and ``--manifest``)."""
    if manifest is not None:
        return "remote" if remote.is_url(str(manifest)) else "folder"
    if isinstance(root, (list, tuple)):
        if len(root) != 1:
            return "several"
        root = root[0]
    text = os.fspath(root)
    if inputs.table_kind(text) or inputs.has_pattern(text) or inputs.is_table_dir(text):
        return "several"  # expanded by featx.data.inputs: tables, shards, globs, brace patterns, table folders
    if remote.is_url(text):
        return "remote"
    return "folder"


def discover_any(root, *, manifest=None, options: SourceOptions | None = None) -> Dataset:
    """:func:`featx.data.discover` for every input kind; fails before any work on a bad URL or credentials.

    ``root`` is one data argument or several (tables or shards, expanded by :mod:`featx.data.inputs`)."""
    configure(options)
    opts = options
    kind = kind_of(root if root is not None else manifest, manifest)
    if kind == "several":
        args = [os.fspath(r) for r in (root if isinstance(root, (list, tuple)) else [root])]
        found = inputs.expand_inputs(args)
        kind = found.kind
    check_kind_options(kind, opts)
    if opts is None and kind == "parquet":
        raise FeatxError(f"{root}: a Parquet input needs its image and label columns (--image-column, --label-column)")
    if kind == "folder":
        if opts is not None and opts.split is not None:
            log.warning("--split applies to WebDataset shards and Parquet tables; ignored for the folder %s",
                        root if root is not None else manifest)
        return discover(root if root is not None else manifest, manifest=manifest)
    if kind == "parquet":
        return parquet.discover_tables(found.files, root=found.root, image_column=opts.image_column,
                                       label_column=opts.label_column, split_column=opts.split_column,
                                       split=opts.split, data_root=opts.data_root, locator=make_locator)
    if kind == "webdataset":
        return webdataset.discover_shards(found.files, split=opts.split if opts else None, locator=make_locator,
                                          root=found.root, class_names=opts.class_names if opts else None)
    if manifest is not None:
        return remote.discover_manifest(str(manifest), locator=make_locator,
                                        allow_other_buckets=bool(opts and opts.allow_other_buckets))
    return remote.discover_folder(str(root), locator=make_locator)


@dataclass
class Fetched:
    """The bytes of one sample, or why they could not be read (recorded as the sample's failure)."""

    data: bytes | None
    error: str = ""

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data or b"")


def fetch_many(paths: list[str]) -> list[Fetched | None]:
    """Read the samples of one batch together (concurrently for remote stores); None for local files,
    which the engines read themselves.  Never raises: a failure is a :class:`Fetched` with its reason."""
    out: list[Fetched | None] = [None] * len(paths)
    groups: dict[str, list[int]] = {}
    locs = {}
    for i, p in enumerate(paths):
        if not is_local(p):
            locs[i] = parse_locator(p)
            groups.setdefault(locs[i].kind, []).append(i)
    conc = max(1, _OPTIONS.read_concurrency) if _OPTIONS else 1
    cap = _OPTIONS.max_image_bytes if _OPTIONS else parquet.MAX_CELL_BYTES
    for kind in ("obj", "rng"):  # the size listed at discovery (a tar header, a listing) is checked before any read
        for i in [i for i in groups.get(kind, []) if locs[i].size > cap]:
            groups[kind].remove(i)
            out[i] = Fetched(None, f"image of {locs[i].size} bytes is larger than --max-image-bytes {cap}; not read "
                                   "(raise --max-image-bytes if it is a real image)")
    # A whole object is read as the range of the size listed at discovery: one GET, no HEAD first.
    idx = groups.get("obj", []) + groups.get("rng", [])
    if idx:
        res = remote.read_ranges([(locs[i].url, int(locs[i].args[0]) if locs[i].args else 0, locs[i].size)
                                  for i in idx], concurrency=conc)
        for i, r in zip(idx, res):
            out[i] = Fetched(*r)
    for i in groups.get("pq", []):
        loc = locs[i]
        out[i] = Fetched(*parquet.read_cell(loc.url, int(loc.args[0]), int(loc.args[1]), loc.args[2], cap))
    for f in out:
        if f is not None and f.data is not None and not f.data and not f.error:
            f.data, f.error = None, "empty file (0 bytes)"
    return out


def read_bytes(path: str) -> Fetched:
    """One sample's bytes (a local file, or any locator)."""
    if is_local(path):
        try:
            with guards.open_regular(path) as fh:  # a FIFO swapped in after discovery never blocks
                return Fetched(fh.read())
        except OSError as exc:
            return Fetched(None, f"cannot read: {exc.strerror or exc}")
    res = fetch_many([path])[0]
    assert res is not None
    return res


def check_kind_options(kind: str, options: SourceOptions | None) -> None:
    """Refuse options that the input kind cannot use."""
    if options is None:
        return
    if kind != "parquet" and options.split_column is not None:
        raise FeatxError("--split-column names a column of a Parquet table; drop it for this input")
    if kind != "parquet" and options.data_root is not None:
        raise FeatxError("--data-root is the folder of the image paths in a Parquet or Arrow table; drop it for "
                         "this input")
    if kind != "webdataset" and options.class_names is not None:
        raise FeatxError("--class-names names the class numbers of WebDataset shards; drop it for this input "
                         "(a table's names come from its ClassLabel feature)")
    if options.max_image_bytes < 1:
        raise FeatxError(f"--max-image-bytes must be a positive number of bytes, got {options.max_image_bytes}")
    if options.read_concurrency < 1:
        raise FeatxError(f"--read-concurrency must be a positive integer, got {options.read_concurrency}")


def blank(crop: int):
    """The zero image that stands in for a sample that could not be read (as ``load_or_blank`` gives)."""
    import torch  # heavy: only the engines call this, and they have loaded torch already

    return torch.zeros(3, crop, crop)


def _reason_kind(reason: str) -> str:
    """A failure reason without the parts that name one file (quoted paths, parentheses, numbers)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\S*/\S*|\d+", "", reason)
    return re.sub(r"\s+", " ", text).strip(" :;,.") or reason


def dominant_failure(failed: list[tuple[str, str]], rows: int) -> str | None:
    """One line naming why a run must not pass as done: no row embedded, or more than half of the images
    failed for the same reason; else None.  ``failed``: (key, reason); ``rows``: the rows embedded."""
    if not failed:
        return None
    total = rows + len(failed)
    kind, n = Counter(_reason_kind(r) for _, r in failed).most_common(1)[0]
    key, reason = next((k, r) for k, r in failed if _reason_kind(r) == kind)
    if rows == 0:
        head = f"none of the {total} images could be embedded"
    elif 2 * n > total:
        head = f"{n} of the {total} images could not be embedded"
    else:
        return None
    return f"{head}: {n} failed with \"{kind}\" (e.g. {key}: {reason})"
