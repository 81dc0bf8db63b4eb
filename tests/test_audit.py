"""featx audit: planted label errors, duplicates (exact, near, cross-split), outliers; probe --audit/--drop-flagged."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("cleanlab")

from featx.audit import finders  # noqa: E402
from featx.base.errors import FeatxError  # noqa: E402
from featx.cache.store import Chunk, FeatureCache, PartsDir, fingerprint_digest, write_final  # noqa: E402
from featx.cache.trust.roots import sign_root  # noqa: E402
from featx.cli import cli  # noqa: E402
from featx.config.settings import AuditSettings, ProbeSettings  # noqa: E402
from featx.data.folders import Sample  # noqa: E402
from featx.report.html import write_report  # noqa: E402
from featx.runs.audit import audit  # noqa: E402
from featx.runs.audit_probe import parse_drop, probe_audited  # noqa: E402
from featx.runs.probe import probe  # noqa: E402

CLASSES = ("ants", "bees", "owls", "cats")
N_TRAIN, N_TEST, DIM = 240, 80, 24


def _write_cache(path: Path, root: Path, X: np.ndarray, y: np.ndarray, split: list[str], keys: list[str]) -> FeatureCache:
    fp = {"backbone": "synthetic", "dim": X.shape[1], "name": path.name}
    parts = PartsDir(path, fp)
    parts.ensure()
    samples = [Sample(path=str(root / k), key=k, label=int(c), split=s) for k, c, s in zip(keys, y, split)]
    parts.write_chunk(Chunk(keys, X.astype(np.float32), np.zeros(len(keys), np.int64), np.ones(len(keys), np.int64)))
    write_final(path, samples=samples, classes=CLASSES, index=parts.read_index(), dim=X.shape[1], dtype="float32",
                attrs={"fingerprint": fingerprint_digest(fp), "fingerprint_json": json.dumps(fp), "backbone": "synthetic",
                       "root": str(root), "preprocess": "none",
                       "root_mac": sign_root(str(root), fingerprint_digest(fp))})  # as `featx embed` signs it
    parts.remove()
    return FeatureCache(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Four Gaussian classes with known problems: 12 flipped training labels, 3 test rows copied into train
    (features + small noise), one byte-identical train/test file pair, one training outlier."""
    tmp = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(CLASSES), DIM)) * 3
    n = N_TRAIN + N_TEST
    y = np.arange(n) % len(CLASSES)
    X = centres[y] + rng.normal(size=(n, DIM))
    split = ["train"] * N_TRAIN + ["test"] * N_TEST
    flipped = rng.choice(N_TRAIN - 10, size=12, replace=False)
    y_given = y.copy()
    y_given[flipped] = (y[flipped] + 1 + rng.integers(0, len(CLASSES) - 1, size=12)) % len(CLASSES)
    copies = {N_TRAIN - 1 - i: N_TRAIN + 5 + 7 * i for i in range(3)}  # train row -> test row it copies
    for tr, te in copies.items():
        X[tr] = X[te] + rng.normal(scale=0.01, size=DIM)
        y[tr] = y_given[tr] = y[te]
    outlier = N_TRAIN - 5
    X[outlier] = centres[y[outlier]] + rng.normal(size=DIM) * 6
    root = tmp / "data"
    keys = [f"{s}/{CLASSES[c]}/img_{i:04d}.png" for i, (s, c) in enumerate(zip(split, y_given))]
    for i, k in enumerate(keys):
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / k)
    exact = (N_TRAIN - 8, N_TRAIN + 40)  # byte-identical files, features far apart (a renamed copy)
    shutil.copyfile(root / keys[exact[1]], root / keys[exact[0]])
    fc = _write_cache(tmp / "c.h5", root, X, y_given, split, keys)
    return {"tmp": tmp, "root": root, "fc": fc, "X": X, "y": y_given, "split": split, "keys": keys,
            "flipped": {keys[i] for i in flipped}, "copies": {(keys[a], keys[b]) for a, b in copies.items()},
            "exact": (keys[exact[0]], keys[exact[1]]), "outlier": keys[outlier]}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def audited(planted):
    out = planted["tmp"] / "run"
    res = audit(planted["fc"], AuditSettings(out_dir=str(out), report=False, folds=3))
    return {"res": res, "out": out, "labels": _csv(out / "label_issues.csv"), "dups": _csv(out / "duplicates.csv"),
            "outliers": _csv(out / "outliers.csv")}


@pytest.mark.slow
def test_label_issues_find_the_flipped_labels(planted, audited):
    rows = audited["labels"]
    assert list(rows[0]) == ["path", "split", "given", "suggested", "score", "flagged", "rank", "confusable"]
    assert len(rows) == N_TRAIN + N_TEST  # every row ranked (issue 33), the flags a column
    for part in ("train", "test"):  # ranked within the training rows and within the evaluation rows
        assert [int(r["rank"]) for r in rows if r["split"] == part] == list(range(1, sum(r["split"] == part for r in rows) + 1))
    flagged = [r for r in rows if r["flagged"] == "1"]
    assert len(flagged) == audited["res"].counts["label_issues"] and len(flagged) < len(rows) / 4
    n = len(planted["flipped"])
    top2 = {r["path"] for r in rows[: 2 * n]}
    top1 = [r["path"] for r in rows[:n]]
    assert len(top2 & planted["flipped"]) / n >= 0.8
    assert sum(p in planted["flipped"] for p in top1) / n >= 0.7
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # worst first
    flipped_row = next(r for r in rows if r["path"] in planted["flipped"])
    assert flipped_row["given"] != flipped_row["suggested"]


def test_duplicates_cross_split_first_exact_from_hashes(planted, audited):
    rows = audited["dups"]
    assert list(rows[0]) == ["path_a", "path_b", "split_a", "split_b", "similarity", "kind"]
    pairs = {(r["path_a"], r["path_b"]): r for r in rows}
    for a, b in planted["copies"]:
        r = pairs.get((a, b)) or pairs.get((b, a))
        assert r is not None and r["kind"] == "near" and float(r["similarity"]) > 0.99 and r["split_a"] != r["split_b"]
    ex = pairs.get(planted["exact"]) or pairs.get(planted["exact"][::-1])
    assert ex is not None and ex["kind"] == "exact"
    cross = [r["split_a"] != r["split_b"] for r in rows]
    assert cross == sorted(cross, reverse=True)  # leakage first
    counts = audited["res"].counts
    assert counts["cross_split_pairs"] >= 4 and counts["leaked_eval_rows"] >= 4
    assert len(audited["res"].drop["leakage"]) == counts["leaked_eval_rows"]


def test_outlier_found_first(planted, audited):
    """The planted outlier leads the list once the flipped rows (far from their given class too) are set aside."""
    rows = [r for r in audited["outliers"] if r["path"] not in planted["flipped"]]
    assert rows and rows[0]["path"] == planted["outlier"]
    assert float(rows[0]["score"]) >= AuditSettings().outlier_z
    assert len(rows) <= 3  # hardly any clean row is called an outlier


def test_audit_json_and_summary(audited):
    doc = json.loads((audited["out"] / "audit.json").read_text())
    assert doc["counts"]["rows"] == N_TRAIN + N_TEST and doc["settings"]["folds"] == 3
    assert doc["hashing"]["skipped"] == 0 and doc["logreg"]["cv_folds"] == 3
    # tight synthetic classes (mean cosine ~0.9 to the 5 nearest): near pairs are called unreliable
    assert any("unreliable" in n for n in doc["notes"])
    assert doc["label_trust"]["reliable"] and doc["label_trust"]["wording"] == "likely label errors"
    assert doc["logreg"]["view"] == "final" and doc["logreg"]["view_choice"] == "the cache's only view"
    assert doc["settings"]["view"] == "auto" and doc["data_root_mac"]
    assert re.match(r"\d+ train/test duplicate pair\(s\) .* \d+ likely label error\(s\), \d+ outlier\(s\); see ",
                    doc["summary"])


@pytest.mark.slow
def test_evaluation_labels_never_choose_anything_for_training_rows(planted, audited, tmp_path):
    """Same features, the evaluation labels shuffled: every finding about a training row is unchanged."""
    y2 = planted["y"].copy()
    ev = np.arange(N_TRAIN, N_TRAIN + N_TEST)
    y2[ev] = np.random.default_rng(5).permutation(y2[ev])
    fc2 = _write_cache(tmp_path / "c2.h5", planted["root"], planted["X"], y2, planted["split"], planted["keys"])
    res2 = audit(fc2, AuditSettings(out_dir=str(tmp_path / "run2"), report=False, folds=3))
    train_only = lambda rows: [r for r in rows if r["split"] == "train"]  # noqa: E731
    assert train_only(_csv(tmp_path / "run2" / "label_issues.csv")) == train_only(audited["labels"])
    assert train_only(_csv(tmp_path / "run2" / "outliers.csv")) == train_only(audited["outliers"])
    assert np.array_equal(res2.drop["labels"], audited["res"].drop["labels"])
    assert res2.logreg == audited["res"].logreg


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (or the file ``root``): size, mtime and sha256 of each file."""
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest())
            for p in paths}


@pytest.mark.slow
def test_drop_flagged_reports_both_and_never_touches_files(planted, tmp_path):
    before, cache_before = _snapshot(planted["root"]), _snapshot(planted["fc"].path)
    kw = {"head": "logreg", "out_dir": str(tmp_path / "p"), "device": "cpu", "n_jobs": 1, "folds": 3, "save": False,
          "plots": False}
    s = ProbeSettings(head="logreg", out_dir=str(tmp_path / "p"), device="cpu", n_jobs=1, folds=3, no_save=True,
                      drop_flagged="leakage,labels", report=False)
    res = probe_audited(planted["fc"], s, audit_settings=AuditSettings())
    assert _snapshot(planted["root"]) == before
    assert _snapshot(planted["fc"].path) == cache_before
    d = res["drop_flagged"]
    assert d["dropped_eval_rows"] == res["audit"]["counts"]["leaked_eval_rows"] > 0
    assert d["dropped_train_rows"] == res["audit"]["counts"]["label_issues_train"] > 0
    h = d["heads"]["logreg"]
    assert h["n_eval_dropped"] == N_TEST - d["dropped_eval_rows"] and h["n_train_dropped"] == N_TRAIN - d["dropped_train_rows"]
    assert json.loads((tmp_path / "p" / "drop_flagged.json").read_text())["heads"]["logreg"] == h
    # the first probe is the plain probe's result
    plain = probe(planted["fc"], **dict(kw, out_dir=str(tmp_path / "plain")))
    for key in ("accuracy", "params", "cv_score"):
        assert res["heads"]["logreg"][key] == plain["heads"]["logreg"][key]
    assert (tmp_path / "p" / "predictions_logreg.csv").read_text() == (tmp_path / "plain" / "predictions_logreg.csv").read_text()
    assert "excluded" not in plain["split"]


def test_parse_drop_and_settings_errors(planted, tmp_path):
    assert parse_drop("labels, leakage") == ["labels", "leakage"] and parse_drop(None) == []
    with pytest.raises(FeatxError, match="--drop-flagged 'labels,dupes'"):
        parse_drop("labels,dupes")
    with pytest.raises(FeatxError, match="--near-threshold"):
        audit(planted["fc"], AuditSettings(out_dir=str(tmp_path), near_threshold=1.5))
    with pytest.raises(FeatxError, match="--block-rows"):
        audit(planted["fc"], AuditSettings(out_dir=str(tmp_path), block_rows=0))


@pytest.mark.slow
def test_files_outside_the_data_root_are_skipped_and_counted(planted, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    res = audit(planted["fc"], AuditSettings(out_dir=str(tmp_path / "r"), data_root=str(other), report=False, folds=3))
    assert res.hashing["skipped"] == N_TRAIN + N_TEST and res.counts["exact_pairs"] == 0
    assert res.counts["near_pairs"] >= 3  # the features still find the copies


# --------------------------------------------------------------------------- the finders


def _brute_pairs(X, thr):
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Z @ Z.T
    i, j = np.nonzero(np.triu(S >= thr, 1))
    return set(zip(i.tolist(), j.tolist()))


def test_blocked_pairs_equal_brute_force_and_respect_the_cap():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(53, 6)).astype(np.float32)
    X[40] = X[3] * 2  # cosine 1
    for block in (7, 16, 100):
        i, j, s = finders.similar_pairs(X, threshold=0.7, block=block, backend="torch")
        assert set(zip(i.tolist(), j.tolist())) == _brute_pairs(X, 0.7)
        assert np.all(np.diff(s) <= 1e-7)  # most similar first
    reader = (lambda a, b: X[a:b], len(X))
    i2, j2, _ = finders.similar_pairs(reader, threshold=0.7, block=8, backend="torch")
    assert set(zip(i2.tolist(), j2.tolist())) == _brute_pairs(X, 0.7)
    i3, j3, s3 = finders.similar_pairs(X, threshold=0.5, block=5, max_pairs=4, backend="torch")
    assert len(i3) == 4 and (3, 40) == (int(i3[0]), int(j3[0]))


def test_nearest_in_class_blocked_equals_brute_force():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    y = np.arange(40) % 3
    ref = np.arange(30)
    got = finders.nearest_in_class(X, y, ref, k=2, block=4)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    for r in range(40):
        keys = [k for k in ref if y[k] == y[r] and k != r]
        want = np.sort(Z[keys] @ Z[r])[-2:].mean()
        assert got[r] == pytest.approx(want, abs=1e-5)


def test_faiss_backend(monkeypatch):
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(FeatxError, match="faiss is not installed"):
            finders.similar_pairs(np.eye(3), threshold=0.5, backend="faiss")
        return
    X = np.random.default_rng(3).normal(size=(30, 4)).astype(np.float32)
    i, j, _ = finders.similar_pairs(X, threshold=0.6, block=7, backend="faiss")
    assert set(zip(i.tolist(), j.tolist())) == _brute_pairs(X, 0.6)


# --------------------------------------------------------------------------- command line, report, browser


@pytest.mark.slow
def test_cli_audit_prints_the_summary_and_writes_the_report(planted, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["audit", str(planted["fc"].path), "--out-dir", str(out), "--folds", "3"])
    assert r.exit_code == 0, r.output
    assert "train/test duplicate pair(s) (evaluation accuracy may be inflated)" in r.output
    assert "report.html" in r.output
    page = (out / "report.html").read_text()
    assert '<section id="audit">' in page and page.count('class="pair cross"') >= 4
    assert 'href="#audit"' in page
    r2 = CliRunner().invoke(cli, ["probe", str(planted["fc"].path), "--drop-flagged", "dupes"])
    assert r2.exit_code == 2 and "--drop-flagged 'dupes'" in r2.output
    r3 = CliRunner().invoke(cli, ["probe", str(planted["fc"].path), "--head", "logreg", "--folds", "3", "--audit",
                                  "--no-save", "--no-report", "--n-jobs", "1", "--out-dir", str(tmp_path / "p")])
    assert r3.exit_code == 0, r3.output
    assert "\naudit    " in r3.output and "likely label error(s)" in r3.output
    assert {f.name for f in (tmp_path / "p").iterdir()} >= {"metrics.json", "audit.json", "label_issues.csv",
                                                            "duplicates.csv", "outliers.csv"}
    assert "audit" not in json.loads((tmp_path / "p" / "metrics.json").read_text())


def _browser() -> str | None:
    for name in (os.environ.get("FEATX_CHROMIUM"), "chromium-headless-shell", "chromium"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (apt-get install chromium-headless-shell)")
@pytest.mark.slow
def test_audit_section_renders_in_headless_chromium(planted, tmp_path):
    s = ProbeSettings(head="logreg", out_dir=str(tmp_path / "p"), device="cpu", n_jobs=1, folds=3, no_save=True,
                      drop_flagged="leakage", report=True)
    probe_audited(planted["fc"], s)
    report = write_report(tmp_path / "p")
    page = report.read_text()
    # after the summary (heads, confusion: the report's order since issue 34), before the mistakes
    assert page.index('id="confusion"') < page.index('id="audit"') < page.index('id="mistakes"')
    assert "What the findings cost" in page
    for width in (1280, 390):
        png = tmp_path / f"audit-{width}.png"
        cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
               "--virtual-time-budget=5000", f"--window-size={width},2400", f"--screenshot={png}", report.as_uri()]
        shot = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
        with Image.open(png) as im:
            assert im.size[0] == width
            assert len(im.convert("RGB").resize((200, 400)).getcolors(maxcolors=80000)) > 50
        if os.environ.get("FEATX_KEEP_SCREENSHOTS"):
            shutil.copy(png, Path(os.environ["FEATX_KEEP_SCREENSHOTS"]) / png.name)
