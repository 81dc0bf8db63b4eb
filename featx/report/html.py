"""``report.html``: one self-contained page a person opens to see where the model is wrong.

Why: metrics.json is for machines; a reader first wants the mistakes (which images, confused
with what), after the summary that says how good the model is.  :func:`write_report` builds the page
from a run folder's JSON and the cache: the heads table, the confusion matrix (colour only past 20
classes) and the most confused pairs, the misclassified evaluation images as thumbnails (the
first 24, the rest behind a "show all" ``<details>``), per-class precision/recall worst first, a 2-D
map of the embeddings, and — when the run has them — the fine-tune vs probe chart with 95 % intervals
and the few-shot curve, then the data set.  It reads on a phone: wide tables become cards below
600 px, and a class name wraps only between its words (:func:`featx.report.tables.words`).  Inline
CSS, images as ``data:`` URIs, no JavaScript and no network; every text from the file system is
escaped (:mod:`featx.report.tables`).
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..base.errors import FeatxError
from ..base.io import atomic_write_bytes
from ..base.version import __version__
from ..cache.identity import CacheIdentity
from ..cache.store import FeatureCache
from ..cache.trust.roots import trusted_root
from .audit import CSS as AUDIT_CSS
from .audit import section_audit
from .compare_table import features_note, strategy_note
from .metrics import is_chosen, selection_note
from .plots import charts, embedmap
from .predictions import Prediction, predictions_path, read_predictions, worst_first
from .recompute import recompute_predictions
from .runfiles import RunFiles, load_run, open_cache
from .tables import (
    Markup,
    bar,
    confusion_html,
    esc,
    fmt,
    join,
    most_confused_pairs,
    name_words,
    pct,
    per_class_rows,
    table,
    tag,
    words,
)
from .thumbs import data_uri, make_thumbnail

log = logging.getLogger(__name__)

MAX_THUMBS = 240  # mistake cards in all (the most confidently wrong); each thumbnail is ~3 kB
FIRST_THUMBS = 24  # shown at once; the rest behind a "show all" <details> that needs no JavaScript
MAX_FAILED_LISTED = 200
REPORT_NAME = "report.html"

CSS = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:16px}h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:2px solid #dde3ea;padding-bottom:.2em}
section{background:#fff;border:1px solid #e3e7ec;border-radius:8px;padding:4px 16px 16px;margin:14px 0}
.meta{color:#556;font-size:.9em}.note{color:#556;font-size:.9em}.warn{color:#8a4b00}
nav a{margin-right:.8em;white-space:nowrap}code,.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.86em;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%;background:linear-gradient(to right,#fff 30%,rgba(255,255,255,0)) left/32px 100% no-repeat local,linear-gradient(to left,#fff 30%,rgba(255,255,255,0)) right/32px 100% no-repeat local,radial-gradient(farthest-side at 0 50%,rgba(0,0,0,.22),transparent) left/12px 100% no-repeat scroll,radial-gradient(farthest-side at 100% 50%,rgba(0,0,0,.22),transparent) right/12px 100% no-repeat scroll}
.scroll::-webkit-scrollbar{height:8px}.scroll::-webkit-scrollbar-thumb{background:#c3cad4;border-radius:4px}.scroll{scrollbar-width:thin;scrollbar-color:#c3cad4 transparent}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
th,td{padding:3px 8px;border-bottom:1px solid #e6e9ee;text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}td.n{white-space:nowrap}
.bar{display:inline-block;height:9px;background:#4a7fd4;border-radius:2px;vertical-align:middle}
img.fig{max-width:100%;height:auto;display:block;margin:.4em 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));gap:10px}
figure.thumb{margin:0;background:#fafbfc;border:1px solid #e3e7ec;border-radius:6px;padding:6px;font-size:.8em}figure.thumb b{display:inline-block}.w{white-space:nowrap}
details.more{margin-top:10px}details.more>summary{cursor:pointer;font-weight:600;padding:6px 0}details.more .grid{margin-top:6px}
figure.thumb img{display:block;margin:0 auto 4px;max-width:100%;height:auto}figure.thumb .none{height:72px;display:flex;align-items:center;justify-content:center;color:#889;background:#eef0f3}
.t{color:#1b7a3a}.p{color:#b3261e}
table.cm td{text-align:center;min-width:2.2em;border:1px solid #fff}table.cm th.row{white-space:nowrap;font-weight:normal}
table.cm th.col{vertical-align:bottom;padding:2px}table.cm th.col span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:normal}
table.cm.dense td{min-width:0;width:9px;height:9px;padding:0;font-size:0;border:0}table.cm.dense th{font-size:8px;line-height:9px;padding:0 3px 0 0}table.cm.dense th.col{padding:0 0 3px;width:9px;max-width:9px}
td.q0{background:#fff}td.q1{background:#eef4fb}td.q2{background:#d9e7f6}td.q3{background:#bcd5ee}td.q4{background:#98bde3}
td.q5{background:#6fa2d6;color:#fff}td.q6{background:#4b86c6;color:#fff}td.q7{background:#2f69b0;color:#fff}td.q8{background:#1d4f92;color:#fff}td.q9{background:#0f3470;color:#fff}
table.cm td.diag{outline:1px solid #1b7a3a;outline-offset:-1px}
@media (max-width:600px){main{padding:8px}section{padding:2px 10px 10px}body{font-size:14px}.grid{grid-template-columns:repeat(auto-fill,minmax(110px,1fr))}
th,td{padding:3px 5px}table.cm{font-size:.8em}table.cm th.row{white-space:normal;max-width:7em}table.cm td{min-width:1.6em;padding:2px 1px}table.cm th.corner{font-size:.85em;max-width:5em}
.bar{display:none}table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;width:100%}table.cards thead{display:none}
table.cards tr{border:1px solid #e3e7ec;border-radius:6px;margin:0 0 8px;padding:4px 8px}
table.cards td{display:grid;grid-template-columns:minmax(7.5em,40%) 1fr;gap:8px;border:0;padding:2px 0;text-align:left;white-space:normal;overflow-wrap:break-word}
table.cards td::before{content:attr(data-label);color:#556}table.cards td:first-child{font-weight:600}
table.compact tr{display:flex;flex-wrap:wrap;column-gap:12px}
table.compact td{display:block;width:auto;flex:1 0 auto;min-width:4.6em}table.compact td::before{display:block;font-size:.8em}table.compact td:first-child{flex-basis:100%}
table.compact td:first-child::before{display:inline;margin-right:.5em}}
"""


def _best_head(metrics: dict | None) -> str | None:
    heads = (metrics or {}).get("heads") or {}
    if not heads:
        return None
    acc = lambda n: heads[n].get("accuracy") if isinstance(heads[n].get("accuracy"), (int, float)) else -1.0  # noqa: E731
    return max(heads, key=lambda n: (acc(n), -list(heads).index(n)))


def _img(path: Path, alt: str) -> Markup:
    return Markup(f'<img class="fig" src="{data_uri(path)}" alt="{esc(alt)}">')


def _section(sid: str, title: str, body: Any) -> Markup:
    return Markup(f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{esc(body)}</section>')


def _p(text: Any, cls: str = "note") -> Markup:
    return tag("p", text, class_=cls)


# --------------------------------------------------------------------------- sections


def section_dataset(run: RunFiles, fc: FeatureCache | None) -> Markup:
    info = run.cache_info
    classes = list(fc.classes if fc is not None else info.get("classes") or [])
    splits = dict(info.get("splits") or (fc.summary()["splits"] if fc is not None else {}))
    parts = [_p(Markup(f"Data set root <span class=\"path\">{esc(info.get('root') or (fc.root if fc else '?'))}</span>; "
                       f"backbone <b>{esc(info.get('backbone'))}</b>, {esc(info.get('dim'))}-dim features, "
                       f"{len(classes)} classes, " + esc(", ".join(f"{k} {v}" for k, v in splits.items()) or "no rows")
                       + " images."), "")]
    if fc is not None and classes:
        names = [s for s in fc.splits]
        counts = {s: np.bincount(fc.labels(s), minlength=len(classes)) for s in names}
        rows = [[c] + [int(counts[s][i]) for s in names] for i, c in enumerate(classes)]
        t = table(["class"] + names, rows, num=range(1, len(names) + 1))
        parts.append(Markup(f"<details{' open' if len(classes) <= 20 else ''}><summary>images per class and split</summary>{t}</details>"))
    elif classes:
        parts.append(_p("classes: " + ", ".join(classes)))
    if fc is None:
        parts.append(_p(f"The cache ({info.get('path')}) is not available here: failed images cannot be listed.", "warn"))
    else:
        failed = fc.failed
        if failed:
            rows = [[Markup(f'<span class="path">{esc(k)}</span>'), r] for k, r in failed[:MAX_FAILED_LISTED]]
            more = f" (first {MAX_FAILED_LISTED} listed)" if len(failed) > MAX_FAILED_LISTED else ""
            parts.append(Markup(f"<details><summary>{len(failed)} image(s) could not be read and were left out{esc(more)}</summary>"
                                f"{table(['image', 'reason'], rows)}</details>"))
        else:
            parts.append(_p("Every image was read."))
    return _section("data", "Data set", join(parts))


def section_heads(metrics: dict, best: str | None) -> Markup:
    heads = metrics.get("heads") or {}
    with_view = any(h.get("view") for h in heads.values())
    top5 = any("top5_accuracy" in h for h in heads.values())
    cols = ["head"] + (["view"] if with_view else []) + ["accuracy", "95% CI", "balanced acc.", "macro-F1"] + \
        (["top-5"] if top5 else []) + ["CV score", "chosen hyperparameters", "fit s"]
    rows = []
    for name, h in heads.items():
        ci = h.get("accuracy_ci95") or [None, None]
        ci_s = f"{pct(ci[0])} – {pct(ci[1])}" if None not in ci else "–"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (h.get("params") or {}).items())
        view = (h.get("view") or "–") + (f" + {h['train_views']} aug., {h.get('norm')}" if h.get("train_views") else
                                        (f", {h['norm']}" if h.get("norm") not in (None, "none") else ""))
        r = [name + (" (best)" if name == best else "")] + ([view] if with_view else [])
        r += [pct(h.get("accuracy")), ci_s, pct(h.get("balanced_accuracy")), pct(h.get("macro_f1"))]
        r += ([pct(h.get("top5_accuracy"))] if top5 else []) + [pct(h.get("cv_score")), params, fmt(h.get("fit_seconds"), 2)]
        rows.append(r)
    num = [i for i, c in enumerate(cols) if c not in ("head", "view", "chosen hyperparameters")]
    split, cv = metrics.get("split") or {}, metrics.get("cv") or {}
    ctx = (f"Trained on {split.get('n_train')} images ({selection_note(heads, cv)}), evaluated on "
           f"{split.get('n_eval')} images of {split.get('eval_split')}.")
    if split.get("kind") == "holdout":
        ctx += f" Stratified hold-out: test_size={split.get('test_size')}, seed={split.get('seed')}."
    n = split.get("n_eval")
    if isinstance(n, int) and n > 0:
        half = 100 * 1.96 * math.sqrt(0.25 / n)
        ctx += f" With {n} images a 95% interval is up to ±{half:.1f} points wide."
    return _section("heads", "Heads", join([table(cols, rows, num=num, class_="heads", cards=True), _p(ctx), _view_table(heads)]))


def _view_table(heads: dict) -> Markup:
    """Every (view, normalisation, augmented views) each head tried, with its CV score on the training rows.

    The summary counts what ran: candidates scored by the cheap proxy of repeated paired CV (their
    params name the ``proxy``) are not fits of the head; only the head's own searches are."""
    rows, fits, proxies = [], 0, 0
    for name, h in heads.items():
        for c in h.get("views") or []:
            proxy = "proxy" in (c.get("params") or {})
            fits, proxies = fits + (not proxy), proxies + proxy
            rows.append([name, c["view"], c["norm"], c.get("train_views", 0), pct(c.get("cv_score")),
                         pct(c.get("cv_std_err")), "proxy score" if proxy else "head's search",
                         "chosen" if is_chosen(c, h) else ""])
    if len(rows) <= len(heads):
        return join([])
    what = f"{fits} fit{'s' if fits != 1 else ''} of the heads" + (f", {proxies} proxy score{'s' if proxies != 1 else ''}"
                                                                     if proxies else "")
    note = _p(choice_rule(proxies > 0))
    cols = ["head", "view", "norm", "aug. views", "CV score", "± s.e.", "scored by", ""]
    return Markup(f"<details><summary>Feature views tried ({len(rows)} candidates: {what})</summary>"
                  f"{table(cols, rows, num=[3, 4, 5], cards=True)}{note}</details>")


def choice_rule(repeated: bool) -> str:
    """The rule the heads' view choice followed, in the words of featx.heads.tuning (selection.py, repeated_cv.py)."""
    if repeated:
        return ("Plain candidates are scored by a cheap proxy of the head on the same repeated, paired CV folds of the "
                "training rows; the head uses the first (simplest) one whose mean is within s.e. of the best, where s.e. "
                "is the standard error of the paired fold differences between the best and the simplest candidate (the "
                "best row's ± s.e.; other rows show theirs against the simplest). Only that one gets the head's own "
                "search; augmented views, if any, are then searched on it and kept unless its search is within one "
                "standard error of theirs. The evaluation split plays no part in the choice.")
    return ("CV score of every candidate's own search on the training rows; each head uses the first (simplest) one "
            "whose mean is within one standard error (of the best candidate's fold scores) of the best. The "
            "evaluation split plays no part in the choice.")


def section_confusion(metrics: dict, head: str, classes: list[str], preds: list[Prediction] | None) -> Markup:
    entry = metrics["heads"][head]
    cm = entry.get("confusion_matrix")
    if cm is None and preds is not None:  # not kept in metrics.json past 50 classes: rebuild from predictions
        idx = {c: i for i, c in enumerate(classes)}
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for p in preds:
            if p.true in idx and p.pred in idx:  # a class renamed since the run is left out
                cm[idx[p.true], idx[p.pred]] += 1
    if cm is None:
        return _section("confusion", f"Confusion matrix ({head})", _p("Not saved for this run and no predictions to rebuild it."))
    cm = np.asarray(cm)
    pairs = most_confused_pairs(cm, classes, k=15)
    note = ("Rows: true class (number of evaluation images); columns: predicted class; colour: share of the true class"
            + ("; hover a cell for its count." if len(classes) > 20 else "."))
    parts = [_p(note), confusion_html(cm, classes)]
    if pairs:
        parts.append(tag("h3", "Most confused pairs"))
        parts.append(table(["true class", "predicted as", "images", "share of true class"],
                           [[words(t), words(p_), c, pct(s)] for t, p_, c, s in pairs], num=(2, 3), compact=True))
    else:
        parts.append(_p("No confusions: every evaluation image is classified correctly."))
    return _section("confusion", f"Confusion matrix ({head})", join(parts))


def section_per_class(metrics: dict, head: str) -> Markup:
    rows = per_class_rows(metrics["heads"][head].get("per_class") or {})
    body = [[words(c), Markup(f"{esc(pct(p))} {bar(p)}"), Markup(f"{esc(pct(r))} {bar(r)}"), pct(f), s] for c, p, r, f, s in rows]
    return _section("classes", f"Per-class precision and recall ({head}, worst first)",
                    table(["class", "precision", "recall", "F1", "images"], body, num=(3, 4), compact=True))


def section_mistakes(preds: list[Prediction] | None, head: str, root: str, thumbs_dir: Path, why: str = "") -> Markup:
    title = f"Misclassified evaluation images ({head})"
    if preds is None:
        return _section("mistakes", title, _p(why or "No per-image predictions for this run.", "warn"))
    wrong = worst_first(preds)
    if not wrong:
        return _section("mistakes", title, _p(f"None: all {len(preds)} evaluation images are classified correctly."))
    shown = wrong[:MAX_THUMBS]
    cards = [_mistake_card(p, root, thumbs_dir) for p in shown]
    note = (f"{len(wrong)} of {len(preds)} evaluation images are misclassified"
            + (f"; the {len(shown)} most confidently wrong have a card" if len(wrong) > len(shown) else "")
            + f". Most confident mistakes first; the percentage is {head}'s probability for the predicted class"
            + f" ({head} is the head with the best accuracy).")
    longest = max((len(w) for p in shown for name in (p.true, p.pred) for w in name_words(name)), default=0)
    style = f' style="grid-template-columns:repeat(auto-fill,minmax(min(100%,{max(132, 7 * longest + 20)}px),1fr))"'
    grid = lambda part: f'<div class="grid"{style}>{"".join(part)}</div>'  # noqa: E731
    parts = [_p(note), Markup(grid(cards[:FIRST_THUMBS]))]
    if len(cards) > FIRST_THUMBS:
        parts.append(Markup(f'<details class="more"><summary>show all {len(cards)} mistake cards '
                            f'({len(cards) - FIRST_THUMBS} more)</summary>{grid(cards[FIRST_THUMBS:])}</details>'))
    return _section("mistakes", title, join(parts))


def _mistake_card(p: Prediction, root: str, thumbs_dir: Path) -> str:
    """One misclassified image: its thumbnail, true and predicted class (wrapping only between words), its path."""
    th = make_thumbnail(root, p.path, thumbs_dir) if root else None
    if th is not None:
        with Image.open(th) as im:
            w, h = im.size
        pic = f'<img src="{data_uri(th, "image/jpeg")}" width="{w}" height="{h}" alt="{esc(p.path)}">'
    else:
        pic = '<div class="none">no thumbnail</div>'
    conf = f" ({pct(p.confidence, 0)})" if p.confidence is not None else ""
    return (f'<figure class="thumb">{pic}<figcaption>true <b class="t">{words(p.true)}</b><br>'
            f'predicted <b class="p">{words(p.pred)}</b>{esc(conf)}<br><span class="path">{esc(p.path)}</span>'
            f'</figcaption></figure>')


def section_map(fc: FeatureCache | None, preds: list[Prediction] | None, run_dir: Path, metrics: dict | None = None) -> Markup:
    if fc is None:
        return _section("map", "Embedding map", _p("The cache is not available here.", "warn"))
    if len(fc) < 3:
        return _section("map", "Embedding map", _p("Too few images for a map."))
    eval_rows = [p.row for p in preds] if preds else []
    wrong = [p.row for p in preds if not p.correct] if preds else []
    coords = embedmap.map_coordinates(fc, run_dir, keep=wrong)
    if coords["method"] == "degenerate":
        return _section("map", "Embedding map", _p("No map: the images' features (nearly) all coincide, so there is "
                                                   "nothing to place. A constant or broken cache? `featx verify` checks it.",
                                                   "warn"))
    method = {"pca+tsne": "PCA to 50 dimensions, then t-SNE", "pca+umap": "PCA, then UMAP", "pca": "PCA"}[coords["method"]]
    png = embedmap.plot_map(coords, fc.labels(), fc.classes, run_dir / "report_map.png", eval_rows=eval_rows,
                            wrong_rows=wrong, title=f"{len(coords['rows'])} of {len(fc)} images, {method}")
    note = (f"Each point is one image, placed by {method} of its final pooled features (the view final; "
            "distances between far-apart clusters mean little). " + _heads_views(metrics)
            + "Small points: training images; ringed points: evaluation images; crosses: misclassified"
            + (f" by {_best_head(metrics)}." if wrong else "."))
    if len(fc.classes) > 20:
        note += " With more than 20 classes the colours are not listed."
    return _section("map", "Embedding map", join([_p(note), _img(png, "2-D map of the embeddings")]))


def _heads_views(metrics: dict | None) -> str:
    """Which features the heads were trained on, when any differs from the map's ``final`` view."""
    used = {n: (h.get("view") or "final") + (f" + {h['train_views']} aug." if h.get("train_views") else "")
            for n, h in ((metrics or {}).get("heads") or {}).items()}
    if not used or set(used.values()) == {"final"}:
        return "The heads were trained on these same features. " if used else ""
    return ("The heads were trained on other views: " + ", ".join(f"{n} on {v}" for n, v in used.items())
            + "; the map shows the final features whatever view a head used. ")


def section_compare(compare: dict, run_dir: Path) -> Markup:
    n_eval = (compare.get("split") or {}).get("n_eval")
    rows = charts.compare_intervals(compare.get("rows") or [], n_eval)
    if not rows:
        return _section("compare", "Fine-tune vs probe", _p("compare.json has no rows with an accuracy."))
    png = charts.plot_compare_ci(rows, run_dir / "report_compare_ci.png",
                                 title=f"{n_eval} evaluation images ({(compare.get('split') or {}).get('eval_split')})")
    probes = [r["accuracy"] for r in rows if r.get("kind") == "probe"]
    best_probe = max(probes) if probes else None
    body = []
    for r in rows:
        ci = r.get("ci95") or [None, None]
        delta = "" if best_probe is None else f"{100 * (r['accuracy'] - best_probe):+.1f} pts"
        wall = r.get("wall_seconds")
        ips = r.get("images_per_s")
        body.append([r.get("method"), pct(r["accuracy"]), f"{pct(ci[0])} – {pct(ci[1])}" if None not in ci else "–", delta,
                     pct(r.get("balanced_accuracy")), pct(r.get("macro_f1")), "–" if wall is None else f"{wall:.1f} s",
                     "–" if ips is None else f"{ips:.1f}"])
    t = table(["method", "accuracy", "95% CI", "vs best probe", "balanced acc.", "macro-F1", "wall time", "images/s"], body,
              num=range(1, 8), cards=True)
    parts = [_p("Accuracy on the same evaluation images; whiskers are 95% Wilson intervals: overlapping whiskers mean "
                "the difference may be chance."), _img(png, "accuracy with 95% intervals per method"), t]
    for note in (strategy_note(rows), features_note(rows)):  # what each fine-tune trained, and on which features
        if note:
            parts.append(_p(note))
    if (run_dir / "compare.png").is_file():
        parts += [tag("h3", "Accuracy against wall time"), _img(run_dir / "compare.png", "accuracy against wall time")]
    notes = compare.get("notes") or {}
    if notes.get("wall_seconds"):
        parts.append(_p(f"Wall time: {notes['wall_seconds']}."))
    return _section("compare", "Fine-tune vs probe", join(parts))


def section_fewshot(fewshot: dict, run_dir: Path, source: Path | None = None) -> Markup:
    """The few-shot curve; ``source``: the few-shot run it comes from, when not ``run_dir`` itself."""
    series = charts.fewshot_series(fewshot)
    if not series:
        pngs = sorted((source or run_dir).glob("fewshot*.png"))
        body = [_img(p, "few-shot curve") for p in pngs] or [_p("fewshot.json holds no curve this featx can read.", "warn")]
        return _section("fewshot", "Few-shot curve", join(body))
    png = charts.plot_fewshot(series, run_dir / "report_fewshot.png", title="accuracy against training images per class")
    rows = [[h, k, pct(m), "–" if lo is None else f"{pct(lo)} – {pct(hi)}"] for h, pts in series.items() for k, m, lo, hi in pts]
    seeds = fewshot.get("seeds") or (fewshot.get("settings") or {}).get("seeds")
    note = "Mean over seeds" + (f" ({seeds})" if seeds else "") + "; band and interval: 95% CI."
    if source is not None and source != run_dir:
        ident = CacheIdentity.from_record(fewshot)
        cache = Path(str((fewshot.get("source") or {}).get("path") or "?")).name
        note += (f" From the few-shot run {source.name} on cache {cache}: the same data (data "
                 f"{ident.data[:12] if ident else '?'}, as in the header) and embedding settings as this run.")
    return _section("fewshot", "Few-shot curve", join([_p(note), _img(png, "few-shot curve"),
                                                       table(["head", "shots per class", "accuracy", "95% CI"], rows, num=(1, 2, 3))]))


# --------------------------------------------------------------------------- assembly


def _predictions(run: RunFiles, head: str, fc: FeatureCache | None) -> tuple[list[Prediction] | None, str]:
    """The head's saved predictions, else recomputed from the saved head + cache; (None, why) when neither works."""
    path = predictions_path(run.probe_dir, head)
    if path.is_file():
        try:
            return read_predictions(path), ""
        except (OSError, ValueError, KeyError) as exc:
            log.warning("report: %s is unreadable (%s); recomputing", path, exc)
    if fc is None:
        return None, "No saved predictions, and the cache is not available to recompute them."
    try:
        return recompute_predictions(run.metrics, head, run_dir=run.probe_dir, cache=fc), ""
    except FeatxError as exc:
        log.warning("report: no per-image predictions for %s (%s)", head, exc)
        return None, str(exc)


def _identity_text(src: dict, info: dict) -> Markup:
    """The run's data identity and embedding settings, as recorded (older runs: the settings only)."""
    ident = CacheIdentity.from_record(src) or CacheIdentity.from_record({"identity": info.get("identity")})
    if ident is None:
        return Markup(f"embedding settings <code>{esc(str(info.get('fingerprint') or '')[:12])}</code> "
                      "(no data identity: written by an older featx)")
    return Markup(f"data <code>{esc(ident.data[:12])}</code> · embedding settings "
                  f"<code>{esc(ident.embedding_settings[:12])}</code>")


def _header(run: RunFiles, sections: list[tuple[str, str]]) -> Markup:
    info = run.cache_info
    src = run.metrics or run.compare or run.fewshot or run.audit or {}
    dataset = Path(str(info.get("root") or "")).name or run.run_dir.name
    nav = join((Markup(f'<a href="#{esc(sid)}">{esc(title)}</a>') for sid, title in sections), " ")
    meta = (f"run <span class=\"path\">{esc(run.run_dir)}</span> · created {esc(src.get('created', '?'))} · "
            f"cache <span class=\"path\">{esc(Path(str(info.get('path') or '?')).name)}</span> · "
            f"backbone {esc(info.get('backbone'))} · {_identity_text(src, info)}"
            f" · featx {esc(src.get('featx_version') or __version__)}")
    return Markup(f"<header><h1>featx report: {esc(dataset)}</h1><p class=\"meta\">{meta}</p><nav>{nav}</nav></header>")


def build_sections(run: RunFiles, fc: FeatureCache | None) -> list[Markup]:
    """Every section this run has data for, in reading order: the summary (heads, confusion), then the mistakes."""
    out: list[Markup] = []
    metrics = run.metrics
    best = _best_head(metrics)
    preds = None
    if best is not None:
        classes = list(fc.classes if fc is not None else run.cache_info.get("classes") or [])
        preds, why = _predictions(run, best, fc)
        root = trusted_root(fc.meta, what=f"report of {run.run_dir}") if fc is not None else ""
        out.append(section_heads(metrics, best))
        out.append(section_confusion(metrics, best, classes, preds))
        out.append(section_mistakes(preds, best, root, run.run_dir / "thumbs", why))
        out.append(section_per_class(metrics, best))
    if run.audit:  # thumbnails only under a root this user gave on this machine (signed), never a file's claim
        aroot = (root if best is not None else trusted_root(fc.meta, what=f"report of {run.run_dir}")) if fc is not None else ""
        out.insert(2 if best is not None else 0, section_audit(run.run_dir, run.audit, aroot))
    if run.compare:
        out.append(section_compare(run.compare, run.run_dir))
    if run.fewshot:
        out.append(section_fewshot(run.fewshot, run.run_dir, run.fewshot_dir))
    if metrics is not None or fc is not None:
        out.append(section_map(fc, preds, run.run_dir, metrics))
    out.append(section_dataset(run, fc))
    return out


_TITLES = {"mistakes": "Mistakes", "heads": "Heads", "confusion": "Confusion", "classes": "Per class", "compare": "Fine-tune vs probe",
           "fewshot": "Few-shot", "map": "Embedding map", "data": "Data set", "audit": "Data audit"}


def write_report(run_dir: str | os.PathLike, *, cache: FeatureCache | str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.html`` from the run's JSON files and its cache; returns the path.

    ``cache`` overrides the cache path recorded in the run (e.g. after moving it).  Thumbnails
    (``thumbs/``), the map coordinates (``embedmap.npz``) and the per-image predictions are kept in
    the run folder, so a second report is quick.
    """
    run = load_run(run_dir)
    fc = open_cache(run, cache)
    sections = build_sections(run, fc)
    ids = [s.split('id="', 1)[1].split('"', 1)[0] for s in sections]
    title = f"featx report: {Path(str(run.cache_info.get('root') or run.run_dir)).name}"
    page = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}{AUDIT_CSS}</style></head><body><main>"
        + _header(run, [(i, _TITLES.get(i, i)) for i in ids]) + "".join(sections)
        + f"<p class=\"meta\">Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by featx {esc(__version__)}.</p>"
        "</main></body></html>\n"
    )
    out = run.run_dir / REPORT_NAME
    atomic_write_bytes(out, page.encode("utf-8"))
    log.info("report: wrote %s", out)
    return out
