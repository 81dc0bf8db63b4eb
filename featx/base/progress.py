"""Progress that reads well everywhere: a tqdm bar on a terminal, a log line every few seconds elsewhere.

Why: in CI logs, ``make demo > log`` or a job scheduler, tqdm's carriage-return updates become
one endless line (10 kB in the demo log).  :func:`progress_bar` keeps tqdm when stderr is a
terminal and otherwise returns :class:`LineProgress`, which logs ``embed: 512/1000 img (51%),
38.2 img/s, ~13 s left`` through ``logging`` at most every ``interval`` seconds (and once at the
end), so ``--quiet`` (featx logger at WARNING) silences it too.  Imports nothing from featx.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

log = logging.getLogger("featx.progress")

DEFAULT_INTERVAL = 5.0  # seconds between lines when stderr is not a terminal (FEATX_PROGRESS_SECONDS)


def format_duration(s: float, *, decimals: int = 0) -> str:
    """A duration as people read it: ``42 s`` (``decimals`` below a minute), ``3 min 05 s``, ``1 h 02 min``.

    The one format of progress lines, fine-tune log lines and the compare table.
    """
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.{decimals}f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def format_bytes(n: float) -> str:
    """A size as people read it: ``512 B``, ``3.4 MB`` (the cache summaries)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class LineProgress:
    """The subset of tqdm's interface featx uses, reported as plain log lines.

    ``update``, ``set_postfix``/``set_postfix_str``, ``set_description``, ``close``, iteration
    and ``with``; ``n`` and ``total`` as in tqdm.  ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = DEFAULT_INTERVAL,
        disable: bool = False,
        leave: bool = True,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.interval = float(interval)
        self.disable = disable
        self.leave = leave
        self.postfix = ""
        self._log = logger or log
        self._clock = clock
        self._start = clock()
        self._start_n = self.n
        self._last = self._start
        self._closed = False
        self.lines = 0  # how many lines were written (for tests and curiosity)

    # -- tqdm-compatible API
    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.disable:
            return
        now = self._clock()
        if self.leave and self.total and self.n >= self.total:
            return  # the last line is close()'s, with the time it took (not the same line twice)
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:  # noqa: ARG002
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # noqa: ARG002
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:  # noqa: ARG002
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are written by ``update`` and ``close``."""

    def write(self, s: str) -> None:
        self._log.info("%s", s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.leave and self.n > self._start_n:
            self._emit(self._clock(), final=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    # -- the line
    def line(self, now: float | None = None, *, final: bool = False) -> str:
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        done = self.n - self._start_n
        rate = done / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.n / self.total
            text = f"{head}{self.n}/{self.total} {self.unit} ({pct:.0f}%)"
        else:
            text = f"{head}{self.n} {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if final:
            text += f", done in {format_duration(elapsed)}"
        elif self.total and rate > 0 and self.n < self.total:
            text += f", ~{format_duration((self.total - self.n) / rate)} left"
        if self.postfix:
            text += f" [{self.postfix}]"
        return text

    def _emit(self, now: float, *, final: bool = False) -> None:
        self.lines += 1
        self._log.info("%s", self.line(now, final=final))


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
    leave: bool = True,
    interval: float | None = None,
    stream: TextIO | None = None,
    **tqdm_kwargs: Any,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`.

    Drop-in for ``tqdm(iterable, total=..., desc=..., unit=..., disable=...)``; extra keyword
    arguments (``dynamic_ncols``, ``leave``...) go to tqdm only.  ``interval`` (seconds between
    lines off a terminal) defaults to ``FEATX_PROGRESS_SECONDS`` or 5.
    """
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        from tqdm.auto import tqdm  # tqdm only where a bar can be drawn

        tqdm_kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, leave=leave,
                    file=stream, **tqdm_kwargs)
    if interval is None:
        try:
            interval = float(os.environ.get("FEATX_PROGRESS_SECONDS") or DEFAULT_INTERVAL)
        except ValueError:
            interval = DEFAULT_INTERVAL
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial,
                        leave=leave, interval=interval)
