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
    spec = tmp_path / "ssd_constant_delta.ssm"
    spec.write_text("ssm SSDConst {\n dims heads = 4, head_dim = 8, state = 8\n"
                    " A scalar per head = -exp(A_log)\n delta constant = dt\n"
                    " B, C selective per group\n D per head\n discretize exp_euler\n"
                    " compute chunked(16)\n}\n")
    with pytest.raises(SSMCError, match="no backward kernel for the compiled SSDConst .chunked, "
                                        "target cpu.: .*constant A and a per-token Δ"):
        _example().train(target="cpu", steps=1, spec=str(spec), quiet=True)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_the_example_trains_on_the_cuda_target(family):
    """The same run on the cuda target's generated Triton backward (a GPU run: the interpreter
    would take minutes for 150 steps)."""
    from conftest import ON_CUDA
    if not ON_CUDA:
        pytest.skip("trains on a GPU (SSMC_TEST_CUDA=1); the kernels themselves are checked "
                    "under the interpreter in test_scan_backward.py / test_chunked_backward.py")
    losses = _example().train(family, "cuda", steps=150, length=32, tokens=4, lr=1e-2, quiet=True)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
