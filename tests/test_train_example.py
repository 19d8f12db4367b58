"""examples/train_selective_copy.py: a short run trains (the loss falls well below where it
starts) through the generated forward and backward kernels, and writes its loss curve."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT, require_target_tools
from ssmc.errors import SSMCError


def _example():
    path = ROOT / "examples" / "train_selective_copy.py"
    spec = importlib.util.spec_from_file_location("train_selective_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selective_copy_loss_falls_on_the_cpu_target(tmp_path):
    require_target_tools("cpu")
    plot = tmp_path / "loss.png"
    losses = _example().train("mamba1", "cpu", steps=300, length=32, tokens=4, lr=1e-2,
                              plot=str(plot), quiet=True)
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.6 * start, (start, end)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_family_without_a_backward_says_which_and_why():
    require_target_tools("cpu")
    with pytest.raises(SSMCError, match="no backward kernel for the compiled Mamba2 .chunked"):
        _example().train("mamba2", "cpu", steps=1, quiet=True)
