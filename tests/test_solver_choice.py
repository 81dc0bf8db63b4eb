"""heads/tuning/solver_choice.py: in memory or streamed."""

from __future__ import annotations

import logging

import pytest

from featx.base.choices import SOLVERS
from featx.base.errors import FeatxError
from featx.heads.tuning import solver_choice
from featx.heads.tuning.solver_choice import use_stream


def test_asked_solvers_are_obeyed_and_unknown_ones_refused():
    assert use_stream("stream", n_train=10, n_eval=1, dim=4, n_classes=2)
    assert not use_stream("memory", n_train=10**9, n_eval=1, dim=4096, n_classes=1000)
    with pytest.raises(FeatxError, match="--solver 'fast': expected one of auto, memory, stream"):
        use_stream("fast", n_train=10, n_eval=1, dim=4, n_classes=2)
    assert SOLVERS == ("auto", "memory", "stream")


def test_auto_streams_only_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(solver_choice, "available_bytes", lambda: 1 << 30)
    assert not use_stream("auto", n_train=1000, n_eval=100, dim=64, n_classes=5)
    assert use_stream("auto", n_train=2_000_000, n_eval=1000, dim=1280, n_classes=5)
    monkeypatch.setattr(solver_choice, "available_bytes", lambda: None)  # unknown memory: never streams
    assert not use_stream("auto", n_train=2_000_000, n_eval=1000, dim=1280, n_classes=5)


def test_auto_warns_when_the_in_memory_search_will_be_slow(monkeypatch, caplog):
    monkeypatch.setattr(solver_choice, "available_bytes", lambda: None)
    with caplog.at_level(logging.WARNING, logger="featx.heads.tuning.solver_choice"):
        assert not use_stream("auto", n_train=100_000, n_eval=10, dim=1280, n_classes=1000)
    assert "--solver stream" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featx.heads.tuning.solver_choice"):
        use_stream("auto", n_train=100_000, n_eval=10, dim=1280, n_classes=1000, linear=False)
    assert caplog.text == ""
