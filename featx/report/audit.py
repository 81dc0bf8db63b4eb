"""The audit section of ``report.html``: duplicate pairs side by side, label suspects and outliers as thumbnails.

Why: a CSV of paths convinces nobody; two thumbnails side by side show at once whether a
train/test pair is the same photo, and a suspect shown with its given and suggested class shows
whether the label is wrong.  Built from the run folder's ``audit.json`` and CSVs (and
``drop_flagged.json`` after ``featx probe --drop-flagged``); thumbnails come from the data root
the audit was given, never from outside it (:func:`featx.report.thumbs.make_thumbnail`).
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

from PIL import Image

from ..base.io import read_csv
from ..cache.trust.roots import sign_root
from .tables import Markup, esc, join, pct, table, tag
from .thumbs import data_uri, make_thumbnail

log = logging.getLogger(__name__)

MAX_PAIRS = 24
MAX_SUSPECTS = 36
MAX_OUTLIERS = 18

CSS = """
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(236px,1fr));gap:10px}
figure.pair{margin:0;background:#fafbfc;border:1px solid #e3e7ec;border-radius:6px;padding:6px;font-size:.8em;overflow-wrap:anywhere}
figure.pair .two{display:flex;gap:4px;justify-content:center}figure.pair .two>*{flex:1 1 0;min-width:0;text-align:center}
figure.pair img{max-width:100%;height:auto}figure.pair.cross{border-color:#d9822b;background:#fff8f0}
figure.pair .none{height:72px;display:flex;align-items:center;justify-content:center;color:#889;background:#eef0f3}
"""


def _rows(path: Path, limit: int) -> tuple[list[dict], int]:
    """The first ``limit`` rows of a CSV and how many it has (([], 0) when it is missing)."""
    if not path.is_file():
        return [], 0
    rows = read_csv(path)  # the values written (a leading ' that kept a name from running as a formula removed)
    return rows[:limit], len(rows)


def _pic(root: str, key: str, thumbs: Path) -> str:
    th = make_thumbnail(root, key, thumbs) if root else None
    if th is None:
        return '<div class="none">no thumbnail</div>'
    with Image.open(th) as im:
        w, h = im.size
    return f'<img src="{data_uri(th, "image/jpeg")}" width="{w}" height="{h}" alt="{esc(key)}">'


def _pairs(run_dir: Path, root: str, thumbs: Path, counts: dict) -> Markup:
    rows, n = _rows(run_dir / "duplicates.csv", MAX_PAIRS)
    if not n:
        return tag("p", "No duplicate pairs found.", class_="note")
    cards = []
    for r in rows:
        cross = r["split_a"] != r["split_b"]
        cards.append(
            f'<figure class="pair{" cross" if cross else ""}"><div class="two"><div>{_pic(root, r["path_a"], thumbs)}'
            f'<br>{esc(r["split_a"])}</div><div>{_pic(root, r["path_b"], thumbs)}<br>{esc(r["split_b"])}</div></div>'
            f'<figcaption><b>{esc(r["kind"])}</b>, cosine {esc(r["similarity"][:6])}{" — leakage" if cross else ""}<br>'
            f'<span class="path">{esc(r["path_a"])}</span><br><span class="path">{esc(r["path_b"])}</span></figcaption></figure>')
    note = (f"{counts.get('cross_split_pairs', 0)} cross-split pair(s) (orange: the same image in training and "
            f"evaluation inflates accuracy; {counts.get('leaked_eval_rows', 0)} evaluation image(s) affected), "
            f"{counts.get('exact_pairs', 0)} byte-identical, {counts.get('near_pairs', 0)} near duplicates"
            + (f"; the first {len(rows)} of {n} shown" if n > len(rows) else "") + ". All in duplicates.csv.")
    return join([tag("h3", "Duplicates"), tag("p", note, class_="note"),
                 Markup(f'<div class="pairs">{"".join(cards)}</div>')])


def _thumb_grid(title: str, rows: list[dict], note: str, caption, root: str, thumbs: Path) -> Markup:
    """An h3, a note, and one thumbnail card per row with ``caption(row)`` (HTML) under it."""
    cards = [f'<figure class="thumb">{_pic(root, r["path"], thumbs)}<figcaption>{caption(r)}<br>'
             f'<span class="path">{esc(r["path"])}</span></figcaption></figure>' for r in rows]
    return join([tag("h3", title), tag("p", note, class_="note"), Markup(f'<div class="grid">{"".join(cards)}</div>')])


def _suspects(run_dir: Path, root: str, thumbs: Path, trust: dict) -> Markup:
    """The flagged rows of label_issues.csv (it ranks every row since issue 33; older files hold only flags)."""
    rows, n = _rows(run_dir / "label_issues.csv", None)
    ranked = len(rows)
    if rows and "flagged" in rows[0]:
        rows = [r for r in rows if r.get("flagged") == "1"]
    n = len(rows)
    rows = rows[:MAX_SUSPECTS]
    reliable = trust.get("reliable", True)
    what = "doubts" if reliable else "flags for review"
    note = ("cleanlab flags no label." if not n else
            f"{n} image(s) whose given label cleanlab {what}, worst first"
            + (f" (first {len(rows)} shown)" if n > len(rows) else "")
            + ". Training images are judged by out-of-fold probabilities of a logistic regression (the probe's C, "
            "calibrated by one temperature out of fold) on the probe's folds, evaluation images by the same model trained on the training images. "
            f"label_issues.csv ranks all {ranked} images (column flagged).")
    if trust:
        note += (f" Estimated label noise {trust['noise_rate']:.1%}" if trust.get("noise_rate") is not None else "") + (
            f"; {trust.get('flags_confusable', 0)} of the flags are confusions between classes the probe mixes up "
            f"anyway; out-of-fold accuracy {trust.get('oof_accuracy', 0):.1%}, calibration error {trust.get('ece', 0):.3f}.")
    caption = lambda r: (f'given <b class="p">{esc(r["given"])}</b><br>suggested <b class="t">{esc(r["suggested"])}'  # noqa: E731
                         f'</b> ({esc(r["split"])}, quality {esc(r["score"][:5])})')
    title = "Likely label errors" if reliable else "Labels for review (the probe is too weak to call them errors)"
    return _thumb_grid(title, rows, note, caption, root, thumbs)


def _outliers(run_dir: Path, root: str, thumbs: Path) -> Markup:
    rows, n = _rows(run_dir / "outliers.csv", MAX_OUTLIERS)
    note = ("No image is far from its class." if not n else
            f"{n} image(s) far from the nearest training images of their own class (robust z-score of the kNN "
            "distance within the class); often a wrong label, an odd crop or not a member of any class"
            + (f"; the first {len(rows)} shown" if n > len(rows) else "") + ". All in outliers.csv.")
    caption = lambda r: f'<b>{esc(r["label"])}</b> ({esc(r["split"])}), z {esc(r["score"])}'  # noqa: E731
    return _thumb_grid("Outliers", rows, note, caption, root, thumbs)


def _dropped(run_dir: Path) -> Markup:
    path = run_dir / "drop_flagged.json"
    if not path.is_file():
        return join([])
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("report: %s is unreadable (%s)", path, exc)
        return join([])
    rows = [[name, pct(h["accuracy"]), h["n_eval"], pct(h["accuracy_dropped"]), h["n_eval_dropped"],
             f"{100 * (h['accuracy_dropped'] - h['accuracy']):+.1f}"] for name, h in d["heads"].items()]
    note = (f"--drop-flagged {','.join(d['kinds'])}: {d['dropped_train_rows']} flagged training and "
            f"{d['dropped_eval_rows']} leaked evaluation image(s) left out. {d['note']}")
    return join([tag("h3", "What the findings cost"), tag("p", note, class_="note"),
                 table(["head", "accuracy", "eval images", "without flagged", "eval images", "change (points)"], rows,
                       num=(1, 2, 3, 4, 5))])


def audit_root(audit: dict, root: str) -> str:
    """The data root the audit section may read thumbnails from: audit.json's only when signed here, else ``root``.

    ``root``: the cache's root as :func:`featx.cache.trust.roots.trusted_root` gives it ("" when
    unsigned).  ``featx audit`` signs the root it hashed (``data_root_mac``, the same HMAC with this
    user's key), so a ``--data-root`` given here is kept, while a stranger's audit.json naming
    ``/home/victim`` is ignored (issue 31).
    """
    claimed, mac = str(audit.get("data_root") or ""), audit.get("data_root_mac")
    if claimed and isinstance(mac, str) and hmac.compare_digest(mac, sign_root(claimed, str(audit.get("fingerprint", "")))):
        return claimed
    if claimed and claimed != root:
        log.warning("report: audit.json names data root %s, but it was not signed by `featx audit` on this machine for "
                    "this user, so no image file is read from it", claimed)
    return str(root or "")


def section_audit(run_dir: Path, audit: dict, root: str) -> Markup:
    """The section (id ``audit``) for a run folder that holds ``audit.json``; ``root``: the cache's trusted root."""
    counts = audit.get("counts") or {}
    root = audit_root(audit, root)
    thumbs = run_dir / "thumbs"
    hashing = audit.get("hashing") or {}
    intro = (f"{audit.get('summary', '').split('; see')[0]}. Features: view {(audit.get('logreg') or {}).get('view') or (audit.get('settings') or {}).get('view')}; "
             f"near duplicates at cosine >= {(audit.get('settings') or {}).get('near_threshold')}; "
             f"{hashing.get('hashed', 0)} files hashed under {root}"
             + (f", {hashing.get('skipped')} could not be read" if hashing.get("skipped") else "") + ".")
    notes = [tag("p", n, class_="warn") for n in audit.get("notes") or []]
    body = [tag("p", intro, class_="note"), *notes, _dropped(run_dir), _pairs(run_dir, root, thumbs, counts),
            _suspects(run_dir, root, thumbs, audit.get("label_trust") or {}), _outliers(run_dir, root, thumbs)]
    return Markup(f'<section id="audit"><h2>Data audit</h2>{join(body)}</section>')
