"""Files that are complete or absent (base/io.py): atomic writes, strict JSON, file hashes, CSV round trips."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import featx.base.io as fio
from featx.base.errors import FileWriteError


def test_atomic_write_bytes_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    assert fio.atomic_write_bytes(p, b"new contents") == p
    assert p.read_bytes() == b"new contents"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.bin"]


def test_a_failed_commit_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "out.json"
    p.write_text("previous")

    def full_disk(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fio, "atomic_commit", full_disk)
    with pytest.raises(FileWriteError) as err:
        fio.write_json(p, {"a": 1})
    msg = str(err.value)
    assert str(p) in msg and "No space left on device" in msg and "\n" not in msg
    assert p.read_text() == "previous"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]  # no .out.json.*.tmp left


def test_an_interrupt_during_the_write_removes_the_temporary(tmp_path: Path, monkeypatch) -> None:
    def interrupted(tmp, final):
        raise KeyboardInterrupt

    monkeypatch.setattr(fio, "atomic_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fio.atomic_write_bytes(tmp_path / "x", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_a_file_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(FileWriteError, match="cannot write"):
        fio.atomic_write_bytes(blocker / "inside.bin", b"data")  # its "folder" is a file


def test_write_json_is_strict_json_with_nan_and_inf_as_null(tmp_path: Path) -> None:
    obj = {"nan": float("nan"), "inf": math.inf, "neg": -math.inf, "np": np.float32(0.5), "i": np.int64(3),
           "arr": np.arange(3), "path": Path("/a/b"), "nested": [{"x": np.float64("nan")}], 7: "int key"}
    p = fio.write_json(tmp_path / "sub" / "r.json", obj)  # the parent folder is created
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    back = json.loads(text)
    assert back == {"nan": None, "inf": None, "neg": None, "np": 0.5, "i": 3, "arr": [0, 1, 2], "path": "/a/b",
                    "nested": [{"x": None}], "7": "int key"}


def test_sha256_file_matches_hashlib_across_blocks(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 123)  # more than one 1 MB block
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    assert fio.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_csv_round_trip_keeps_formula_like_cells_as_text_and_names_byte_for_byte(tmp_path: Path) -> None:
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a file name that is not UTF-8 (surrogateescape)
    rows = [["=HYPERLINK(\"x\")", -0.25, latin1], ["'quoted", "+1", "@sum"]]
    p = fio.write_csv(tmp_path / "p.csv", ["path", "score", "name"], rows)
    raw = p.read_bytes()
    assert b"'=HYPERLINK" in raw and b"caf\xe9.jpg" in raw and b",-0.25," in raw
    back = fio.read_csv(p)
    assert back == [{"path": '=HYPERLINK("x")', "score": "-0.25", "name": latin1},
                    {"path": "'quoted", "score": "+1", "name": "@sum"}]
