"""Tests of model.precision: the optional torch.compile of the DHE head and its fallback to the eager head."""

from __future__ import annotations

import pytest
import torch

from model import HomographyRegression
from model.precision import compile_head


def test_compile_head_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    head = HomographyRegression(resize=(64, 64), num_layers=1, dim_feedforward=32).eval()
    assert compile_head(head, "none", 2, torch.device("cpu")) is head
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_head(head, "fast", 2, torch.device("cpu"))

    def failing_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    assert compile_head(head, "default", 2, torch.device("cpu")) is head
    assert "failed, running it eagerly: RuntimeError('no compiler here')" in caplog.text

    def wrong_compile(module, **kwargs):
        return lambda x: module(x) + 1.0  # a "compiled" head one pixel off

    monkeypatch.setattr(torch, "compile", wrong_compile)
    assert compile_head(head, "reduce-overhead", 2, torch.device("cpu")) is head
    assert "gives points 1 px away from the eager head's (tolerance 0.05 px), running it eagerly" in caplog.text
