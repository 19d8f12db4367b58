"""The convolution algorithm (LTI families) on the CPU target against the float64 oracle:
diagonal, complex-diagonal and scalar A; every method; initial/final states; varlen; bf16;
matrix A (S4 DPLR, dense) and the examples/s4.ssm family."""
from __future__ import annotations

import pytest

from pathlib import Path

from families import MATRIX_CONV_FAMILIES, dense, mamba2, s4_dplr, s4d
from ssmc.ir import Algorithm, Method
from test_cpu_helpers import CONFIG, check, kernel, problem, sweep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

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


def test_s4_example_compiles_for_cpu_and_matches_oracle(seed):
    import ssmc
    from ssmc import signature
    from ssmc.backends import reference
    from conftest import assert_rel_close
    k = ssmc.compile(EXAMPLES / "s4.ssm", target="cpu", config=CONFIG)
    kw = k.example_inputs(batch=2, seqlen=33, seed=seed, with_state=True)
    y64, h64 = reference.run_float64(signature.bind(k.family, k.convention, (), kw))
    y, last = k(**kw)
    assert_rel_close("y", y, y64, "float32")
    assert_rel_close("last_state", last, h64, "float32")
