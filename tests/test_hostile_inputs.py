"""Hostile and damaged inputs III (issue 31, items 4, 5, 6 and their tracebacks): a shared-heap bomb in a
dataset, FIFOs wherever featx opens a file, tar and Parquet sizes, unlabelled and odd labels, random HDF5
metadata corruption, SIGTERM during embed, huge brace patterns.  Every crafted file is built here, small
(sparse files and header tricks), and anything that could hang or grow runs in a subprocess with a timeout
and a memory limit."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError

from conftest import TINY_KW, make_tiny_cache, write_image_folder

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 1 << 30  # 1 GiB of address space beyond what the interpreter starts with is plenty for every case


def run_isolated(code: str, *, timeout: float = 90, memory: int | None = None, cwd: Path | None = None):
    """Run ``code`` in a fresh interpreter (a hang is a timeout, a bomb a MemoryError under ``memory`` bytes of
    address space); returns the CompletedProcess."""
    pre = None
    if memory is not None:
        def pre():
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=pre, env=env, cwd=cwd)


# --------------------------------------------------------------------------- 5. FIFOs outside data folders


@pytest.mark.slow
def test_fifos_wherever_featx_opens_a_file_are_refused_never_opened(tmp_path):
    """A FIFO as a cache, a cache set, a config, the newest *.h5 of a cache folder, a streamed kNN head's cache,
    a saved head, a WebDataset shard, a Parquet table, a manifest: each is one line naming it, none blocks."""
    for name in ("p.h5", "p.multi.json", "p.yaml", "cache/newest.h5", "head.skops", "head.json", "s-000.tar",
                 "t.parquet", "list.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        os.mkfifo(tmp_path / name)
    proc = run_isolated("""
        import numpy as np
        from click.testing import CliRunner
        from featx.base.errors import FeatxError
        from featx.cli import cli

        def case(name, call):
            try:
                call()
                print(name, "| no error")
            except FeatxError as exc:
                print(name, "|", str(exc).splitlines()[0])

        def info(*args):
            r = CliRunner().invoke(cli, ["info", *args])
            raise FeatxError(" ".join(r.output.split()) + f" (exit {r.exit_code})")

        from featx.cache.multi import open_cache
        from featx.config.loader import read_yaml
        from featx.heads.saved.persist import load_head
        from featx.heads.stream.knn import StreamingKNN
        import featx.data.sources as sources

        def knn():
            est = StreamingKNN()
            est.reference_ = {"cache": "p.h5", "fingerprint": "x", "identity": "x", "view": "final", "norm": "l2"}
            est.fit_y_ = np.zeros(3, np.int64)
            est.reference_source()

        opts = sources.SourceOptions(image_column="image", label_column="label", read_concurrency=1)
        case("info", lambda: info("p.h5"))
        case("set", lambda: open_cache("p.multi.json"))
        case("config", lambda: read_yaml("p.yaml"))
        case("newest", lambda: info("--cache-dir", "cache"))
        case("knn", knn)
        case("head", lambda: load_head("head.skops"))
        case("shard", lambda: sources.discover_any(["s-000.tar"], options=opts))
        case("table", lambda: sources.discover_any(["t.parquet"], options=opts))
        case("manifest", lambda: sources.discover_any(None, manifest="list.csv"))
    """, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    assert set(lines) == {"info", "set", "config", "newest", "knn", "head", "shard", "table", "manifest"}, proc.stdout
    for name, text in lines.items():
        if name == "newest":  # the FIFO is left out of the choice: the folder holds no cache
            assert "no cache in" in text, text
            continue
        assert "FIFO" in text and "regular file" in text, (name, text)
    assert "Traceback" not in lines["info"] and "exit 0" not in lines["info"]


# --------------------------------------------------------------------------- SIGTERM to the process group


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_embed_is_one_line_and_resumes(tmp_path):
    """What SLURM and `timeout` send: SIGTERM to featx and its DataLoader workers at once, at several moments;
    each stop is the one line saying how to resume, and the rerun finishes the cache."""
    from conftest import TINY_CLI, fault_env

    data = write_image_folder(tmp_path / "data", per_class=8)
    cache = tmp_path / "c.h5"
    parts = Path(str(cache) + ".parts")
    cmd = [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), *TINY_CLI[:4],
           "--workers", "2", "--batch-size", "2", "--chunk-size", "4", "--quiet"]
    env = fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    for delay in (0.0, 0.2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        n0, t0 = len(list(parts.glob("chunk-*.h5"))), time.time()
        while len(list(parts.glob("chunk-*.h5"))) <= n0 and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143 and err.strip().splitlines() == [
            "terminated (SIGTERM): finished work is saved; rerun the same command to resume where it stopped."], err
    done = subprocess.run(cmd[:-1] + ["--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    assert run["reused"] >= 2 * 2 and run["embedded"] + run["reused"] == run["total"] == 2 * 2 * 8


# --------------------------------------------------------------------------- 4. a shared-heap bomb in a dataset


def _shared_heap_bomb(src: Path, dst: Path, *, n: int, big: int) -> Path:
    """A copy of cache ``src`` whose ``failed/`` datasets hold ``n`` rows, every ``failed/reasons`` element pointing
    at one heap object of ``big`` bytes (its heap IDs rewritten in place): n * big bytes to read, a small file."""
    import shutil
    import struct

    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        del f["failed"]
        g = f.create_group("failed")
        g.create_dataset("paths", data=[np.frombuffer(f"x{i}".encode(), np.uint8) for i in range(n)],
                         dtype=h5py.vlen_dtype(np.uint8))
        g.create_dataset("reasons", data=["r" * big] + ["r"] * (n - 1), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("mtime_ns", data=np.zeros(n, np.int64))
        g.create_dataset("size", data=np.zeros(n, np.int64))
        offset, size = g["reasons"].id.get_offset(), g["reasons"].id.get_storage_size()
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        raw = fh.read(size)
        assert struct.unpack("<I", raw[:4])[0] == big
        fh.seek(offset)
        fh.write(raw[:16] * n)  # every element: (length big, the first element's heap object)
    return dst


@pytest.mark.slow
def test_a_shared_heap_bomb_in_a_dataset_is_refused_before_it_is_read(tmp_path):
    made = make_tiny_cache(tmp_path / "m", per_class=3)
    bomb = _shared_heap_bomb(made.path, tmp_path / "bomb.h5", n=3000, big=1 << 20)  # 3 GB to read, a 1 MB file
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(FeatxError, match=r"'failed/reasons' holds 3145728000 bytes of variable-length values.*share "
                                         r"heap objects"):
        featx.FeatureCache(bomb)
    # info, verify and probe: one line each, in bounded memory
    proc = run_isolated(f"""
        from click.testing import CliRunner
        from featx.cli import cli
        for args in (["info"], ["verify"], ["probe", "--head", "logreg", "--out-dir", "run"]):
            r = CliRunner().invoke(cli, [*args, {str(bomb)!r}])
            print(args[0], r.exit_code, " ".join(r.output.split())[:300], type(r.exception).__name__)
    """, memory=3 << 30, cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr[-2000:]
    for line in lines:
        assert " 2 error: cache" in line and "share heap objects" in line and "SystemExit" in line, line
    # featx's own caches pass: their elements are stored once each
    featx.FeatureCache(made.path)


# --------------------------------------------------------------------------- 6. tar and Parquet sizes


def _png(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "PNG")
    return buf.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shard_with_huge_header(path: Path, kind: bytes, size: int) -> Path:
    """Two good samples, then a PAX header (``x``) or GNU long name (``L``) that says it is ``size`` bytes long; the
    file is extended sparsely to hold it, so a reader that trusts the size reads ``size`` bytes of zeros."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(2):
            _member(tf, f"s{i}.png", _png())
            _member(tf, f"s{i}.cls", b"1")
    with tarfile.open(path) as tf:  # the crafted header goes where the end-of-archive blocks were
        last = tf.getmembers()[-1]
        end = last.offset_data + 512
    info = tarfile.TarInfo("././@LongLink" if kind == b"L" else "pax")
    info.type, info.size = kind, size
    with open(path, "r+b") as fh:
        fh.seek(end)
        fh.write(info.tobuf(format=tarfile.USTAR_FORMAT) if kind == b"x" else info.tobuf(format=tarfile.GNU_FORMAT))
        fh.truncate(end + 512 + size + 1024)  # sparse: nothing of it is written
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind,size", [(b"x", 3 << 30), (b"L", 2 << 30)], ids=["pax-3GB", "gnu-long-name-2GB"])
def test_a_huge_tar_extended_header_is_refused_unread_and_the_samples_before_it_kept(tmp_path, kind, size):
    shard = _shard_with_huge_header(tmp_path / "train-000.tar", kind, size)
    proc = run_isolated(f"""
        from featx.data.sources import SourceOptions, discover_any, make_locator
        ds = discover_any([{str(shard)!r}], options=SourceOptions("image", "label", 1))
        print(len(ds.samples), "|", ds.skipped)
    """, memory=1 << 30)
    assert proc.returncode == 0, proc.stderr[-1500:]
    n, skipped = proc.stdout.strip().split(" | ", 1)
    assert n == "2" and "extended header" in skipped and str(size) in skipped, proc.stdout


@pytest.mark.slow
def test_tar_members_and_objects_above_the_image_bound_are_failed_never_read(tmp_path, monkeypatch):
    """A tar member whose header says 100 MB (a sparse file) is recorded as failed, no byte of it read."""
    from featx.data import remote

    def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                _member(tf, name, data)
        return buf.getvalue()

    good = tar_bytes([m for i, label in enumerate("010101") for m in
                      ((f"ok{i}.png", _png((40 * i, 90, 20))), (f"ok{i}.cls", label.encode()))])
    good = good[: good.rstrip(b"\0").__len__() + (-len(good.rstrip(b"\0"))) % 512]  # without the end blocks
    big = tarfile.TarInfo("big.png")
    big.size = 100 << 20
    shard = tmp_path / "train-000.tar"
    with open(shard, "wb") as fh:
        fh.write(good + big.tobuf(format=tarfile.USTAR_FORMAT))
        fh.seek(big.size, os.SEEK_CUR)  # the member's data: a sparse hole
        fh.write(tar_bytes([("big.cls", b"0")]))
    reads = []
    real = remote.read_one
    monkeypatch.setattr(remote, "read_one", lambda u, a, n: reads.append(n) or real(u, a, n))
    fc = featx.embed([str(shard)], cache_dir=tmp_path / "cache", max_image_bytes=1 << 20, **TINY_KW)
    assert len(fc) == 6 and max(reads) < 1 << 20
    reason = dict(fc.failed)["big.png"]
    assert "104857600 bytes is larger than --max-image-bytes 1048576" in reason and "not read" in reason


@pytest.mark.slow
def test_a_parquet_cell_above_the_image_bound_is_failed_and_the_good_rows_embed(tmp_path):
    """A small Parquet file whose one zero cell decompresses to 64 MB (a 1.2 GB one in the issue): that row is
    failed, the six good images are embedded."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cells = [_png((30 * i, 100, 50)) for i in range(6)] + [bytes(64 << 20)]
    table = pa.table({"image": cells, "label": ["a", "b"] * 3 + ["a"]})
    pq.write_table(table, tmp_path / "train.parquet", compression="zstd")
    del cells, table
    assert (tmp_path / "train.parquet").stat().st_size < 1 << 20
    fc = featx.embed([str(tmp_path / "train.parquet")], cache_dir=tmp_path / "cache", max_image_bytes=1 << 20,
                     **TINY_KW)
    assert len(fc) == 6
    [(key, reason)] = fc.failed
    assert key == "row-000006" and "67108864 bytes is larger than --max-image-bytes" in reason


def test_the_image_bound_must_be_positive(tmp_path):
    with pytest.raises(FeatxError, match="--max-image-bytes must be a positive"):
        featx.embed([str(tmp_path / "x.tar")], cache_dir=tmp_path / "c", max_image_bytes=0, **TINY_KW)


# --------------------------------------------------------------------------- labels and patterns


@pytest.mark.slow
def test_a_classlabel_of_minus_one_is_an_unlabelled_row_left_out(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = write_image_folder(tmp_path / "data", splits=(), classes=("a", "b"), per_class=3)
    files = sorted(str(p) for p in root.rglob("*.png"))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    labels = [0, 1, -1, 0, 1, -1]
    datasets.Dataset.from_dict({"image": files, "label": labels}, features=feats).cast_column(
        "image", datasets.Image(decode=True)).to_parquet(str(tmp_path / "train.parquet"))
    from featx.data.sources import SourceOptions, discover_any

    ds = discover_any([str(tmp_path / "train.parquet")], options=SourceOptions("image", "label", 1))
    assert ds.classes == ["a", "b"] and len(ds.samples) == 4
    assert sum("unlabelled (ClassLabel -1)" in why for _, why in ds.skipped) == 2


@pytest.mark.parametrize("label", ["²", "9" * 1000, "9" * 5000, "٣"])
def test_odd_webdataset_labels_are_class_names_or_one_line_refusals(tmp_path, label):
    shard = tmp_path / "train-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, lab in enumerate(["0", label, "1"]):
            _member(tf, f"s{i}.png", _png())
            _member(tf, f"s{i}.cls", lab.encode())
    from featx.data.sources import SourceOptions, discover_any

    ds = discover_any([str(shard)], options=SourceOptions("image", "label", 1))
    if len(label.encode()) > 1024:  # not a label at all: that sample is skipped, naming the member
        assert ds.classes == ["0", "1"] and "label member of 5000 bytes" in dict(ds.skipped)[f"{shard}:s1.cls"]
    else:
        assert ds.classes == ["0", "1", label]
    (tmp_path / "classes.txt").write_text("zero\none\n")
    if len(label.encode()) <= 1024:
        with pytest.raises(FeatxError, match=r"s1.png: class number .* has no name in the class names file"):
            discover_any([str(shard)], options=SourceOptions("image", "label", 1))


def test_a_brace_pattern_of_a_billion_names_is_refused_at_once():
    proc = run_isolated("""
        import time
        from featx.base.errors import FeatxError
        from featx.data.sources import SourceOptions, discover_any
        t0 = time.perf_counter()
        try:
            discover_any(["x-{000000000..999999999}.tar"], options=SourceOptions("image", "label", 1))
        except FeatxError as exc:
            print(f"{time.perf_counter() - t0:.3f} | {exc}")
    """, memory=1 << 30, timeout=60)
    seconds, message = proc.stdout.strip().split(" | ", 1)
    assert float(seconds) < 1 and "names 1,000,000,000 files, more than 1,000,000" in message, proc.stderr[-1000:]


# --------------------------------------------------------------------------- HDF5 metadata corruption


def _heap_addresses(path: Path) -> list[int]:
    """File offsets of the global heap collections that the cache's text datasets point into."""
    import struct

    addrs = set()
    with h5py.File(path, "r") as f:
        for name in ("paths", "classes", "failed/paths", "failed/reasons"):
            d = f[name]
            if d.id.get_offset() is None:
                continue
            with open(path, "rb") as fh:
                fh.seek(d.id.get_offset())
                raw = fh.read(d.id.get_storage_size())
            addrs |= {struct.unpack("<Q", raw[i + 4 : i + 12])[0] for i in range(0, len(raw), 16)}
    return sorted(a for a in addrs if a)


@pytest.mark.slow
def test_verify_reads_everything_a_probe_reads_under_seeded_metadata_corruption(tmp_path):
    """Random bytes written into the heaps and other metadata (seeded): whenever `featx verify` passes a cache,
    a probe on it works; whenever a probe cannot read it, it says so in one line (never a traceback)."""
    made = make_tiny_cache(tmp_path / "m", per_class=4)
    heaps = _heap_addresses(made.path)
    rng = np.random.default_rng(31)
    files = []
    for seed in range(16):
        p = tmp_path / f"c{seed}.h5"
        p.write_bytes(made.path.read_bytes())
        off = int(heaps[seed % len(heaps)] + rng.integers(0, 256))
        with open(p, "r+b") as fh:
            fh.seek(off)
            fh.write(rng.integers(0, 256, int(rng.choice([1, 4, 16])), dtype=np.uint8).tobytes())
        files.append(str(p))
    proc = run_isolated(f"""
        import contextlib, io, logging
        logging.disable(logging.CRITICAL)
        import featx
        from featx.base.errors import FeatxError
        from featx.cache.trust.verify import verify_cache

        def outcome(call):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    r = call()
                return "ok" if getattr(r, "ok", True) else "damaged"
            except FeatxError:
                return "refused"
            except Exception as exc:
                return "traceback:" + type(exc).__name__

        for i, p in enumerate({files!r}):
            v = outcome(lambda: verify_cache(p))
            pr = outcome(lambda: featx.probe(p, head="logreg", out_dir=f"run{{i}}", n_jobs=1, device="cpu",
                                             plots=False))
            print(p, v, pr)
    """, timeout=300, cwd=tmp_path)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("/")]
    assert len(rows) == 16, proc.stderr[-2000:]
    assert not [r for r in rows if r[2].startswith("traceback")], rows
    assert not [r for r in rows if r[1] == "ok" and r[2] != "ok"], rows  # verify passed what a probe cannot read
    assert sum(r[1] != "ok" for r in rows) >= 4  # the corruption did hit what featx reads
