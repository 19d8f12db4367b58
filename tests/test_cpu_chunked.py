"""CHUNKED plans (SSD convention, scalar A) on the CPU target against the float64 oracle.

The CPU computes them by the direct scan over each head's (p, n) state (backends/cpu/chunked.py
says why); these tests hold the plan to the SSD contract: lengths around the chunk size,
initial/final states, varlen, groups, D per head or per head_dim, fp32 and bf16."""
from __future__ import annotations

import pytest

from families import mamba2
from ssmc.ir import Algorithm, Method, Sharing
from test_cpu_helpers import check, kernel, problem, replace, sweep

CHUNK = 16
LENGTHS = (1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 33)


def test_mamba2_chunked_lengths(seed):
    fam = mamba2(chunk=CHUNK)
    sweep(kernel(fam, Algorithm.CHUNKED), fam, LENGTHS, seed)


@pytest.mark.parametrize("variant", ["groups2_D_head_dim", "no_D_no_z", "selective_A",
                                     "clamp", "trapezoidal", "bilinear"])
def test_mamba2_chunked_variants(variant, seed):
    fam = {
        "groups2_D_head_dim": lambda: mamba2(heads=4, groups=2, D=Sharing.HEAD_DIM),
        "no_D_no_z": lambda: mamba2(D=None, gate=False),
        "selective_A": lambda: mamba2(selective_A=True),
        "clamp": lambda: mamba2(clamp=(1e-3, 5e-2)),
        "trapezoidal": lambda: mamba2(method=Method.TRAPEZOIDAL),
        "bilinear": lambda: mamba2(method=Method.BILINEAR),
    }[variant]()
    sweep(kernel(fam, Algorithm.CHUNKED), fam, (1, CHUNK + 1, 33), seed)


def test_mamba2_chunked_bf16(seed):
    fam = mamba2(chunk=CHUNK)
    sweep(kernel(fam, Algorithm.CHUNKED), fam, (CHUNK - 1, 33), seed, dtype="bfloat16")


def test_mamba2_chunked_varlen(seed):
    fam = mamba2(chunk=CHUNK)
    p = problem(fam, varlen=[CHUNK + 1, 0, 3, CHUNK - 1], with_state=True, seed=seed)
    check(kernel(fam, Algorithm.CHUNKED), p, what="varlen")


def test_large_delta_does_not_overflow(seed):
    """Δ up to 1e3 (decay products underflow to 0, never to NaN/inf)."""
    import torch
    fam = mamba2(chunk=CHUNK, softplus=False, bias=False)
    p = problem(fam, seqlen=33, seed=seed, with_state=True)
    big = torch.exp(torch.empty_like(p.dt).uniform_(-3, 7))
    check(kernel(fam, Algorithm.CHUNKED), replace(p, dt=big), what="large Δ")
