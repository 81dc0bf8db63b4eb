"""HTML building blocks of the report; every value that is not :class:`Markup` is escaped.

Why: class names, paths and messages come from the user's file system; a folder named
``<img src=x onerror=alert(1)>`` must show as text.  Helpers here take plain values and
escape them, so the page is safe by construction rather than by remembering to escape.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

NUMBERS_UP_TO = 20  # confusion-matrix cells show counts up to this many classes, colour only beyond


class Markup(str):
    """HTML that was built from escaped parts and is inserted as is."""


def esc(value: Any) -> str:
    """``value`` as HTML text (Markup passes through)."""
    if isinstance(value, Markup):
        return value
    return html.escape("" if value is None else str(value), quote=True)


def tag(name: str, content: Any = "", **attrs: Any) -> Markup:
    """``<name attr="...">content</name>`` with escaped attributes and content (``class_`` for class)."""
    parts = [name] + [f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None]
    return Markup(f"<{' '.join(parts)}>{esc(content)}</{name}>")


def join(items: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(esc(i) for i in items))


def fmt(v: Any, nd: int = 3) -> str:
    """Numbers for tables: floats rounded, missing values as an en dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{nd}f}"
    return str(v)


def pct(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * float(v):.{nd}f}%"


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], *, num: Sequence[int] = (), class_: str = "",
          cards: bool = False, compact: bool = False) -> Markup:
    """A table; columns whose index is in ``num`` are right-aligned numbers.

    ``cards``: on a narrow screen each row becomes a card of "header: value" lines (CSS ``table.cards``:
    every cell carries its column's name in ``data-label``), so a wide table is read without scrolling sideways.
    ``compact``: the same, but a card is the first cell on one line and the numbers side by side below it (for
    long tables of a name and a few numbers: per class, most confused pairs).
    """
    cards = cards or compact
    right = ' class="n"'
    head = "".join(f"<th{right if i in num else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    labels = [f' data-label="{esc(h)}"' if cards else "" for h in headers]
    body = []
    for r in rows:
        cells = (f"<span>{esc(c)}</span>" if cards else esc(c) for c in r)  # one grid item per card line
        body.append("<tr>" + "".join(f"<td{right if i in num else ''}{labels[i] if i < len(labels) else ''}>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    class_ = " ".join(c for c in (class_, "cards" if cards else "", "compact" if compact else "") if c)
    cls = f' class="{esc(class_)}"' if class_ else ""
    return Markup(f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


_WORD_END = re.compile(r"(?<=[_\-./ ])")  # a class name may break after these, never inside a word


def name_words(name: Any) -> list[str]:
    """The unbreakable pieces of a class name: ``American_Shorthair`` -> ``American_``, ``Shorthair``."""
    return [w for w in _WORD_END.split("" if name is None else str(name)) if w]


def words(name: Any) -> Markup:
    """A class name that wraps only between its words: each piece in ``<span class="w">`` (no wrapping
    inside), a ``<wbr>`` after each ``_ - . /`` so ``American_Shorthair`` breaks after the underscore
    (or not at all), never as ``American_Shorthai`` / ``r``."""
    return Markup("<wbr>".join(f'<span class="w">{esc(w)}</span>' for w in name_words(name)))


def bar(value: float | None, *, width: int = 80) -> Markup:
    """A small inline bar for a share in [0, 1] (CSS only)."""
    if value is None or not math.isfinite(value):
        return Markup("")
    w = max(0, min(width, int(round(value * width))))
    return Markup(f'<span class="bar" style="width:{w}px"></span>')


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], k: int = 15) -> list[tuple[str, str, int, float]]:
    """The ``k`` largest off-diagonal cells: (true class, predicted class, count, share of the true class)."""
    cm = np.asarray(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    support = cm.sum(axis=1)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    out = []
    for f in flat:
        i, j = divmod(int(f), cm.shape[1])
        if off[i, j] <= 0:
            break
        out.append((str(classes[i]), str(classes[j]), int(off[i, j]), float(off[i, j] / max(support[i], 1))))
    return out


def confusion_html(cm: np.ndarray, classes: Sequence[str], *, numbers_up_to: int = NUMBERS_UP_TO) -> Markup:
    """The row-normalised confusion matrix as a colour table.

    Up to ``numbers_up_to`` classes every cell shows its count; beyond, cells are colour only
    (9 shades of the share of the true class) with the count in a hover title, so 120 classes
    stay a readable 10-pixel grid.
    """
    cm = np.asarray(cm)
    n = len(classes)
    support = cm.sum(axis=1)
    share = np.divide(cm, support[:, None], out=np.zeros(cm.shape, dtype=float), where=support[:, None] > 0)
    small = n <= numbers_up_to
    cls = "cm" if small else "cm dense"
    head = '<th class="corner">true ↓ / predicted →</th>' + "".join(f'<th class="col"><span>{esc(c)}</span></th>' for c in classes)
    rows = []
    for i in range(n):
        cells = []
        for j in range(n):
            if cm[i, j] == 0:  # most cells at 120 classes: keep them to a few bytes
                cells.append('<td class="diag"></td>' if i == j else "<td></td>")
                continue
            q = 1 + min(8, int(share[i, j] * 9))
            title = f"{classes[i]} → {classes[j]}: {int(cm[i, j])} of {int(support[i])}"
            text = str(int(cm[i, j])) if small else ""
            extra = " diag" if i == j else ""
            cells.append(f'<td class="q{q}{extra}" title="{esc(title)}">{text}</td>')
        rows.append(f'<tr><th class="row">{words(classes[i])} <small>({int(support[i])})</small></th>{"".join(cells)}</tr>')
    return Markup(f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def per_class_rows(per_class: dict) -> list[tuple]:
    """Per-class (name, precision, recall, F1, support), worst first: by F1, then recall, then name."""
    items = [(c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support", 0)) for c, v in per_class.items()]
    items = [r for r in items if (r[4] or 0) > 0 or (r[1] or 0) > 0]  # classes absent from evaluation are noise
    return sorted(items, key=lambda r: (r[3] if r[3] is not None else 0.0, r[2] if r[2] is not None else 0.0, r[0]))
