"""report.html from a real probe run: sections, escaping, thumbnails, confusion at 120 classes, a real browser."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featx
from featx.base.errors import FeatxError
from featx.base.io import write_json
from featx.report.html import MAX_THUMBS, write_report
from featx.report.predictions import predictions_path, read_predictions, worst_first
from featx.report.runfiles import find_run
from featx.report.tables import confusion_html, most_confused_pairs
from featx.report.thumbs import inside_root, make_thumbnail

from conftest import write_image_folder

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A probe on 4 classes, two of which share a colour (so there are mistakes), one named like an XSS."""
    tmp = tmp_path_factory.mktemp("rep")
    root = write_image_folder(tmp / "data", classes=(XSS, "dogs", "owls", "cats"), per_class=8, seed=3)
    (root / "train" / "dogs" / "bad <b>.png").write_bytes(b"not an image")
    fc = featx.embed(root, backbone="tiny_cnn", weights="random", cache_dir=tmp / "cache", progress=False,
                     num_workers=0, batch_size=16)
    featx.probe(fc, head="logreg,knn", out_dir=tmp / "run", n_jobs=1, device="cpu", folds=2)
    report = write_report(tmp / "run")
    return {"root": root, "fc": fc, "run": tmp / "run", "report": report, "html": report.read_text(encoding="utf-8")}


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)"', page)


@pytest.mark.slow
def test_report_has_every_section_and_no_network_or_script(probe_run):
    page = probe_run["html"]
    assert _section_ids(page) == ["mistakes", "heads", "confusion", "classes", "map", "data"]
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert page.count("<img") == len(srcs)  # every <img> is one we made (none from a class name)
    assert "Content-Security-Policy" in page


@pytest.mark.slow
def test_class_names_are_escaped(probe_run):
    page = probe_run["html"]
    assert XSS not in page
    assert html.escape(XSS) in page
    # the class shows up as text in the data set table, the confusion matrix and the per-class table
    assert page.count(html.escape(XSS)) >= 4


def test_failed_images_listed_with_reasons(probe_run):
    data = probe_run["html"].split('<section id="data">')[1].split("</section>")[0]
    assert "1 image(s) could not be read" in data
    assert "train/dogs/bad &lt;b&gt;.png" in data and "<b>.png" not in data
    reason = probe_run["fc"].failed[0][1]
    assert reason and html.escape(reason) in data


def test_predictions_match_the_metrics(probe_run):
    run = probe_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    best = max(metrics["heads"], key=lambda h: metrics["heads"][h]["accuracy"])
    preds = read_predictions(predictions_path(run, best))
    assert len(preds) == metrics["split"]["n_eval"]
    acc = np.mean([p.correct for p in preds])
    assert acc == pytest.approx(metrics["heads"][best]["accuracy"])
    classes = probe_run["fc"].classes
    cm = np.zeros((len(classes), len(classes)), int)
    for p in preds:
        cm[classes.index(p.true), classes.index(p.pred)] += 1
    assert cm.tolist() == metrics["heads"][best]["confusion_matrix"]
    assert all(p.confidence is not None and 0 < p.confidence <= 1 for p in preds)


@pytest.mark.slow
def test_mistakes_shown_worst_first_as_small_thumbnails(probe_run):
    run, page = probe_run["run"], probe_run["html"]
    metrics = json.loads((run / "metrics.json").read_text())
    best = max(metrics["heads"], key=lambda h: metrics["heads"][h]["accuracy"])
    wrong = worst_first(read_predictions(predictions_path(run, best)))
    assert wrong, "the fixture is meant to produce mistakes"
    mistakes = page.split('<section id="mistakes">')[1].split("</section>")[0]
    cards = re.findall(r'<figure class="thumb">.*?</figure>', mistakes)
    assert len(cards) == min(len(wrong), MAX_THUMBS)
    shown_paths = [html.unescape(re.search(r'<span class="path">(.*?)</span>', c).group(1)) for c in cards]
    assert shown_paths == [p.path for p in wrong[:MAX_THUMBS]]
    confs = [p.confidence for p in wrong]
    assert confs == sorted(confs, reverse=True)
    thumbs = sorted((run / "thumbs").glob("*.jpg"))
    assert len(thumbs) == len(cards)
    for t in thumbs:
        with Image.open(t) as im:
            assert im.format == "JPEG" and max(im.size) <= 96
    # made once: a second report does not rewrite them
    stamps = {t: t.stat().st_mtime_ns for t in thumbs}
    write_report(run)
    assert {t: t.stat().st_mtime_ns for t in thumbs} == stamps


@pytest.mark.slow
def test_no_thumbnail_from_outside_the_data_root(probe_run, tmp_path):
    root = probe_run["root"]
    secret = root.parent / "secret.png"
    Image.new("RGB", (20, 20), "red").save(secret)
    (root / "train" / "dogs" / "link.png").symlink_to(secret)
    try:
        assert inside_root(root, "../secret.png") is None
        assert inside_root(root, str(secret)) is None
        assert inside_root(root, "train/dogs/link.png") is None  # symlink leading out
        assert inside_root(root, "train/dogs/img_000.png") is not None
        assert make_thumbnail(root, "../secret.png", tmp_path / "t") is None
        assert not (tmp_path / "t").exists()
    finally:
        (root / "train" / "dogs" / "link.png").unlink()
    # A predictions file naming an outside path: the report shows a placeholder, not the file.
    run = tmp_path / "run"
    shutil.copytree(probe_run["run"], run)
    shutil.rmtree(run / "thumbs")
    for p in run.glob("predictions_*.csv"):
        rows = list(csv.DictReader(p.open()))
        rows[0]["path"], rows[0]["pred"] = "../secret.png", rows[0]["true"] if rows[0]["pred"] != rows[0]["true"] else "dogs"
        rows[0]["true"] = "owls" if rows[0]["pred"] != "owls" else "cats"
        rows[0]["confidence"] = "0.999999"
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    page = write_report(run).read_text()
    first = page.split('<section id="mistakes">')[1].split("</figure>")[0]
    assert "no thumbnail" in first and "../secret.png" in first


def test_report_without_the_cache_still_opens(probe_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(probe_run["run"], run)
    m = json.loads((run / "metrics.json").read_text())
    m["cache"]["path"] = str(tmp_path / "gone.h5")
    write_json(run / "metrics.json", m)
    page = write_report(run).read_text()
    assert "heads" in _section_ids(page) and "not available" in page


def test_newest_run_and_errors(probe_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(probe_run["run"], runs / "old")
    (runs / "empty").mkdir()
    assert find_run(runs) == runs / "old"
    with pytest.raises(FeatxError, match="no featx results"):
        write_report(runs / "empty")
    with pytest.raises(FeatxError, match="no run folder"):
        find_run(tmp_path / "nothing")


@pytest.mark.slow
def test_compare_and_fewshot_sections(probe_run, tmp_path):
    run = tmp_path / "cmp"
    shutil.copytree(probe_run["run"], run / "probe")
    rows = [{"method": "probe-logreg", "kind": "probe", "accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9,
             "wall_seconds": 12.0, "images_per_s": 30.0},
            {"method": "finetune-full", "kind": "finetune", "accuracy": 0.92, "balanced_accuracy": 0.91, "macro_f1": 0.9,
             "wall_seconds": 200.0, "images_per_s": 8.0}]
    cache = json.loads((run / "probe" / "metrics.json").read_text())["cache"]
    write_json(run / "compare.json", {"rows": rows, "split": {"n_eval": 398, "eval_split": "val"}, "cache": cache})
    write_json(run / "fewshot.json", {"rows": [{"head": "logreg", "shots": k, "mean": a, "ci95": [a - .05, a + .05]}
                                               for k, a in ((1, .5), (5, .7), (10, .8))]})
    page = write_report(run).read_text()
    assert _section_ids(page) == ["mistakes", "heads", "confusion", "classes", "compare", "fewshot", "map", "data"]
    # 0.92 on 398 images: Wilson 95% interval 88.9%-94.2% (366 of 398); the +2.0 pts are inside the probe's interval
    assert "88.9% – 94.2%" in page and "+2.0 pts" in page
    assert (run / "report_compare_ci.png").is_file() and (run / "report_fewshot.png").is_file()


def test_confusion_matrix_at_120_classes_is_colour_only():
    rng = np.random.default_rng(0)
    n = 120
    cm = rng.integers(0, 2, size=(n, n)) + np.diag(np.full(n, 20))
    cm[5, 7] = 9
    classes = [f"class_{i}" for i in range(n)]
    t = confusion_html(cm, classes)
    assert t.count("<td") == n * n and 'class="cm dense"' in t
    assert re.search(r"<td[^>]*>\d+</td>", t) is None  # no numbers in cells
    assert 'title="class_5 → class_7: 9 of' in t
    pairs = most_confused_pairs(cm, classes, k=3)
    assert pairs[0][:3] == ("class_5", "class_7", 9)
    small = confusion_html(np.array([[3, 1], [0, 4]]), ["a", "b"])
    assert ">3</td>" in small and ">1</td>" in small and "dense" not in small


# --------------------------------------------------------------------------- a real browser


def _browser() -> str | None:
    for name in (os.environ.get("FEATX_CHROMIUM"), "chromium-headless-shell", "chromium", "chromium-browser",
                 "google-chrome", "headless_shell"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


needs_browser = pytest.mark.skipif(
    _browser() is None, reason="no headless Chromium (apt-get install chromium-headless-shell, or set FEATX_CHROMIUM); "
    "the browser check of report.html is skipped")


def _with_script(page: str, script: str, path: Path) -> Path:
    """A copy of the report with a load-time check (the report itself has no script, and its CSP forbids one)."""
    path.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace("</body>", script + "</body>"))
    return path


_CHECK = ("<script>addEventListener('load',function(){var b=0,i=document.images;for(var k=0;k<i.length;k++)"
          "{if(!i[k].complete||!i[k].naturalWidth)b++;}document.body.setAttribute('data-images',i.length);"
          "document.body.setAttribute('data-broken',b);});</script>")


@needs_browser
@pytest.mark.slow
def test_report_renders_in_headless_chromium(probe_run, tmp_path):
    browser = _browser()
    page = probe_run["html"]
    n_img = page.count("<img")
    probe = _with_script(page, _CHECK, tmp_path / "check.html")  # every image loaded?
    dom = _chromium(browser, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images="(\d+)" data-broken="(\d+)"', dom.stdout)
    assert m, dom.stdout[:500]
    assert int(m.group(1)) == n_img and int(m.group(2)) == 0
    for width in (1280, 390):
        png = tmp_path / f"report-{width}.png"
        shot = _chromium(browser, f"--window-size={width},2400", f"--screenshot={png}", probe_run["report"].as_uri())
        assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
        with Image.open(png) as im:
            assert im.size[0] == width
            colours = im.convert("RGB").resize((200, 400)).getcolors(maxcolors=200 * 400)
            assert len(colours) > 50  # text, tables and images, not a blank page
        if os.environ.get("FEATX_KEEP_SCREENSHOTS"):
            shutil.copy(png, Path(os.environ["FEATX_KEEP_SCREENSHOTS"]) / png.name)


# At 390 px (a phone), every table either fits or scrolls inside its box with a visible sign that it does
# (scroll shadows drawn by the box's background, and a visible scrollbar); the page itself never scrolls
# sideways; and the confusion matrix fits, so its whole diagonal is on screen without scrolling.
_NARROW = ("<script>addEventListener('load',function(){var w=innerWidth,bad=[],cut=0,t=document.querySelectorAll('table');"
           "for(var k=0;k<t.length;k++){var b=t[k].parentElement,s=getComputedStyle(b);"
           "if(t[k].getBoundingClientRect().width>b.clientWidth+1){"
           "if(!/auto|scroll/.test(s.overflowX)||s.backgroundImage.indexOf('gradient')<0||b.getBoundingClientRect().right>w+1)"
           "bad.push(k);}}"
           "var d=document.querySelectorAll('table.cm td.diag');for(var k=0;k<d.length;k++){"
           "var r=d[k].getBoundingClientRect(),p=d[k].closest('.scroll').getBoundingClientRect();if(r.right>p.right+1||r.right>w+1)cut++;}"
           "document.body.setAttribute('data-tables',t.length);document.body.setAttribute('data-bad',bad.join(','));"
           "document.body.setAttribute('data-diag',d.length);document.body.setAttribute('data-cut',cut);"
           "document.body.setAttribute('data-page',document.documentElement.scrollWidth>w+1?'wide':'fits');});</script>")


@needs_browser
@pytest.mark.slow
def test_tables_at_390_px_scroll_visibly_and_the_confusion_matrix_fits(probe_run, tmp_path):
    browser = _browser()
    check = _with_script(probe_run["html"], _NARROW, tmp_path / "narrow.html")
    dom = _chromium(browser, "--window-size=390,2400", "--dump-dom", check.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-tables="(\d+)" data-bad="([\d,]*)" data-diag="(\d+)" data-cut="(\d+)" data-page="(\w+)"', dom.stdout)
    assert m, dom.stdout[:500]
    n_tables, bad, n_diag, cut, whole = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
    assert n_tables >= 4 and n_diag == 4
    assert bad == "", f"tables {bad} overflow at 390 px with no visible sign that they scroll"
    assert cut == 0, f"{cut} of {n_diag} diagonal cells of the confusion matrix are off-screen at 390 px"
    assert whole == "fits"
    png = tmp_path / "report-390.png"
    shot = _chromium(browser, "--window-size=390,2400", f"--screenshot={png}", probe_run["report"].as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    if os.environ.get("FEATX_KEEP_SCREENSHOTS"):
        shutil.copy(png, Path(os.environ["FEATX_KEEP_SCREENSHOTS"]) / png.name)
