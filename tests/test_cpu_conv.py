"""The convolution algorithm (LTI families) on the CPU target against the float64 oracle:
diagonal, complex-diagonal and scalar A; every method; initial/final states; varlen; bf16."""
from __future__ import annotations

import pytest

from families import mamba2, s4d
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


@pytest.mark.parametrize("fam", [s4d(), s4d(complex_a=True), mamba2(algorithm=Algorithm.CONV, **LTI)],
                         ids=["s4d", "s4d_complex", "scalar"])
def test_conv_varlen_with_states(fam, seed):
    p = problem(fam, varlen=[6, 0, 1, 20], with_state=True, seed=seed)
    check(kernel(fam, Algorithm.CONV), p, what=f"{fam.name} varlen")


def test_conv_bf16_and_no_states(seed):
    fam = s4d()
    sweep(kernel(fam, Algorithm.CONV), fam, (33,), seed, dtype="bfloat16")
    sweep(kernel(fam, Algorithm.CONV), fam, (17, 200), seed, with_state=False)
