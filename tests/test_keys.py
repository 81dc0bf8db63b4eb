"""Row keys and cache names (cache/keys.py): keys stored byte for byte, cache file names unique per settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featx.cache.keys import (
    AUG_SEP,
    decode_key,
    default_cache_path,
    encode_key,
    fingerprint_digest,
    image_key,
    key_array,
    part_path,
)


def test_keys_round_trip_byte_for_byte_including_non_utf8_names() -> None:
    keys = ["train/cats/a.png", "train/na\u00efve/x.png", os.fsdecode(b"train/good/caf\xe9.jpg"), "with space.jpg"]
    arr = key_array(keys)
    assert arr.dtype == object and len(arr) == 4
    assert [decode_key(a) for a in arr] == keys
    assert bytes(encode_key(keys[2])) == b"train/good/caf\xe9.jpg"
    assert encode_key("a").dtype == np.uint8


def test_image_key_strips_the_augmented_view_suffix() -> None:
    assert image_key("train/a/x.png") == "train/a/x.png"
    assert image_key("train/a/x.png" + AUG_SEP + "3") == "train/a/x.png"


def test_fingerprint_digest_ignores_key_order_and_sees_values() -> None:
    a = fingerprint_digest({"backbone": "tiny_cnn", "size": 32})
    assert a == fingerprint_digest({"size": 32, "backbone": "tiny_cnn"})
    assert a != fingerprint_digest({"backbone": "tiny_cnn", "size": 33})
    assert len(a) == 64


def test_default_cache_path_names_data_backbone_and_settings(tmp_path: Path) -> None:
    fp = {"size": 32}
    p = default_cache_path(tmp_path, str(tmp_path / "my data!"), "timm:vit/b", fp)
    assert p.parent == tmp_path and p.suffix == ".h5"
    stem, backbone, digest = p.stem.split("__")
    assert stem.startswith("my-data-") and backbone == "timm-vit-b" and digest == fingerprint_digest(fp)[:10]
    assert default_cache_path(tmp_path, str(tmp_path / "my data!"), "timm:vit/b", fp) == p  # stable
    assert default_cache_path(tmp_path, str(tmp_path / "other" / "my data!"), "timm:vit/b", fp) != p  # another root
    assert default_cache_path(tmp_path, str(tmp_path / "my data!"), "timm:vit/b", {"size": 64}) != p
    url = default_cache_path(tmp_path, "s3://bucket/set", "tiny_cnn", fp)
    assert url.name.startswith("set-") and "tiny_cnn" in url.name


def test_part_path() -> None:
    assert part_path("features") == "features"
    assert part_path("stage2") == "parts/stage2"
