"""The CPU scan kernel against the float64 oracle: every elementwise A structure, method and
selectivity the target supports; lengths 1..33, initial/final states, varlen, fp32 and bf16,
D/z on and off, groups. Each kernel is compiled once and run on many shapes."""
from __future__ import annotations

import pytest

from families import mamba1, mamba2, s5
from ssmc.ir import Algorithm, Method
from test_cpu_helpers import check, kernel, problem, replace, sweep

LENGTHS = (1, 7, 16, 17, 33)
METHODS = list(Method)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_mamba1_each_method(method, seed):
    fam = mamba1(method=method)
    sweep(kernel(fam), fam, LENGTHS, seed)


@pytest.mark.parametrize("variant", ["selective_A", "groups2", "no_D_no_z", "clamp_no_bias",
                                     "constant_B_C", "constant_delta"])
def test_mamba1_selectivity_and_parameters(variant, seed):
    fam = {
        "selective_A": lambda: mamba1(selective_A=True),
        "groups2": lambda: mamba1(channels=32, groups=2),
        "no_D_no_z": lambda: mamba1(D=False, gate=False),
        "clamp_no_bias": lambda: mamba1(bias=False, clamp=(1e-3, 5e-2)),
        "constant_B_C": lambda: mamba1(selective_B=False, selective_C=False),
        "constant_delta": lambda: mamba1(selective_delta=False, softplus=False, bias=False),
    }[variant]()
    sweep(kernel(fam), fam, (1, 17, 33), seed)


@pytest.mark.parametrize("method", [Method.ZOH, Method.BILINEAR, Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
def test_complex_diagonal_s5(method, seed):
    fam = s5(method=method)
    sweep(kernel(fam), fam, LENGTHS, seed)


@pytest.mark.parametrize("method", [Method.EXP_EULER, Method.ZOH, Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
def test_scalar_a_scan(method, seed):
    fam = mamba2(method=method, algorithm=Algorithm.SCAN)
    sweep(kernel(fam), fam, LENGTHS, seed)


def test_selective_scalar_a_groups(seed):
    from ssmc.ir import Sharing
    fam = mamba2(heads=4, groups=2, selective_A=True, D=Sharing.HEAD_DIM,
                 algorithm=Algorithm.SCAN)
    sweep(kernel(fam), fam, (1, 17), seed)


@pytest.mark.parametrize("fam", [mamba1(), mamba2(algorithm=Algorithm.SCAN), s5()],
                         ids=["mamba1", "mamba2", "s5"])
def test_bf16_inputs(fam, seed):
    sweep(kernel(fam), fam, (7, 33), seed, dtype="bfloat16")


def test_fp16_inputs(seed):
    fam = mamba1()
    sweep(kernel(fam), fam, (7, 33), seed, dtype="float16")


def test_long_sequence_full_tiles(seed):
    """Many full tiles (row loads/stores) plus a partial one, and a final state after 300 steps."""
    fam = mamba1(channels=32, state=16)
    sweep(kernel(fam), fam, (300,), seed, batch=1)


@pytest.mark.parametrize("fam", [mamba1(), mamba2(algorithm=Algorithm.SCAN), s5(),
                                 mamba1(method=Method.TRAPEZOIDAL)],
                         ids=["mamba1", "mamba2", "s5", "trapezoidal"])
def test_varlen_with_states(fam, seed):
    k = kernel(fam)
    # an empty sequence and a one-token sequence: no state leaks across boundaries
    p = problem(fam, varlen=[5, 0, 1, 17, 9], with_state=True, seed=seed)
    check(k, p, what=f"{fam.name} varlen")


@pytest.mark.parametrize("scalef", [True, False], ids=["ldexp", "exponent_bits"])
def test_large_delta_underflows_cleanly(scalef, seed):
    """Δ up to ~1e3: exp(Δ a) underflows to 0 (never NaN/inf) in both exp variants, and
    moderate-to-large zoh B = expm1(Δ a)/a stays exact."""
    import torch
    fam = mamba1(softplus=False, bias=False, method=Method.ZOH)
    p = problem(fam, seqlen=40, seed=seed, with_state=True)
    gen = torch.Generator().manual_seed(seed)
    big = torch.exp(torch.empty(p.delta.shape).uniform_(-7, 7, generator=gen))
    check(kernel(fam, scalef=scalef), replace(p, delta=big), what="large Δ")
