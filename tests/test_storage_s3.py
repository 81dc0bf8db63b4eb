"""Embedding from object storage (issue 21), against a real S3-protocol server on 127.0.0.1: moto's server (as
s3fs's own tests use), wrapped in a small WSGI layer that injects faults (404s, slow and throttled responses).

A bucket embeds to the same cache as the same files on disk; a SIGKILL mid-run resumes to the identical
cache; a changed object is the only one embedded again; WebDataset shards and a Parquet table in the bucket
equal the folder; faults are recorded, never fatal; a missing bucket or missing credentials are refused
before any work; Ray actors read the objects themselves.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_sources import assert_same_rows, write_parquet, write_shards

import featx
from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache

from conftest import TINY_CLI, TINY_KW, fault_env, kill_mid_run, write_image_folder

s3fs = pytest.importorskip("s3fs", reason="the storage extra (pip install 'featx[storage]') is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (featx[storage-test]) is not installed")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(TINY_KW, batch_size=4, device="cpu", chunk_size=4)
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


class Faults:
    """WSGI middleware: GETs whose path contains a rule's text get a 404, a delay, or N throttled replies."""

    def __init__(self, app) -> None:
        self.app = app
        self.rules: dict[str, list] = {}
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        rule = None
        if environ.get("REQUEST_METHOD") == "GET":
            with self.lock:
                rule = next((r for k, r in self.rules.items() if k in path), None)
                if rule and rule[0] == "throttle":
                    rule[1] -= 1
                    if rule[1] < 0:
                        rule = None
        if rule and rule[0] == "404":
            start_response("404 Not Found", [("Content-Type", "application/xml")])
            return [b"<Error><Code>NoSuchKey</Code><Message>injected</Message></Error>"]
        if rule and rule[0] == "403":
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>injected</Message></Error>"]
        if rule and rule[0] == "throttle":
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [b"<Error><Code>SlowDown</Code><Message>injected throttle</Message></Error>"]
        if rule and rule[0] == "slow":
            time.sleep(rule[1])
        if rule and rule[0] == "stall":  # longer than the client's read timeout, the first N times
            with self.lock:
                rule[2] -= 1
            if rule[2] >= 0:
                time.sleep(rule[1])
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3():
    """(file system, faults, endpoint) of a moto S3 server on 127.0.0.1, with AWS_ENDPOINT_URL pointing at it."""
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    app = Faults(moto_server.DomainDispatcherApplication(moto_server.create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3fs.S3FileSystem(), app, endpoint
    finally:
        server.shutdown()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(fs, folder: Path, bucket: str, prefix: str = "data") -> str:
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.pipe({f"{bucket}/{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file()})
    return f"s3://{bucket}/{prefix}"


@pytest.mark.slow
def test_bucket_equals_disk_and_a_changed_object_is_the_only_one_embedded_again(s3, tmp_path):
    fs, _, _ = s3
    folder = write_image_folder(tmp_path / "data", per_class=5)
    url = upload(fs, folder, "equal")
    disk = featx.embed(folder, cache=tmp_path / "disk.h5", **TINY)
    fc = featx.embed(url, cache=tmp_path / "s3.h5", **TINY)
    assert fc.keys() == disk.keys() and fc.classes == disk.classes and fc.meta["root"] == url
    assert (fc.labels() == disk.labels()).all() and (fc.split_array() == disk.split_array()).all()
    np.testing.assert_allclose(fc.features(), disk.features(), atol=1e-5)
    assert featx.embed(url, cache=tmp_path / "s3.h5", **TINY).stats.embedded == 0
    changed = "train/dogs/img_002.png"
    fs.pipe(f"equal/data/{changed}", (folder / "train/cats/img_000.png").read_bytes())  # new bytes, new ETag
    again = featx.embed(url, cache=tmp_path / "s3.h5", **TINY)
    assert again.stats.embedded == 1 and again.stats.reused == len(disk) - 1
    row, src = again.keys().index(changed), again.keys().index("train/cats/img_000.png")
    np.testing.assert_allclose(again.features()[row], again.features()[src], atol=1e-6)


@pytest.mark.slow
def test_manifest_in_the_bucket_equals_the_local_manifest(s3, tmp_path):
    fs, _, _ = s3
    folder = write_image_folder(tmp_path / "data", splits=(), per_class=3)
    rows = ["path,label,split"] + [f"{c}/img_{i:03d}.png,{c},{'train' if i else 'test'}"
                                   for c in ("cats", "dogs") for i in range(3)] + ["cats/missing.png,cats,train"]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    url = upload(fs, folder, "manifests")
    local = featx.embed(manifest=folder / "list.csv", cache=tmp_path / "local.h5", **TINY)
    fc = featx.embed(manifest=f"{url}/list.csv", cache=tmp_path / "s3.h5", **TINY)
    assert fc.keys() == local.keys() and fc.classes == local.classes and fc.splits == ["train", "test"]
    np.testing.assert_allclose(fc.features(), local.features(), atol=1e-5)


@pytest.mark.slow
def test_shards_of_a_bucket_assemble_to_the_one_process_cache(s3, tmp_path):
    fs, _, _ = s3
    folder = write_image_folder(tmp_path / "data", per_class=4)
    url = upload(fs, folder, "sharded")
    whole = featx.embed(url, cache=tmp_path / "whole.h5", **TINY)
    for i in range(2):
        res = featx.embed(url, cache=tmp_path / "sharded.h5", shard=f"{i}/2", **TINY)
        assert 0 < res.assigned < len(whole)
    fc = featx.embed(url, cache=tmp_path / "sharded.h5", **TINY)
    assert fc.stats.embedded == 0 and fc.keys() == whole.keys()
    np.testing.assert_allclose(fc.features(), whole.features(), atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_identical_cache(s3, tmp_path):
    fs, _, endpoint = s3
    folder = write_image_folder(tmp_path / "data", per_class=8)
    url = upload(fs, folder, "killed")
    clean = featx.embed(url, cache=tmp_path / "clean.h5", **TINY)
    cache = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "featx.cli", "embed", url, "--cache", str(cache), *TINY_CLI,
           "--device", "cpu", "--batch-size", "4", "--chunk-size", "4", "-q"]
    env = fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(REPO)])
    parts = kill_mid_run(cmd, env, cache)
    assert len(list(parts.glob("chunk-*.h5"))) >= 2 and not cache.exists(), "the kill must land mid-run"
    done = subprocess.run(cmd, env={**env, "FEATX_TEST_CHUNK_DELAY": "0"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = FeatureCache(cache)
    assert resumed.keys() == clean.keys() and not parts.exists()
    np.testing.assert_allclose(resumed.features(), clean.features(), atol=1e-5)


@pytest.mark.slow
def test_webdataset_shards_and_parquet_in_the_bucket_equal_the_folder(s3, tmp_path):
    fs, _, _ = s3
    folder = write_image_folder(tmp_path / "data", per_class=5)
    ref = featx.embed(folder, cache=tmp_path / "folder.h5", **TINY)
    pattern = write_shards(folder, tmp_path / "up" / "shards", shards=3)
    write_parquet(folder, tmp_path / "up" / "table.parquet", row_group_size=4)
    url = upload(fs, tmp_path / "up", "formats", "sets")
    wds = featx.embed(f"{url}/shards/{Path(pattern).name}", cache=tmp_path / "wds.h5", **TINY)
    assert_same_rows(wds, ref)
    table = featx.embed(f"{url}/table.parquet", cache=tmp_path / "pq.h5", split_column="split", **TINY)
    assert_same_rows(table, ref)


@pytest.mark.slow
def test_faults_are_recorded_retried_and_never_fatal(s3, tmp_path):
    fs, faults, _ = s3
    folder = write_image_folder(tmp_path / "data", per_class=4)
    url = upload(fs, folder, "faults")
    ref = featx.embed(folder, cache=tmp_path / "disk.h5", **TINY)
    faults.rules.update({"faults/data/train/cats/img_001": ["404"], "faults/data/val/cats/img_003": ["403"], "faults/data/val/dogs/img_002": ["slow", 0.2],
                         "faults/data/train/dogs/img_003": ["throttle", 2], "faults/data/val/cats/img_000": ["stall", 1.5, 2]})
    timeout = 'config_kwargs={"read_timeout": 0.5, "retries": {"max_attempts": 1}}'
    try:
        fc = featx.embed(url, cache=tmp_path / "s3.h5", storage_options=[timeout], **TINY)
    finally:
        faults.rules.clear()
    assert fc.failed == [("train/cats/img_001.png", "cannot read: object not found (404)"),
                         ("val/cats/img_003.png", "cannot read: access denied (403)")]
    assert len(fc) == len(ref) - 2  # the slow, the throttled and the timed-out objects were read on a retry
    again = featx.embed(url, cache=tmp_path / "s3.h5", **TINY)  # a failed read is tried again on the next run
    assert again.failed == [] and again.stats.embedded == 2 and again.keys() == ref.keys()
    np.testing.assert_allclose(again.features(), ref.features(), atol=1e-5)


def test_missing_bucket_and_missing_credentials_are_refused_before_any_work(s3, tmp_path, monkeypatch):
    with pytest.raises(FeatxError, match=r"^s3://no-such-bucket/data does not exist; check the bucket") as e:
        featx.embed("s3://no-such-bucket/data", cache=tmp_path / "x.h5", **TINY)
    assert "\n" not in str(e.value) and not (tmp_path / "x.h5.parts").exists()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(FeatxError, match=r"^s3://equal/data: no credentials found; .*anon=true"):
            featx.embed("s3://equal/data", cache=tmp_path / "y.h5", **TINY)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(FeatxError, match="--storage-option 'anon': expected KEY=VALUE"):
        featx.embed("s3://equal/data", cache=tmp_path / "z.h5", storage_options=["anon"], **TINY)


@pytest.mark.slow
def test_ray_actors_read_from_the_bucket(s3, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra (pip install 'featx[ray]') is not installed")
    fs, _, _ = s3
    folder = write_image_folder(tmp_path / "data", per_class=4)
    url = upload(fs, folder, "rayread")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    local = featx.embed(url, cache=tmp_path / "local.h5", **TINY)
    fc = featx.embed(url, cache=tmp_path / "ray.h5", executor="ray", num_actors=1, **TINY)
    assert fc.keys() == local.keys()
    np.testing.assert_allclose(fc.features(), local.features(), atol=1e-5)


def test_a_fault_that_persists_is_recorded_after_the_retries(monkeypatch):
    from featx.data import remote

    calls = []

    class Stalling:
        def cat_file(self, path, start=None, end=None):
            calls.append(path)
            raise TimeoutError("read timed out")

    monkeypatch.setattr(remote, "filesystem", lambda url: (Stalling(), url))
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    data, reason = remote.read_one("s3://b/x.jpg")
    assert data is None and reason == f"cannot read: TimeoutError: read timed out (after {remote.TRIES} tries)"
    assert len(calls) == remote.TRIES


@pytest.mark.slow
def test_cli_passes_repeated_storage_options_and_refuses_in_one_line(s3, tmp_path):
    from click.testing import CliRunner

    from featx.cli import cli

    fs, _, endpoint = s3
    folder = write_image_folder(tmp_path / "data", splits=(), per_class=2)
    url = upload(fs, folder, "clibucket")
    args = ["--cache-dir", str(tmp_path / "c"), *TINY_CLI, "--device", "cpu", "-q"]
    r = CliRunner().invoke(cli, ["embed", url, "--storage-option", f"endpoint_url={endpoint}",
                                 "--storage-option", 'config_kwargs={"read_timeout": 30}', *args])
    assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(cli, ["embed", "s3://no-such-bucket/x", *args])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert lines == ["error: s3://no-such-bucket/x does not exist; check the bucket and path (and AWS_ENDPOINT_URL "
                     "for an S3-compatible server)"]
    cfg = tmp_path / "my.yaml"
    cfg.write_text("embed:\n  storage_option: [anon=false]\n  read_concurrency: 4\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "config", "embed"])
    assert r.exit_code == 0 and "read_concurrency" in r.output
