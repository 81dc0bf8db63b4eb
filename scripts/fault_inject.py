#!/usr/bin/env python
"""Fault injection for ``featx embed``: SIGKILL at random moments, rerun, compare with a clean run.

Why: users kill featx whenever they need the GPU back.  A killed run must never leave a corrupt
cache, and the rerun must produce exactly the cache an uninterrupted run produces.

Each trial starts ``featx embed`` (tiny_cnn, random weights, CPU) in its own process group and
SIGKILLs the group at a chosen moment, then reruns it to completion and checks:

- the killed state is never corrupt: if a finished cache file exists it opens and equals the
  reference (finished files are only ever renamed into place complete);
- the rerun exits 0 and its cache equals the clean reference: same rows in the same order, same
  labels, splits, classes and failed images, features allclose (atol 1e-5);
- nothing is left behind: no ``.parts`` folder, no ``*.tmp`` file.

Kill moments rotate over five strategies (``random``: uniform over the whole run, so model
loading, chunks and the final write are all hit; ``chunk``: just after the k-th committed
chunk; ``final``: as soon as the final ``.h5.tmp`` appears; ``twice``: two random kills before
the rerun; ``rename``: as soon as the finished file is renamed into place, before the chunk
folder is removed).  Extra ``sigint`` trials send Ctrl-C's SIGINT at a random moment instead and
also require exit 130 with a message saying how to resume, and no traceback. ``sigterm`` trials send SIGTERM to the
whole process group (DataLoader workers included, as SLURM and ``timeout`` do) and require exit 143 and that
one line.  ``--metadata-trials`` write 1 to 32 random bytes anywhere in a finished cache but its feature rows
and checksums: ``featx verify`` must refuse every cache that a probe cannot read, and neither may give a
traceback.  ``--corrupt-trials``
write 2000 random bytes into a committed chunk (after a kill) or into the finished cache, then
rerun: the rerun must end with the identical cache (damaged rows found by their checksums and
embedded again) or, when the finished file's structure is hit, with a one-line "damaged" error
and its fix; exit 0 with other features (silent corruption) or a traceback fails the trial.
``--disk-full-trials`` run ``featx audit`` and ``featx embed`` (``--disk-full-commands``; embed: writing
of a new cache), each with a new signing key and every file limited to a random size (RLIMIT_FSIZE: a write past it fails, as on a full disk): the run must end with
exit 0 or a one-line error (no traceback), leave no temporary file and no short signing key, and a rerun with
space must exit 0 (embed: with the cache identical to the clean run).  The table at the end counts the phase each kill actually landed in, as seen on
disk and in its log.  It also times discovery of 100,000 files in one folder.

    python scripts/fault_inject.py                 # 20 trials + 100k-file discovery timing
    python scripts/fault_inject.py --trials 40 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featx.cache.store import FeatureCache  # noqa: E402
from featx.data import discover  # noqa: E402


def _fault_env() -> dict[str, str]:
    """A featx subprocess that sleeps DELAY s after each chunk: tests/faults/sitecustomize.py, first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "faults"), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "FEATX_TEST_CHUNK_DELAY": str(DELAY)}

CHUNK, BATCH, DELAY = 8, 4, 0.1


def make_dataset(root: Path, n_per_class: int, seed: int) -> None:
    """Three classes, train + val, plus a few files that fail to load (they must survive kills too)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("val", max(2, n_per_class // 4))):
        for c in ("ants", "bees", "wasps"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (rng.integers(20, 60), rng.integers(20, 60), 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.{'png' if i % 3 else 'jpg'}")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train" / "ants" / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    (root / "train" / "bees" / "empty.jpg").write_bytes(b"")
    (root / "val" / "wasps" / "page.jpg").write_text("<html>not an image</html>")


def default_sigint() -> None:
    """Children of a background job (``nohup ... &``) inherit SIGINT *ignored*; Ctrl-C trials need it live."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def embed_cmd(data: Path, cache: Path, workers: int, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), "--backbone", "tiny_cnn",
            "--weights", "random", "--workers", str(workers), "--batch-size", str(BATCH), "--chunk-size", str(CHUNK),
            "--device", "cpu", *(["--quiet"] if quiet else [])]


def parts_of(cache: Path) -> Path:
    return Path(str(cache) + ".parts")


def disk_state(cache: Path) -> dict:
    parts = parts_of(cache)
    return {
        "final": cache.exists(),
        "final_tmp": Path(str(cache) + ".tmp").exists(),
        "parts": parts.exists(),
        "chunks": len(list(parts.glob("chunk-*.h5"))),
        "chunk_tmp": bool(list(parts.glob(".chunk-*.tmp"))),
    }


def phase_of_kill(before: dict, after: dict, log_text: str) -> str:
    """Where the run was when it died, judged from its log and the files it left.

    The log line "embedding N images" is written once the model is built and the lock held;
    before it the run was starting up (imports, discovery, model building, waiting for the lock).
    """
    if after["final"] and not before["final"]:
        return "after final rename, before cleanup" if after["parts"] else "after completion (exiting)"
    if after["final_tmp"]:
        return "during final write"
    if "embedding " not in log_text:
        return "startup / model loading"
    if after["chunk_tmp"]:
        return "while committing a chunk"
    if after["chunks"] > before["chunks"]:
        return "embedding, after >=1 new chunk"
    return "embedding, before its first chunk"


def compare(cache: Path, ref: Path) -> str | None:
    """None if ``cache`` equals ``ref``, else what differs."""
    try:
        a, b = FeatureCache(cache), FeatureCache(ref)
    except Exception as exc:  # noqa: BLE001
        return f"cannot open: {exc}"
    if a.keys() != b.keys():
        return f"rows differ ({len(a)} vs {len(b)})"
    if a.classes != b.classes:
        return "classes differ"
    if not (a.labels() == b.labels()).all() or not (a.split_array() == b.split_array()).all():
        return "labels/splits differ"
    if a.failed != b.failed:
        return f"failed lists differ ({len(a.failed)} vs {len(b.failed)})"
    if not np.allclose(a.features(), b.features(), atol=1e-5):
        return f"features differ (max {np.abs(a.features() - b.features()).max():.2e})"
    return None


def leftovers(cache: Path) -> list[str]:
    out = [p.name for p in cache.parent.glob("*.tmp")]
    if parts_of(cache).exists():
        out.append(parts_of(cache).name)
    return out


def kill_once(data: Path, cache: Path, strategy: str, run_seconds: float, rng: random.Random, workers: int,
              sig: int = signal.SIGKILL) -> dict:
    """Start a run, signal its process group at the moment ``strategy`` picks, report what is on disk.

    SIGKILL gives the run no chance to react; SIGINT (what Ctrl-C sends to the whole foreground
    process group) must end it cleanly: exit 130, a message saying how to resume, no traceback.
    """
    env = _fault_env()
    before = disk_state(cache)
    log_path = cache.parent / f"kill-{time.time_ns()}.log"
    with open(log_path, "w") as log_fh:  # not --quiet: the log tells startup from embedding
        proc = subprocess.Popen(embed_cmd(data, cache, workers, quiet=False), env=env, stdout=subprocess.DEVNULL,
                                stderr=log_fh, start_new_session=True, preexec_fn=default_sigint)
    t0 = time.perf_counter()
    target = ""
    final_tmp = Path(str(cache) + ".tmp")
    if strategy == "chunk":
        k = rng.randint(1, 6)
        target = f"after chunk {k}"
        while proc.poll() is None and len(list(parts_of(cache).glob("chunk-*.h5"))) < k:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, DELAY * 1.5))
    elif strategy == "final":
        target = "final .tmp appears"
        while proc.poll() is None and not final_tmp.exists() and not cache.exists():
            time.sleep(0.0005)
    elif strategy == "rename":
        target = "final file appears"
        while proc.poll() is None and not cache.exists():
            time.sleep(0.0002)
    else:
        delay = rng.uniform(0.0, run_seconds)
        target = f"t={delay:.2f}s"
        while proc.poll() is None and time.perf_counter() - t0 < delay:
            time.sleep(0.002)
    finished_first = proc.poll() is not None
    finished_at = time.perf_counter() - t0 if finished_first else None
    at_signal = disk_state(cache)  # SIGINT lets the run go on for a moment: judge where it was now
    log_at_signal = log_path.read_text(errors="replace")
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    problem = None
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        problem = "did not stop within 120 s of SIGINT"
    t_kill = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    if sig == signal.SIGKILL:  # nothing happens after SIGKILL: the files now are the files at the kill
        at_signal, log_at_signal = disk_state(cache), log_text
    phase = "run had already finished" if finished_first else phase_of_kill(before, at_signal, log_at_signal)
    log_path.unlink()
    stop_code = {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig)
    if stop_code and not finished_first and problem is None:
        if "Traceback" in log_text or "Exception ignored" in log_text:
            problem = f"traceback on {signal.Signals(sig).name}: " + log_text.strip().splitlines()[-1]
        elif proc.returncode == stop_code and "rerun the same command to resume" in log_text:
            pass
        elif phase.startswith("after completion") and proc.returncode in (0, stop_code, -sig):
            pass  # the work was finished and saved; Ctrl-C only cut the interpreter's exit short
        elif proc.returncode != 0:
            problem = f"Ctrl-C gave exit {proc.returncode} without the resume message"
    # Whatever is on disk now must be sound: a finished cache file is only ever complete.
    if cache.exists():
        diff = compare(cache, REF_CACHE)
        if diff is not None:
            problem = f"finished file after kill is not complete: {diff}"
    return {"target": target, "killed_at_s": round(t_kill, 3), "phase": phase, "problem": problem,
            "finished_at_s": finished_at, "signal": signal.Signals(sig).name,
            "exit": proc.returncode}


REF_CACHE: Path = Path()


def run_trials(work: Path, data: Path, trials: int, seed: int, sigint_trials: int = 0,
               sigterm_trials: int = 0) -> list[dict]:
    global REF_CACHE
    REF_CACHE = work / "reference.h5"
    t = time.perf_counter()
    subprocess.run(embed_cmd(data, REF_CACHE, 0), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"clean reference run: {time.perf_counter() - t:.1f}s -> {REF_CACHE.name} ({len(FeatureCache(REF_CACHE))} rows, "
          f"{len(FeatureCache(REF_CACHE).failed)} failed images)")
    timing = work / "timing.h5"
    t = time.perf_counter()
    subprocess.run(embed_cmd(data, timing, 0), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=_fault_env())
    run_seconds = time.perf_counter() - t
    print(f"run with FEATX_TEST_CHUNK_DELAY={DELAY}: {run_seconds:.1f}s (random kills are drawn from [0, that])")
    rng = random.Random(seed)
    est = run_seconds  # duration of a full delayed run; adapts when runs finish before their kill
    strategies = ["random", "chunk", "final", "twice", "rename"]
    results = []
    for i in range(trials + sigint_trials + sigterm_trials):
        strategy = strategies[i % len(strategies)] if i < trials else "sigint" if i < trials + sigint_trials \
            else "sigterm"  # SIGTERM to the process group, as SLURM and `timeout` send: exit 143, one line
        workers = rng.choice([0, 2])
        cache = work / f"trial{i:03d}" / "c.h5"
        cache.parent.mkdir(parents=True)
        first = "random" if strategy in ("twice", "sigint", "sigterm") else strategy
        sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(strategy, signal.SIGKILL)
        for _attempt in range(4):
            # twice: kills early enough that the second run still has work left
            k = kill_once(data, cache, first, est * (0.7 if strategy == "twice" else 1.0), rng, workers, sig)
            if k["finished_at_s"] is None or strategy not in ("random", "twice", "sigint", "sigterm"):
                break
            # The machine got faster than the estimate: learn it, start from scratch, draw again.
            est = 0.95 * k["finished_at_s"]
            shutil.rmtree(cache.parent)
            cache.parent.mkdir(parents=True)
        kills = [k]
        if strategy == "twice":
            kills.append(kill_once(data, cache, "random", est * 0.7, rng, workers))
        t = time.perf_counter()
        done = subprocess.run(embed_cmd(data, cache, workers), capture_output=True, text=True)
        rerun_s = time.perf_counter() - t
        problems = [k["problem"] for k in kills if k["problem"]]
        if done.returncode != 0:
            problems.append(f"rerun exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        else:
            diff = compare(cache, REF_CACHE)
            if diff:
                problems.append(diff)
            left = leftovers(cache)
            if left:
                problems.append(f"left behind: {left}")
        r = {"trial": i, "strategy": strategy, "workers": workers, "kills": kills, "rerun_s": round(rerun_s, 2),
             "ok": not problems, "problems": problems}
        results.append(r)
        print(f"trial {i:2d} {strategy:6s} workers={workers} "
              + " | ".join(f"{k['signal']} {k['target']} -> {k['phase']}"
                           + (f" (exit {k['exit']})" if k["signal"] != "SIGKILL" else "") for k in kills)
              + f" | rerun {rerun_s:.1f}s: {'identical' if not problems else 'FAIL ' + '; '.join(problems)}",
              flush=True)
        shutil.rmtree(cache.parent, ignore_errors=True)
    return results


CORRUPT_BYTES = 2000


def corrupt_file(path: Path, rng: random.Random) -> int:
    """Overwrite CORRUPT_BYTES random bytes at a random offset of ``path`` (as a failing disk would); returns it."""
    size = path.stat().st_size
    off = rng.randrange(0, max(1, size - CORRUPT_BYTES))
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(rng.randbytes(min(CORRUPT_BYTES, size - off)))
    return off


def corrupt_once(data: Path, cache: Path, where: str, rng: random.Random, workers: int) -> dict:
    """Damage a committed chunk (after a kill) or the finished cache, then rerun ``featx embed``.

    Sound outcomes: the rerun exits 0 with a cache identical to the clean run (damaged rows found by
    their checksums and embedded again; bytes that hit unused space change nothing), or, when the
    damage hits the finished file's structure, it exits 2 with a one-line error saying the cache is
    damaged and how to rebuild it.  Unsound: exit 0 with other features (silent corruption), a traceback.
    """
    kills = []
    if where == "chunk":
        kills.append(kill_once(data, cache, "chunk", 0.0, rng, workers))
        chunks = sorted(parts_of(cache).glob("chunk-*.h5"))
        if not chunks or cache.exists():
            return {"kills": kills, "target": "no committed chunk to damage", "problem": None, "outcome": "skipped"}
        victim = rng.choice(chunks)
    else:
        shutil.copy(REF_CACHE, cache)
        victim = cache
    off = corrupt_file(victim, rng)
    verify = subprocess.run([sys.executable, "-m", "featx.cli", "verify", str(cache)], capture_output=True, text=True) \
        if where == "final" else None
    done = subprocess.run(embed_cmd(data, cache, workers), capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    problem, outcome = None, ""
    if "Traceback" in done.stderr:
        problem = "traceback: " + err[-1]
    elif done.returncode == 0:
        diff = compare(cache, REF_CACHE)
        outcome = "healed, identical" if diff is None else ""
        problem = f"exit 0 but {diff} (silent corruption)" if diff else None
    elif done.returncode == 2 and "damaged" in done.stderr and len(err) == 1 and where == "final":
        outcome = "refused: damaged, with the fix"
    else:
        problem = f"rerun exit {done.returncode}: {err[-1:]}"
    return {"kills": kills, "target": f"{CORRUPT_BYTES} bytes at {off} of {victim.name}", "problem": problem,
            "outcome": outcome, "verify_exit": verify.returncode if verify else None}


def run_corrupt_trials(work: Path, data: Path, trials: int, seed: int, first: int) -> list[dict]:
    """``trials`` corruption trials, alternating a committed chunk and the finished cache."""
    rng = random.Random(seed + 1)
    results = []
    for j in range(trials):
        where = ("chunk", "final")[j % 2]
        cache = work / f"corrupt{j:03d}" / "c.h5"
        cache.parent.mkdir(parents=True)
        t = time.perf_counter()
        r = corrupt_once(data, cache, where, rng, rng.choice([0, 2]))
        r.update(trial=first + j, strategy=f"corrupt-{where}", workers=0, rerun_s=round(time.perf_counter() - t, 2),
                 ok=r["problem"] is None, problems=[r["problem"]] if r["problem"] else [])
        results.append(r)
        verify = f", featx verify exit {r['verify_exit']}" if r.get("verify_exit") is not None else ""
        print(f"trial {first + j:2d} corrupt-{where:5s} {r['target']}{verify} -> "
              f"{r['outcome'] or 'FAIL ' + str(r['problem'])}", flush=True)
        shutil.rmtree(cache.parent, ignore_errors=True)
    return results


FULL_DISK_LIMITS = (16, 600, 6_000, 60_000)  # bytes per file: below the signing key, a chunk, the cache, a run's files


def _file_size_limit(n_bytes: int):
    """A subprocess's preexec_fn: every write past ``n_bytes`` of one file fails (EFBIG), as on a full disk."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def disk_full_once(data: Path, trial: Path, command: str, limit: int, workers: int) -> dict:
    """``featx embed`` or ``featx audit`` on a 'full disk', then again with space; the problems found (see the docstring)."""
    key, cache = trial / "key" / "local.key", trial / "c.h5"
    env = {**os.environ, "FEATX_KEY_FILE": str(key)}
    if command == "embed":
        cmd = embed_cmd(data, cache, workers)
    else:
        shutil.copy(REF_CACHE, cache)
        cmd = [sys.executable, "-m", "featx.cli", "audit", str(cache), "--out-dir", str(trial / "audit"), "--folds", "2"]
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(limit), timeout=300)
    err = full.stderr.strip().splitlines()
    problems = []
    if "Traceback" in full.stderr:
        problems.append("traceback: " + err[-1])
    elif full.returncode not in (0, 2) or (full.returncode == 2 and not (err and err[-1].startswith("error:"))):
        problems.append(f"exit {full.returncode} without a one-line error: {err[-2:]}")
    tmp = [str(f.relative_to(trial)) for f in trial.rglob("*") if ".tmp" in f.name]
    if tmp:
        problems.append(f"temporary files left: {tmp[:3]}")
    if key.exists() and len(key.read_bytes()) < 32:
        problems.append(f"a signing key of {len(key.read_bytes())} bytes")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if again.returncode != 0:
        problems.append(f"the run with space exits {again.returncode}: {again.stderr.strip().splitlines()[-1:]}")
    elif command == "embed" and compare(cache, REF_CACHE):
        problems.append(f"the run with space: {compare(cache, REF_CACHE)}")
    outcome = "completed" if full.returncode == 0 else "refused: " + (err[-1][:100] if err else "")
    return {"kills": [], "limit": limit, "command": command, "outcome": outcome, "problems": problems,
            "ok": not problems}


def run_disk_full_trials(work: Path, data: Path, trials: int, seed: int, first: int,
                         commands: tuple[str, ...] = ("audit",)) -> list[dict]:
    """``trials`` full-disk trials, taking ``commands`` in turn, the file-size limit drawn from FULL_DISK_LIMITS."""
    global REF_CACHE
    if trials and not REF_CACHE.is_file():
        REF_CACHE = work / "reference.h5"
        subprocess.run(embed_cmd(data, REF_CACHE, 0), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(seed + 2)
    results = []
    for j in range(trials):
        command, limit = commands[j % len(commands)], rng.choice(FULL_DISK_LIMITS)
        trial = work / f"diskfull{j:03d}"
        trial.mkdir(parents=True)
        # No DataLoader workers: RLIMIT_FSIZE would also limit their shared-memory files (/dev/shm), which a full
        # disk leaves alone, and a worker that cannot write one leaves torch's loader waiting (seen: a 900 s hang).
        r = disk_full_once(data, trial, command, limit, 0)
        r.update(trial=first + j, strategy=f"disk-full-{command}", workers=0)
        results.append(r)
        print(f"trial {first + j:2d} disk-full {command:5s} files <= {limit:>6,} B -> "
              f"{r['outcome'] if r['ok'] else 'FAIL ' + '; '.join(r['problems'])}", flush=True)
        shutil.rmtree(trial, ignore_errors=True)
    return results


_METADATA_CHECK = """
import contextlib, io, json, logging, sys
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
        return "traceback: " + type(exc).__name__ + " " + str(exc)[:120]
p, out = sys.argv[1], sys.argv[2]
print(json.dumps([outcome(lambda: verify_cache(p)),
                  outcome(lambda: featx.probe(p, head="logreg", out_dir=out, n_jobs=1, device="cpu", plots=False))]))
"""


def run_metadata_trials(work: Path, data: Path, trials: int, seed: int, first: int) -> list[dict]:
    """Random bytes (1 to 32) anywhere in a finished cache but its feature rows and checksums: `featx verify` must
    refuse (or report damaged) every cache a probe cannot read, and neither may end in a traceback."""
    if not trials:
        return []
    import h5py

    ref = work / "metadata-ref.h5"
    subprocess.run(embed_cmd(data, ref, 0), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    with h5py.File(ref, "r") as f:  # the bytes that checksums guard are left alone: metadata is the target
        f.visititems(lambda n, o: rows.append((o.id.get_offset(), o.id.get_storage_size()))
                     if isinstance(o, h5py.Dataset) and (o.dtype.kind == "f" or n.startswith("checksums"))
                     and o.id.get_offset() is not None else None)
    rng, size, results = random.Random(seed + 31), ref.stat().st_size, []
    for i in range(trials):
        off = next(o for o in iter(lambda: rng.randrange(size), None) if not any(a <= o < a + n for a, n in rows))
        victim = work / f"metadata{i:03d}.h5"
        shutil.copy(ref, victim)
        with open(victim, "r+b") as fh:
            fh.seek(off)
            fh.write(bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 16, 32]))))
        done = subprocess.run([sys.executable, "-c", _METADATA_CHECK, str(victim), str(work / f"mrun{i}")],
                              capture_output=True, text=True, timeout=300)
        verify, probe = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else ("crash", "")
        problems = [x for x in (verify, probe) if x.startswith(("traceback", "crash"))]
        if verify == "ok" and probe != "ok":
            problems.append(f"verify passed a cache the probe cannot read ({probe})")
        results.append({"trial": first + i, "strategy": "metadata", "kills": [], "ok": not problems,
                        "problems": problems, "target": f"bytes at {off}", "verify": verify, "probe": probe})
        print(f"trial {first + i:2d} metadata  bytes at {off}: verify {verify}, probe {probe}"
              + (f" FAIL {problems}" if problems else ""), flush=True)
        victim.unlink()
    return results


def time_discovery(work: Path, n: int) -> dict:
    folder = work / "many" / "one_class"
    folder.mkdir(parents=True)
    t = time.perf_counter()
    for i in range(n):
        open(folder / f"img_{i:06d}.jpg", "wb").close()  # discovery never opens files
    make_s = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        ds = discover(work / "many")
        times.append(time.perf_counter() - t)
    assert len(ds) == n and ds.samples[0].key == "one_class/img_000000.jpg"
    out = {"files": n, "best_s": round(min(times), 3), "all_s": [round(x, 3) for x in times],
           "create_s": round(make_s, 1)}
    shutil.rmtree(work / "many", ignore_errors=True)
    return out


def summarize(results: list[dict]) -> str:
    by_phase: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        for k in r["kills"]:
            by_phase[k["phase"]]["kills"] += 1
            by_phase[k["phase"]]["identical after rerun" if r["ok"] else "FAILED"] += 1
    by_strategy: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_strategy[r["strategy"]]["trials"] += 1
        by_strategy[r["strategy"]]["ok" if r["ok"] else "failed"] += 1
    lines = ["", "kill landed in (from its log and disk)   kills  identical  failed",
             "-" * 66]
    for phase, c in sorted(by_phase.items(), key=lambda kv: -kv[1]["kills"]):
        lines.append(f"{phase:40s} {c['kills']:5d}  {c['identical after rerun']:9d}  {c['FAILED']:6d}")
    lines += ["", "strategy   trials  ok  failed", "-" * 30]
    for s, c in by_strategy.items():
        lines.append(f"{s:9s} {c['trials']:7d} {c['ok']:3d} {c['failed']:7d}")
    sigkill = [r for r in results if r["strategy"] not in ("sigint", "sigterm", "metadata")
               and not r["strategy"].startswith(("corrupt", "disk-full"))]
    sigterm, metadata = ([r for r in results if r["strategy"] == s] for s in ("sigterm", "metadata"))
    disk_full = [r for r in results if r["strategy"].startswith("disk-full")]
    corrupt = [r for r in results if r["strategy"].startswith("corrupt")]
    sigint = [r for r in results if r["strategy"] == "sigint"]
    kills = sum(len(r["kills"]) for r in sigkill)
    if sigkill:
        lines.append(f"\n{sum(r['ok'] for r in sigkill)}/{len(sigkill)} SIGKILL trials ({kills} SIGKILLs) ended with a "
                     "complete cache identical to the clean run")
    if sigint:
        lines.append(f"{sum(r['ok'] for r in sigint)}/{len(sigint)} Ctrl-C (SIGINT) trials stopped cleanly (exit 130, "
                     "resume message, no traceback) and resumed to the identical cache")
    if sigterm:
        lines.append(f"{sum(r['ok'] for r in sigterm)}/{len(sigterm)} SIGTERM trials (to the process group, DataLoader "
                     "workers included) stopped cleanly (exit 143, one line) and resumed to the identical cache")
    if metadata:
        lines.append(f"{sum(r['ok'] for r in metadata)}/{len(metadata)} metadata-corruption trials: verify refused "
                     "every cache the probe could not read, and neither gave a traceback")
    if corrupt:
        outcomes = Counter(r.get("outcome") or "FAILED" for r in corrupt)
        lines.append(f"{sum(r['ok'] for r in corrupt)}/{len(corrupt)} corruption trials ({CORRUPT_BYTES} random bytes in a "
                     f"chunk or the finished file) ended soundly: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    if disk_full:
        lines.append(f"{sum(r['ok'] for r in disk_full)}/{len(disk_full)} full-disk trials (every "
                     "file size-limited) ended with exit 0 or a one-line error, no temporary file, no short key, and a "
                     "clean rerun")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="SIGKILL trials")
    ap.add_argument("--sigint-trials", type=int, default=5, help="Ctrl-C (SIGINT to the process group) trials")
    ap.add_argument("--sigterm-trials", type=int, default=3, help="SIGTERM to the process group (SLURM, timeout)")
    ap.add_argument("--metadata-trials", type=int, default=20,
                    help="random bytes in a finished cache's heaps and metadata: verify must refuse what probe cannot read")
    ap.add_argument("--corrupt-trials", type=int, default=6,
                    help="trials writing 2000 random bytes into a committed chunk or the finished cache")
    ap.add_argument("--disk-full-trials", type=int, default=4,
                    help="trials running a command with every file size-limited (a full disk), then again")
    ap.add_argument("--disk-full-commands", default="audit,embed",
                    help="audit and/or embed, comma-separated (embed writes chunk files as bytes built in memory)")
    ap.add_argument("--per-class", type=int, default=40, help="train images per class (3 classes, + val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--discovery-files", type=int, default=100_000, help="0 to skip the discovery timing")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featx-fault-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": {"trials": args.trials, "sigint_trials": args.sigint_trials,
                                 "corrupt_trials": args.corrupt_trials, "per_class": args.per_class, "seed": args.seed,
                                 "chunk_size": CHUNK, "batch_size": BATCH, "chunk_delay_s": DELAY}}
    try:
        if args.discovery_files:
            d = time_discovery(work, args.discovery_files)
            print(f"discovery of {d['files']:,} files in one folder: best {d['best_s']:.2f}s of 3 ({d['all_s']})")
            report["discovery"] = d
        data = work / "data"
        make_dataset(data, args.per_class, args.seed)
        results = run_trials(work, data, args.trials, args.seed, args.sigint_trials, args.sigterm_trials) \
            if args.trials + args.sigint_trials + args.sigterm_trials + args.corrupt_trials else []
        results += run_corrupt_trials(work, data, args.corrupt_trials, args.seed, len(results))
        results += run_disk_full_trials(work, data, args.disk_full_trials, args.seed, len(results),
                                        tuple(args.disk_full_commands.split(",")))
        results += run_metadata_trials(work, data, args.metadata_trials, args.seed, len(results))
        report["trials"] = results
        text = summarize(results)
        print(text)
        report["summary"] = text
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
