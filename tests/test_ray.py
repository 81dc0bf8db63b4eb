"""--executor ray: a Ray Data actor pool on a two-node local cluster gives the same cache
as a local run, also when an actor is killed mid-chunk; without Ray the error says how to install it.

One small cluster for the whole module (Ray start-up costs seconds): two nodes with one CPU and
100 MB of object store each, no dashboard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featx
from featx.base.errors import FeatxError

import conftest
from conftest import assert_same_cache

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'featx[ray]') is not installed")

TINY_KW = dict(conftest.TINY_KW, batch_size=2, device="cpu", chunk_size=4)
MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(5)
    for split, n in (("train", 7), ("val", 2)):
        for c in ("x", "y"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (22, 26, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    (root / "train" / "y" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine; the kill switch path is in the environment the raylets inherit."""
    from ray.cluster_utils import Cluster

    kill = tmp_path_factory.mktemp("raykill") / "armed"
    saved = {k: os.environ.get(k) for k in ("FEATX_TEST_RAY_KILL", "PYTHONPATH")}
    os.environ["FEATX_TEST_RAY_KILL"] = str(kill)
    # tests/faults first: its sitecustomize arms the kill switch in the workers (conftest.fault_env)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(conftest.FAULTS), str(REPO), saved["PYTHONPATH"]]))
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 * MB,
                                                          include_dashboard=False))
    c.add_node(num_cpus=1, object_store_memory=100 * MB)
    ray.init(address=c.address)
    c.wait_for_nodes()
    try:
        yield c, kill
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("raydata")
    root = make_data(base / "d")
    ref = base / "local.h5"
    featx.embed(root, cache=ref, **TINY_KW)
    return root, ref


@pytest.mark.slow
def test_two_node_cluster_gives_the_local_cache(cluster, data, tmp_path: Path) -> None:
    root, ref = data
    assert len(ray.nodes()) == 2
    fc = featx.embed(root, cache=tmp_path / "r.h5", executor="ray", num_actors=2, **TINY_KW)
    assert_same_cache(fc.path, ref)
    assert fc.stats.executor == "ray" and fc.stats.embedded == 18 and fc.stats.failed_new == 1
    assert not Path(str(fc.path) + ".parts").exists()
    # A rerun reuses everything without starting any Ray work.
    again = featx.embed(root, cache=tmp_path / "r.h5", executor="ray", **TINY_KW)
    assert again.stats.embedded == 0 and not again.stats.rebuilt


@pytest.mark.slow
def test_ray_embeds_views_and_augmented_training_views_like_a_local_run(cluster, data, tmp_path: Path) -> None:
    root, _ = data
    kw = dict(TINY_KW, views="final,stages,gem", tta="flip", train_views=2)
    local = featx.embed(root, cache=tmp_path / "l.h5", **kw)
    fc = featx.embed(root, cache=tmp_path / "v.h5", executor="ray", num_actors=2, **kw)
    assert fc.views == local.views and fc.train_views == 2
    for view in ("multi3+flip", "gem"):
        np.testing.assert_allclose(fc.features(view=view), local.features(view=view), atol=1e-5)
    (Xa, sa), (Xb, sb) = fc.augmented(view="multi3"), local.augmented(view="multi3")
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_allclose(Xa, Xb, atol=1e-5)  # seeded per image and view, wherever it runs


@pytest.mark.slow
def test_actor_killed_mid_chunk_is_retried_and_the_cache_is_identical(cluster, data, tmp_path: Path) -> None:
    _, kill = cluster
    root, ref = data
    kill.write_text("")  # the first actor to reach a commit SIGKILLs itself before committing
    fc = featx.embed(root, cache=tmp_path / "k.h5", executor="ray", num_actors=2, **TINY_KW)
    assert Path(str(kill) + ".fired").exists() and not kill.exists(), "an actor really was killed"
    assert_same_cache(fc.path, ref)
    assert fc.stats.embedded == 18 and fc.stats.failed_new == 1


@pytest.mark.slow
def test_ray_run_reuses_chunks_committed_by_a_shard(cluster, data, tmp_path: Path) -> None:
    """Chunks committed elsewhere (a --shard run, a stopped local run) are reused by a Ray run."""
    root, ref = data
    cache = tmp_path / "m.h5"
    featx.embed(root, cache=cache, shard="0/2", **TINY_KW)  # leaves half of the chunks in .parts
    fc = featx.embed(root, cache=cache, executor="ray", **TINY_KW)
    assert 0 < fc.stats.embedded < 18 and fc.stats.reused > 0
    assert_same_cache(cache, ref)


@pytest.mark.slow
def test_missing_ray_is_a_one_line_error(data, tmp_path: Path, monkeypatch) -> None:
    root, _ = data
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(FeatxError) as err:
        featx.embed(root, cache=tmp_path / "n.h5", executor="ray", **TINY_KW)
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'featx[ray]'" in msg and "--executor ray" in msg
    assert not list(tmp_path.iterdir()), "fails before anything is written"


def test_chunk_descriptors_keep_every_actor_busy() -> None:
    from featx.embedding.ray_executor import chunk_tasks, describe_chunks

    todo = list(range(960))
    assert [len(t) for t in chunk_tasks(todo, 1024, actors=1)] == [240] * 4
    assert [len(t) for t in chunk_tasks(todo, 100, actors=2)] == [100] * 9 + [60]
    assert sum(chunk_tasks(todo, 1024, actors=2), []) == todo and chunk_tasks([], 8) == []

    class S:
        def __init__(self, i):
            self.path, self.key = f"/d/caf\udce9{i}.jpg", f"caf\udce9{i}.jpg"  # a Latin-1 file name

    rows = describe_chunks([[S(0), S(1)], [S(2)]])
    assert [r["n"] for r in rows] == [2, 1] and all(r["task"].isascii() for r in rows)
