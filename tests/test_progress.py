"""featx.base.progress: a tqdm bar on terminals, a readable line every few seconds elsewhere."""

from __future__ import annotations

import io
import logging

from featx.base.progress import LineProgress, progress_bar


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_interval_and_a_final_line(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="featx.progress")
    bar = LineProgress(total=1000, desc="embed", unit="img", interval=5.0, clock=clock)
    for _ in range(100):  # 10 images every 0.5 s: 50 s in all
        clock.t += 0.5
        bar.update(10)
    bar.close()
    bar.close()  # idempotent
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 10  # one every 5 s (9) + the final line, which is not preceded by a copy of itself
    assert sum(m.startswith("embed: 1000/1000") for m in msgs) == 1
    assert msgs[0] == "embed: 100/1000 img (10%), 20.0 img/s, ~45 s left"
    assert msgs[-1] == "embed: 1000/1000 img (100%), 20.0 img/s, done in 50 s"
    assert not any("\r" in m for m in msgs)


def test_iteration_postfix_and_disable(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="featx.progress")
    bar = LineProgress(range(3), desc="epoch 1/2", unit="step", interval=0.0, clock=clock)
    bar.set_postfix(loss=0.123456)
    assert list(bar) == [0, 1, 2]
    assert caplog.records[-1].getMessage().startswith("epoch 1/2: 3/3 step (100%)")
    assert caplog.records[0].getMessage().endswith("[loss=0.1235]")
    caplog.clear()
    off = LineProgress(total=5, disable=True, interval=0.0, clock=clock)
    off.update(5)
    off.close()
    assert not caplog.records


def test_progress_bar_picks_by_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = progress_bar(total=3, stream=io.StringIO(), desc="x")
    assert isinstance(plain, LineProgress)
    tty = Tty()
    with progress_bar(total=3, stream=tty, desc="x") as bar:
        bar.update(3)
    assert not isinstance(bar, LineProgress) and "\r" in tty.getvalue()  # a real tqdm bar
