"""Shared helpers of the CPU-backend tests (this module holds no tests).

Every kernel is built once per process (``kernel`` is memoized on the frozen family); the
disk cache lives in a temporary directory of the test process. Outputs are allocated
poisoned (NaN). Each check compares one generated kernel with the float64 oracle
``ssmc.backends.reference`` on fresh random inputs.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from ssmc import signature
from ssmc.backends import cpu, reference
from ssmc.backends.cpu import launch
from ssmc.ir import Algorithm, Convention
from ssmc.plan import make_plan

from conftest import TOL, rel_err
import backend_calls as calls
from ssmc.runtime.cache import ArtifactCache

launch.POISON = True
# A fresh disk cache per test process, as CI starts cold; removed at exit. Within the process
# the backend's in-memory memo already shares a kernel between test modules.
CACHE = Path(tempfile.mkdtemp(prefix="ssmc-cpu-tests-"))
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
CACHED = ArtifactCache(CACHE)
CONFIG: dict = {}


@functools.lru_cache(maxsize=None)
def kernel(family, algorithm: Optional[Algorithm] = None, **config):
    plan = make_plan(family, algorithm)
    return calls.build(cpu, plan, dict(CONFIG, **config), CACHED)


def problem(family, convention=None, batch=2, seqlen=16, dtype="float32", seed=0,
            with_state=False, varlen: Optional[Sequence[int]] = None):
    conv = convention or family.convention
    kw = signature.example_inputs(family, conv, batch, seqlen, dtype=dtype, seed=seed,
                                  with_state=with_state, varlen=varlen)
    return signature.bind(family, conv, (), kw)


def replace(p, **fields):
    """A copy of the (frozen) problem with some tensors replaced."""
    kw = {k: getattr(p, k) for k in p.__dataclass_fields__ if k != "convention"}
    kw.update(fields)
    return type(p)(**kw)


def check(k, p, dtype="float32", what=""):
    """Run kernel ``k`` on problem ``p`` and compare y (and the final state) with the oracle."""
    y64, h64 = reference.run_float64(p)   # before the kernel: the decode step mutates p.state
    y, final = k(p)
    tol = TOL[dtype]
    assert y.dtype == p.dtype, f"{what}: y has dtype {y.dtype}, inputs {p.dtype}"
    err = rel_err(y, y64)
    assert err <= tol, f"{what}: y relative error {err:.3e} > {tol:.0e}"
    if isinstance(p, signature.StateUpdateProblem):
        err_s = rel_err(p.state, h64)
        assert err_s <= max(tol, 1e-5), f"{what}: state relative error {err_s:.3e}"
    elif p.wants_final_state:
        assert final is not None, f"{what}: no final state returned"
        assert final.dtype in (torch.float32, torch.complex64)
        err_s = rel_err(final, h64)
        assert err_s <= max(tol, 1e-5), f"{what}: final state relative error {err_s:.3e}"
    else:
        assert final is None
    return err


def sweep(k, family, lengths, seed, batch=2, dtype="float32", with_state=True,
          convention=None):
    """One kernel, several sequence lengths (the sizes are runtime variables of the TIR)."""
    for i, L in enumerate(lengths):
        p = problem(family, convention, batch, L, dtype, seed + i, with_state)
        check(k, p, dtype, f"{family.name} L={L} {dtype}")


__all__ = ["kernel", "problem", "check", "sweep", "replace", "CACHE", "CONFIG", "Algorithm", "Convention",
           "pytest"]
