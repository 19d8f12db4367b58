"""The convolution algorithm (LTI families) on the CPU target against the float64 oracle:
diagonal, complex-diagonal and scalar A; every method; initial/final states; varlen; bf16;
matrix A (S4 DPLR, dense); the examples/s4.ssm family is test_oracle.py's."""
from __future__ import annotations

import pytest


from families import MATRIX_CONV_FAMILIES, dense, mamba2, s4_dplr, s4d
from ssmc.ir import Algorithm, Method
from test_cpu_helpers import check, kernel, problem, sweep

LENGTHS = (1, 7, 16, 17, 33)
LTI = dict(selective_B=False, selective_C=False, selective_delta=False)


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_s4d_conv_each_method(method, seed):
    fam = s4d(method=method)
    sweep(kernel(fam, Algorithm.CONV), fam, LENGTHS, seed)


@pytest.mark.parametrize("method", [Method.ZOH, Method.BILINEAR], ids=lambda m: m.value)
def test_complex_s4d_conv(method, seed):
    fam = s4d(method=method, complex_a=True)
    sweep(kernel(fam, Algorithm.CONV), fam, LENGTHS, seed)


def test_scalar_a_lti_conv(seed):
    fam = mamba2(algorithm=Algorithm.CONV, **LTI)
    sweep(kernel(fam, Algorithm.CONV), fam, LENGTHS, seed)


# s4d and complex s4d (s5) varlen: test_oracle.py's cpu-conv-*-varlen cells.
@pytest.mark.parametrize("fam", [mamba2(algorithm=Algorithm.CONV, **LTI)], ids=["scalar"])
def test_conv_varlen_with_states(fam, seed):
    p = problem(fam, varlen=[6, 0, 1, 20], with_state=True, seed=seed)
    check(kernel(fam, Algorithm.CONV), p, what=f"{fam.name} varlen")


def test_conv_bf16_and_no_states(seed):
    fam = s4d()
    sweep(kernel(fam, Algorithm.CONV), fam, (33,), seed, dtype="bfloat16")
    sweep(kernel(fam, Algorithm.CONV), fam, (17, 200), seed, with_state=False)


# Matrix A (DPLR, dense): Abar, Bbar B formed on the host in float64, K by a TIR power iteration.
@pytest.mark.parametrize("name", list(MATRIX_CONV_FAMILIES))
def test_matrix_a_conv_with_states(name, seed):
    fam = MATRIX_CONV_FAMILIES[name]()
    k = kernel(fam, Algorithm.CONV)
    sweep(k, fam, (1, 7, 33), seed)                       # initial and final state
    sweep(k, fam, (9,), seed + 7, with_state=False)


def test_matrix_a_conv_varlen_with_states(seed):
    fam = s4_dplr(rank=2, method=Method.ZOH)
    p = problem(fam, varlen=[6, 0, 1, 20], with_state=True, seed=seed)
    check(kernel(fam, Algorithm.CONV), p, what="S4 DPLR varlen")


def test_matrix_a_scan_and_step_stay_refused():
    from ssmc.backends import cpu
    from ssmc.plan import make_plan
    for fam in (s4_dplr(algorithm=Algorithm.SCAN), dense(method=Method.ZOH)):
        for algorithm in (Algorithm.SCAN, Algorithm.STEP):
            reason = cpu.supports(make_plan(fam, algorithm))
            assert reason and fam.A.structure.value in reason and algorithm.value in reason
