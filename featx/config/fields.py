"""The building blocks of the settings: a field that is also an option, and the options several commands share.

Why apart from :mod:`featx.config.settings`: one definition per shared option (its default and help), so
the commands that take it (``probe`` and the probe inside ``compare``, every ``--cache-dir``) cannot drift.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

# Keyword the library call receives for each field, when it differs (see ``lib=``).
SAME = object()

def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), path: str | None = None,
           required: bool = False, lib: Any = SAME, file: bool = True, factory: Any = None) -> Any:
    """A dataclass field that is also a command-line option and a config-file key."""
    meta = {"help": help, "flags": tuple(flags), "path": path, "required": required, "lib": lib, "file": file}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(help: str = "", *, flags: tuple[str, ...] = (), lib: Any = SAME, file: bool = False) -> Any:
    """A boolean switch, off by default (``--overwrite``); ``flags=("--a/--no-a",)`` for a pair."""
    return option(False, help, flags=flags, lib=lib, file=file)


# Options shared by several commands: one definition each, so their defaults cannot drift.
def shared_cache_dir(help: str = "") -> Any:
    return option("cache", help, path="dir")


def shared_device(help: str = "auto, cpu, cuda or cuda:N.") -> Any:
    return option("auto", help)


def shared_workers(help: str = "DataLoader workers (default: one per core, at most 16).") -> Any:
    return option(None, help, lib="num_workers")


def shared_weights() -> Any:
    return option(None, "Local state-dict file, or 'random'. Default: pretrained weights.")


def shared_quiet(help: str) -> Any:
    return flag(help, flags=("--quiet", "-q"), lib=None)


def shared_json(help: str = "") -> Any:
    return flag(help, flags=("--json",), lib=None)


# The probe's choices, shared by `featx probe` and the probe inside `featx compare` (one default each).
def probe_view() -> Any:
    return option("auto", "Feature view: auto (choose per head by CV among the cache's views), a name "
                       "(final, multi2, multi3, gem, <view>+flip; on a cache set of several backbones VIEW@BACKBONE "
                       "or VIEW@A+B, the concatenation) or a comma list to choose among.")


def probe_norm() -> Any:
    return option("auto", "Feature normalisation before the head: none, l2, power, or a comma list to choose "
                       "among by CV; auto = none (the head's own scaling; power measured no gain, ACCURACY.md).")


def probe_train_views() -> Any:
    return option(
        "auto", "Train on the cache's augmented views of the training images (featx embed --train-views K; CV "
                "grouped by image): auto = with and without, chosen by CV; on; off.")


def probe_cv_repeats() -> Any:
    return option(3, "Repeats of the stratified CV that chooses among several views/backbones (paired "
                                "folds, successive halving); 1 = one full search per candidate as before.")


def probe_max_train_rows() -> Any:
    return option(
        None, "Train on at most N training rows: a stratified, seeded subset (for caches bigger than memory; "
              "the probe names a value that fits).")


def probe_solver() -> Any:
    return option(
        "auto", "How logreg / the linear SVM / knn train: memory (the training rows in memory, CV search), stream "
                "(rows read block by block: mini-batch optimisation with every C in one pass, kNN by exact blocked "
                "search; chosen on held-out rows), auto (stream when the training rows do not fit in memory).")


def probe_stream_epochs() -> Any:
    return option(4, "Passes over the training rows when streaming (--solver stream).")


LIMIT_HELP = "At most this many images per split (quick runs)."
MANIFEST_HELP = "CSV with columns path,label[,split] instead of a folder."
CACHE_DIR_HELP = "Folder that holds the caches."
NEWEST_HELP = "Where to look for the newest cache when CACHE is not given."
