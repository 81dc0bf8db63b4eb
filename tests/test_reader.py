"""Opening a cache (cache/reader.py): damaged, truncated, older or foreign files are one-line errors naming
``--overwrite``, and ``--overwrite`` rebuilds the same cache."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache
from featx.cli import cli
from featx.runs.predict import predict

from conftest import TINY_CPU as TINY
from conftest import TINY_CPU_KW as TINY_KW
from conftest import RunsCode, assert_clean_error, assert_ok, assert_same_cache, no_leftovers, run_cli, small_dataset


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data, cache, pristine copy of the cache)."""
    data = small_dataset(tmp_path / "d", per_class=4, val=1)
    cache = tmp_path / "c.h5"
    featx.embed(data, cache=cache, **TINY_KW)
    pristine = tmp_path / "pristine.h5"
    shutil.copy(cache, pristine)
    return data, cache, pristine


def _garbage(cache: Path) -> None:
    cache.write_bytes(os.urandom(4096))


def _truncated(cache: Path) -> None:
    with open(cache, "r+b") as fh:
        fh.truncate(cache.stat().st_size // 2)


def _zeroed_tail(cache: Path) -> None:
    with open(cache, "r+b") as fh:
        fh.seek(cache.stat().st_size // 3)
        fh.write(b"\0" * (cache.stat().st_size // 3))


def _old_layout(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        f.attrs["featx_cache_layout"] = 0


def _not_featx(cache: Path) -> None:
    cache.unlink()
    with h5py.File(cache, "w") as f:
        f.create_dataset("x", data=np.arange(3))


@pytest.mark.parametrize(
    "damage",
    [_garbage, _truncated, _zeroed_tail, _old_layout, _not_featx],
    ids=["garbage", "truncated", "zeroed-middle", "older-layout", "other-hdf5"],
)
@pytest.mark.slow
def test_damaged_cache_is_detected_and_overwrite_rebuilds(built, damage) -> None:
    data, cache, pristine = built
    damage(cache)
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q")
    assert_clean_error(res, str(cache), "--overwrite")
    assert_clean_error(run_cli("info", cache), "--overwrite")
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite")
    assert_ok(res)
    assert_same_cache(cache, pristine)
    no_leftovers(cache)


def _drop_dataset(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        del f["paths"]


def _drop_failed_group(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        del f["failed"]


@pytest.mark.parametrize("damage", [_drop_dataset, _drop_failed_group], ids=["missing-paths", "missing-failed"])
@pytest.mark.slow
def test_partly_damaged_cache_is_detected(built, damage) -> None:
    data, cache, pristine = built
    damage(cache)
    assert_clean_error(run_cli("embed", data, "--cache", cache, *TINY, "-q"), "--overwrite")
    assert_clean_error(run_cli("info", cache), "--overwrite")
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite"))
    assert_same_cache(cache, pristine)


def test_cache_attributes_are_only_read_as_plain_values(trained, tmp_path):
    fc, res = trained
    marker = tmp_path / "pwned"
    path = tmp_path / fc.path.name
    shutil.copy(fc.path, path)
    code = f"__import__('os').system('touch {marker}')"
    with h5py.File(path, "a") as f:
        f.attrs["smuggled_pickle"] = np.void(pickle.dumps(RunsCode(marker)))
        f.attrs["smuggled_code"] = code
        f.attrs["smuggled_bytes"] = np.bytes_(pickle.dumps(RunsCode(marker)))
        f.attrs["created"] = code  # a field featx shows
    c = FeatureCache(path)
    assert c.meta["smuggled_code"] == code and c.meta["created"] == code
    assert isinstance(c.meta["smuggled_pickle"], bytes) and pickle.dumps(RunsCode(marker)) in c.meta["smuggled_pickle"]
    assert c.meta["smuggled_bytes"] == pickle.dumps(RunsCode(marker))
    for k, v in c.meta.items():
        assert isinstance(v, (str, bytes, int, float, bool, np.generic, np.ndarray)), (k, type(v))
    assert c.summary()["created"] == code
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert r.exit_code == 0, r.output
    out = predict(res["heads"]["knn"]["model_path"], [str(path)], out=tmp_path / "p.csv")
    assert out["n_images"] == len(fc)
    assert not marker.exists()


@pytest.mark.parametrize("attr,value", [("smuggled_array", np.arange(3)), ("split_names", "os.system('id')")])
def test_malformed_cache_attributes_are_a_featx_error(trained, tmp_path, attr, value):
    fc, _ = trained
    path = tmp_path / fc.path.name
    shutil.copy(fc.path, path)
    with h5py.File(path, "a") as f:
        f.attrs[attr] = value
    with pytest.raises(FeatxError, match="damaged"):
        FeatureCache(path)


def test_cache_module_never_decodes_code():
    import featx.cache.store as store

    for path in Path(store.__file__).parent.glob("*.py"):  # every module of the cache package
        src = path.read_text()
        for unsafe in ("pickle", "eval(", "exec(", "literal_eval", "marshal", "yaml.load", "joblib"):
            assert unsafe not in src, (path.name, unsafe)
