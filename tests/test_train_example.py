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


def test_mamba2_trains_on_the_cpu_target():
    """The SSD family's backward on the cpu target (scalar A in the scan's SSD layout)."""
    require_target_tools("cpu")
    losses = _example().train("mamba2", "cpu", steps=150, length=32, tokens=4, lr=1e-2,
                              quiet=True)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_a_family_without_a_backward_says_which_and_why(tmp_path):
    require_target_tools("cpu")
    spec = tmp_path / "s5like.ssm"
    spec.write_text("ssm S5Like {\n dims channels = 64, state = 8\n"
                    " A complex diagonal = -exp(A_log)\n delta constant = dt\n"
                    " B, C constant per channel\n D per channel\n discretize zoh\n"
                    " compute scan\n}\n")
    with pytest.raises(SSMCError, match="no backward kernel for the compiled S5Like .scan, "
                                        "target cpu.: .*not complex_diagonal A"):
        _example().train(target="cpu", steps=1, spec=str(spec), quiet=True)
