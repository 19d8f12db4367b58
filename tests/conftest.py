"""Shared test helpers: tolerances by dtype, relative error, poisoning, fresh seeds."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

# Triton decides at its first import whether it interprets: on a machine without a GPU every
# Triton kernel runs on the CPU interpreter (pytest imports this file before any test module).
# SSMC_TEST_CUDA=1 runs them compiled on a GPU, and SSMC_TEST_FULL=1 at full-size shapes.
ON_CUDA = os.environ.get("SSMC_TEST_CUDA") == "1"
FULL = os.environ.get("SSMC_TEST_FULL") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def require_target_tools(target: str):
    """Skip the calling test when ``target`` needs a tool this machine lacks: apache-tvm for
    cpu, gcc for c (the cuda target runs under the interpreter without a GPU)."""
    if target == "cpu":
        pytest.importorskip("tvm", reason="the cpu target needs apache-tvm")
    if target == "c" and shutil.which("gcc") is None:
        pytest.skip("the c target builds with gcc, which is not on PATH")


def target_device(target: str) -> str:
    """Where a target's tensors live in this run: the GPU for cuda under SSMC_TEST_CUDA=1."""
    return "cuda" if target == "cuda" and ON_CUDA else "cpu"


def require_cuda_device():
    """Skip the calling test module when SSMC_TEST_CUDA=1 is set on a machine without a GPU."""
    import torch
    if ON_CUDA and not torch.cuda.is_available():
        pytest.skip("SSMC_TEST_CUDA=1 but no CUDA device", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Relative-error tolerances (||out - ref|| / ||ref||) by the dtype of the inputs.
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}


def _np(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.is_complex():
                return x.to(torch.complex128).numpy()
            return x.to(torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def rel_err(out, ref) -> float:
    out, ref = _np(out), _np(ref)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(out)), "output has NaN/inf (poisoned or unwritten elements?)"
    denom = np.linalg.norm(ref.ravel())
    return float(np.linalg.norm((out - ref).ravel()) / max(denom, 1e-30))


def assert_rel_close(name: str, out, ref, dtype: str = "float32", tol: float | None = None):
    """Relative error of ``out`` against the float64 ``ref`` within the dtype's tolerance."""
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({dtype})"


def poison(t):
    """Fill an output buffer with NaN so that unwritten elements fail the comparison."""
    return t.fill_(float("nan"))


@pytest.fixture
def seed(request):
    """A fresh random seed per test, reported on failure so a run can be reproduced."""
    s = int(os.environ.get("SSMC_TEST_SEED", random.randrange(2**31)))
    request.node.user_properties.append(("seed", s))
    return s


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[reproduce with SSMC_TEST_SEED={v}]")
