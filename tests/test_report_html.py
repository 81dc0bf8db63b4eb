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
from featx.report.html import FIRST_THUMBS, MAX_THUMBS, section_mistakes, write_report
from featx.report.predictions import Prediction, predictions_path, read_predictions, worst_first
from featx.report.runfiles import find_run
from featx.report.tables import confusion_html, most_confused_pairs
from featx.report.thumbs import inside_root, make_thumbnail

from conftest import write_image_folder

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A probe on 4 classes, two of which share a colour (so there are mistakes), one named like an XSS, two with
    long names that must wrap only between their words (American_ / Shorthair, never American_Shorthai / r)."""
    tmp = tmp_path_factory.mktemp("rep")
    root = write_image_folder(tmp / "data", classes=(XSS, "dogs", "American_Shorthair", "Egyptian_Mau"), per_class=8, seed=3)
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
    assert _section_ids(page) == ["heads", "confusion", "mistakes", "classes", "map", "data"]  # summary first
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
    # the class shows up as text in the data set table, the confusion matrix and the per-class table (there as
    # words that wrap only between them: "<img ", "src=x ", "onerror=alert(1)>")
    assert page.count(html.escape(XSS)) >= 2
    assert page.count('<span class="w">onerror=alert(1)&gt;</span>') >= 3


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
        rows[0]["true"] = "American_Shorthair" if rows[0]["pred"] != "American_Shorthair" else "Egyptian_Mau"
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
    assert _section_ids(page) == ["heads", "confusion", "mistakes", "classes", "compare", "fewshot", "map", "data"]
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


def _pred(i: int, true: str = "American_Shorthair", pred: str = "Egyptian_Mau") -> Prediction:
    return Prediction(row=i, path=f"val/{true}/img_{i:03d}.png", split="val", true=true, pred=pred,
                      confidence=1 - i / 1000, p_true=i / 1000)


def test_at_most_24_mistake_cards_then_show_all_without_javascript(tmp_path):
    preds = [_pred(i) for i in range(60)] + [_pred(100 + i, "Bengal", "Bengal") for i in range(87)]
    page = section_mistakes(preds, "logreg", "", tmp_path / "thumbs")
    first, _, rest = page.partition('<details class="more">')
    assert first.count('<figure class="thumb">') == FIRST_THUMBS == 24
    assert rest.count('<figure class="thumb">') == 60 - 24 and "<summary>show all 60 mistake cards (36 more)</summary>" in rest
    assert "60 of 147 evaluation images are misclassified" in page and "<script" not in page
    few = section_mistakes(preds[:10], "logreg", "", tmp_path / "thumbs")
    assert few.count('<figure class="thumb">') == 10 and "<details" not in few
    # class names wrap only between words; the cards are at least as wide as the longest word needs
    assert '<span class="w">American_</span><wbr><span class="w">Shorthair</span>' in page


def _heads_with_views() -> dict:
    proxy = {"proxy": "ridge", "relative_alpha": 0.1}
    views = lambda chosen_params: [  # noqa: E731 - three plain candidates, two scored by the proxy only
        {"view": "final", "norm": "none", "train_views": 0, "cv_score": 0.88, "cv_std_err": 0.004, "params": proxy},
        {"view": "multi2", "norm": "none", "train_views": 0, "cv_score": 0.89, "cv_std_err": 0.005, "params": proxy},
        {"view": "multi3", "norm": "none", "train_views": 0, "cv_score": 0.91, "cv_std_err": 0.003,
         "params": chosen_params}]
    return {name: {"view": "multi3", "norm": "none", "accuracy": 0.9, "cv_score": 0.91, "params": {"C": 1.0},
                   "views": views({"C": 1.0})} for name in ("logreg", "svm", "knn")}


def test_feature_views_tried_counts_real_fits_only():
    from featx.report.html import section_heads

    page = section_heads({"heads": _heads_with_views(), "split": {"n_train": 10, "n_eval": 5}, "cv": {"used": 5}}, "logreg")
    assert "Feature views tried (9 candidates: 3 fits of the heads, 6 proxy scores)" in page
    assert "(9 fits)" not in page and page.count(">proxy score<") == 6 and page.count(">head&#x27;s search<") == 3
    assert "standard error of the paired fold differences between the best and the simplest candidate" in page


@pytest.mark.slow
def test_compare_words_say_what_the_fine_tune_trained(tmp_path):
    """A head-only fine-tune is never called "end to end": the chart legend, compare.md and the report say what
    trained, with its parameter count."""
    from featx.report.compare_table import finetune_label, markdown_table
    from featx.report.html import section_compare

    row = {"method": "finetune-head", "kind": "finetune", "strategy": "head", "accuracy": 0.6, "balanced_accuracy": 0.6,
           "macro_f1": 0.6, "wall_seconds": 240.0, "images_per_s": 4.9, "trainable_params": 15372,
           "total_params": 3_390_000}
    probe = {"method": "probe-logreg", "kind": "probe", "accuracy": 0.75, "balanced_accuracy": 0.75, "macro_f1": 0.75,
             "wall_seconds": 60.0, "images_per_s": 11.7}
    label = finetune_label([probe, row])
    assert "end to end" not in label and "new linear layer only, network frozen" in label
    assert finetune_label([dict(row, strategy="full")]).startswith("fine-tune, end to end")
    md = markdown_table([probe, row])
    assert "finetune-head: head only: a new linear layer on the frozen network's features" in md
    assert "15,372 of 3.39 M parameters trained" in md and "end to end" not in md
    page = section_compare({"rows": [probe, row], "split": {"n_eval": 300, "eval_split": "val"}}, tmp_path)
    assert "15,372 of 3.39 M parameters trained" in page and "end to end" not in page


def test_map_caption_says_which_features_it_shows(probe_run):
    page = probe_run["html"]
    cap = page.split('<section id="map">')[1].split("</section>")[0]
    assert "whatever view the heads chose" not in cap
    assert "final pooled features" in cap
    heads = json.loads((probe_run["run"] / "metrics.json").read_text())["heads"]
    if any(h.get("view", "final") != "final" for h in heads.values()):
        for name, h in heads.items():
            assert f"{name} on {h['view']}" in cap
    else:
        assert "The heads were trained on these same features." in cap


def test_map_legend_text_is_readable_on_a_phone(tmp_path):
    """Legend text in px where the page shows the map: its natural size on a laptop, 352 px wide on a 390 px phone."""
    from featx.report.plots.embedmap import LEGEND_PT, plot_map

    rng = np.random.default_rng(0)
    classes = ["American_Shorthair", "Egyptian_Mau", "Bengal", "Maine_Coon", "Siamese"]
    labels = np.repeat(np.arange(5), 20)
    coords = {"rows": np.arange(100), "xy": rng.normal(size=(100, 2)).astype(np.float32), "method": "pca"}
    png = plot_map(coords, labels, classes, tmp_path / "map.png", eval_rows=range(0, 100, 5), wrong_rows=[3, 7])
    with Image.open(png) as im:
        width = im.size[0]
    px = LEGEND_PT * 100 / 72  # the map is drawn at 100 dpi
    assert px >= 16 and width <= 1000  # about 18 px at the natural size (was 8 pt beside a 800 px map: ~7 px shown)
    assert px * min(1.0, 352 / width) >= 8.5  # still ~9-10 px on a phone


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


# At 390 px (a phone) and 1280 px: every table but the confusion matrix fits its box (the heads table, the
# compare table and the most-confused pairs become cards, per-class rows a name above its numbers); the matrix
# fits or scrolls inside its box with a visible sign (scroll shadows drawn by the box's background); every CV score
# and chosen hyperparameter of the heads table is on screen; no class-name word (span.w) is broken across lines or
# sticks out of its card; the page itself never scrolls sideways; the matrix's whole diagonal is on screen.
_LAYOUT = ("<script>addEventListener('load',function(){var w=innerWidth,wide=[],bad=[],cut=0,hid=0,broken=[],out=0,"
           "t=document.querySelectorAll('table');"
           "for(var k=0;k<t.length;k++){var b=t[k].parentElement,s=getComputedStyle(b);"
           "if(t[k].getBoundingClientRect().width>b.clientWidth+1){if(!t[k].classList.contains('cm'))wide.push(k);"
           "else if(!/auto|scroll/.test(s.overflowX)||s.backgroundImage.indexOf('gradient')<0||b.getBoundingClientRect().right>w+1)"
           "bad.push(k);}}"
           "var d=document.querySelectorAll('table.cm td.diag');for(var k=0;k<d.length;k++){"
           "var r=d[k].getBoundingClientRect(),p=d[k].closest('.scroll').getBoundingClientRect();if(r.right>p.right+1||r.right>w+1)cut++;}"
           "var h=document.querySelectorAll('#heads table.heads td[data-label=\"CV score\"],"
           "#heads table.heads td[data-label=\"chosen hyperparameters\"]');"
           "for(var k=0;k<h.length;k++){var r=h[k].getBoundingClientRect();if(!r.width||r.right>w+1||r.left<0)hid++;}"
           "var s=document.querySelectorAll('span.w');for(var k=0;k<s.length;k++){var n=s[k].getClientRects().length;"
           "if(n>1)broken.push(s[k].textContent);var c=s[k].closest('figure,td,th');"
           "if(n&&c&&!c.closest('table.cm')&&s[k].getBoundingClientRect().right>c.getBoundingClientRect().right+1)out++;}"
           "var a=document.body;a.setAttribute('data-tables',t.length);a.setAttribute('data-wide',wide.join(','));"
           "a.setAttribute('data-bad',bad.join(','));a.setAttribute('data-diag',d.length);a.setAttribute('data-cut',cut);"
           "a.setAttribute('data-heads',h.length);a.setAttribute('data-hidden',hid);a.setAttribute('data-words',s.length);"
           "a.setAttribute('data-broken',broken.join('|'));a.setAttribute('data-out',out);"
           "a.setAttribute('data-page',document.documentElement.scrollWidth>w+1?'wide':'fits');});</script>")


@needs_browser
@pytest.mark.parametrize("width", [390, 1280])
def test_layout_at_phone_and_laptop_width(probe_run, tmp_path, width):
    browser = _browser()
    check = _with_script(probe_run["html"], _LAYOUT, tmp_path / "layout.html")
    dom = _chromium(browser, f"--window-size={width},2400", "--dump-dom", check.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    got = dict(re.findall(r'data-(tables|wide|bad|diag|cut|heads|hidden|words|broken|out|page)="([^"]*)"', dom.stdout))
    assert len(got) == 11, dom.stdout[:500]
    n_heads = len(json.loads((probe_run["run"] / "metrics.json").read_text())["heads"])
    assert int(got["tables"]) >= 4 and int(got["diag"]) == 4
    assert got["wide"] == "", f"tables {got['wide']} are wider than their box at {width} px"
    assert got["bad"] == "", f"the confusion matrix overflows at {width} px with no visible sign that it scrolls"
    assert int(got["cut"]) == 0, f"{got['cut']} diagonal cells of the confusion matrix are off-screen at {width} px"
    if width < 600:  # the heads table as cards: every head's CV score and hyperparameters on screen
        assert int(got["heads"]) == 2 * n_heads and int(got["hidden"]) == 0
    assert int(got["words"]) > 20
    assert got["broken"] == "", f"class names broken inside a word at {width} px: {html.unescape(got['broken'])}"
    assert int(got["out"]) == 0, f"{got['out']} class-name words stick out of their card at {width} px"
    assert got["page"] == "fits"
    png = tmp_path / f"report-{width}.png"
    shot = _chromium(browser, f"--window-size={width},2400", f"--screenshot={png}", probe_run["report"].as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    if os.environ.get("FEATX_KEEP_SCREENSHOTS"):
        shutil.copy(png, Path(os.environ["FEATX_KEEP_SCREENSHOTS"]) / f"layout-{png.name}")
