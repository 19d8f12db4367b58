"""The discretization pass: derived forms against closed forms, limits, stability, and the matrix
forms against independent numerics (scipy's expm, the block-matrix exponential, RK4, and the
eigendecomposition of A)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import sympy as sp
from sympy.codegen.cfunctions import expm1

import families as F
from ssmc.discretize import (A_COMPLEX, A_MATRIX, A_REAL, DT, MatrixExp, derive_elementwise,
                             derive_matrix, describe, discretize, evaluate, is_matrix,
                             split_complex, stable_form)
from ssmc.ir import AStructure, Discretized, Method

METHODS = list(Method)


def closed_forms(a, dt):
    """The textbook forms, typed here only to check the derivation against."""
    e = sp.exp(a * dt)
    return {
        Method.ZOH: (e, (e - 1) / a, 0),
        Method.BILINEAR: ((1 + dt * a / 2) / (1 - dt * a / 2), dt / (1 - dt * a / 2), 0),
        Method.EULER: (1 + dt * a, dt, 0),
        Method.EXP_EULER: (e, dt, 0),
        Method.TRAPEZOIDAL: (e, dt / 2, dt / 2 * e),
    }


@pytest.mark.parametrize("complex_a", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_derived_equals_closed_form(method, complex_a):
    d = derive_elementwise(method, complex_a)
    want = closed_forms(d.a, DT)[method]
    for name, got, ref in zip(("abar", "bbar", "bbar_prev"), (d.abar, d.bbar, d.bbar_prev), want):
        assert sp.simplify(got - ref) == 0, f"{method.value} {name}: {got} != {ref}"
    assert d.dt is DT and d.a is (A_COMPLEX if complex_a else A_REAL)


def test_zoh_bbar_tends_to_dt_as_a_vanishes():
    x = sp.Symbol("x", real=True)
    for complex_a in (False, True):
        d = derive_elementwise(Method.ZOH, complex_a)
        assert sp.simplify(sp.limit(d.bbar.subs(d.a, x), x, 0) - DT) == 0
        assert sp.limit(d.abar.subs(d.a, x), x, 0) == 1


def test_bilinear_matches_exact_decay_to_third_order():
    d = derive_elementwise(Method.BILINEAR)
    err = sp.series(d.abar - sp.exp(d.a * DT), DT, 0, 4).removeO()
    # Agrees through dt^2; the first difference is the dt^3 term a^3 dt^3 / 12.
    assert sp.simplify(err - d.a**3 * DT**3 / 12) == 0


def test_complex_symbol_is_not_assumed_real():
    assert A_COMPLEX.is_real is None and A_COMPLEX.is_zero is False
    assert A_REAL.is_negative and DT.is_positive


def _random_real_a(rng, size):
    return -np.exp(rng.uniform(np.log(1e-4), np.log(1e3), size))


@pytest.mark.parametrize("method", METHODS)
def test_stability_for_stable_a(method, seed):
    rng = np.random.default_rng(seed)
    a = _random_real_a(rng, 4000)
    # Delta * |a| from 1e-12 (below that exp rounds to 1 exactly) to 1e8.
    x = np.exp(rng.uniform(np.log(1e-12), np.log(1e8), a.shape))
    # Complex: |Im a| up to ~10 |Re a| and Delta |Re a| in [1e-6, 1e6], so that 1 - |abar|
    # (about 8 x / (4 + |Im a dt|^2) for bilinear) stays above float64 resolution.
    a_c = a + 1j * rng.normal(0, 3, a.shape) * np.abs(a)
    x_c = np.exp(rng.uniform(np.log(1e-6), np.log(1e6), a.shape))
    for a_, dt in ((a, x / np.abs(a)), (a_c, x_c / np.abs(a))):
        d = discretize(F.s4d(method=method, complex_a=np.iscomplexobj(a_)))
        abar = np.abs(evaluate(d, dt, a_)[0])
        if method is Method.EULER:
            # Forward Euler is stable only inside the disk |1 + a dt| < 1.
            inside = np.abs(1 + a_ * dt) < 1
            assert np.all(abar[inside] < 1) and np.all(abar[~inside] >= 1)
            assert np.any(~inside)
        else:
            # zoh / exp-euler / trapezoidal decay exactly; bilinear is A-stable.
            assert np.all(abar < 1), f"{method.value}: max |abar| {abar.max()}"


def test_zoh_bbar_keeps_digits_for_tiny_steps():
    d = derive_elementwise(Method.ZOH)
    a, dt = np.array([-1e-3, -2.0]), np.array([1e-12, 1e-15])
    _, bbar, _ = evaluate(d, dt, a)
    # bbar = dt (1 + a dt / 2 + ...): exp(x) - 1 would be wrong from the 4th digit on here.
    np.testing.assert_allclose(bbar, dt * (1 + a * dt / 2), rtol=1e-15)
    assert stable_form(d.bbar) == expm1(d.a * DT) / d.a


def test_evaluate_elementwise_shapes_dtypes_and_zero(seed):
    rng = np.random.default_rng(seed)
    d = discretize(F.mamba1(method=Method.ZOH))
    dt = rng.uniform(1e-3, 1, (3, 1, 5))
    a = _random_real_a(rng, (4, 1))
    a[1, 0] = 0.0
    abar, bbar, bbar_prev = evaluate(d, dt, a)
    assert abar.shape == bbar.shape == bbar_prev.shape == (3, 4, 5)
    assert abar.dtype == np.float64 and np.all(bbar_prev == 0)
    np.testing.assert_allclose(abar, np.exp(a * dt), rtol=1e-14)
    np.testing.assert_allclose(bbar[:, 1, :], dt[:, 0, :], rtol=1e-15)  # the a -> 0 limit
    assert np.all(np.isfinite(bbar))
    dc = discretize(F.s5(method=Method.TRAPEZOIDAL))
    ac = a + 1j
    abar_c, bbar_c, prev_c = evaluate(dc, dt, ac)
    assert abar_c.dtype == bbar_c.dtype == prev_c.dtype == np.complex128
    np.testing.assert_allclose(prev_c, dt / 2 * np.exp(ac * dt), rtol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_split_complex_matches_complex_evaluation(method, seed):
    rng = np.random.default_rng(seed)
    d = derive_elementwise(method, complex_a=True)
    a = _random_real_a(rng, 50) + 1j * rng.normal(0, 5, 50)
    dt = rng.uniform(1e-3, 2, 50)
    ref = evaluate(d, dt, a)
    for expr, want in zip((d.abar, d.bbar, d.bbar_prev), ref):
        re, im = split_complex(expr)
        assert not re.has(sp.I) and not im.has(sp.I)
        f = sp.lambdify(("dt", "a_re", "a_im"), [re, im], modules="numpy")
        got_re, got_im = (np.broadcast_to(v, dt.shape) for v in f(dt, a.real, a.imag))
        np.testing.assert_allclose(got_re + 1j * got_im, want, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Matrix forms (dense, DPLR)

def test_matrix_derivation_gives_the_expected_structure():
    abar, bbar, prev = derive_matrix(Method.ZOH)
    n = A_MATRIX.shape[0]
    assert abar == MatrixExp(DT * A_MATRIX)
    assert (bbar - sp.Inverse(A_MATRIX) * (MatrixExp(DT * A_MATRIX) - sp.Identity(n))).doit().expand() \
        .doit().is_ZeroMatrix
    assert prev.is_ZeroMatrix
    abar, bbar, _ = derive_matrix(Method.BILINEAR)
    lhs = sp.Identity(n) - DT / 2 * A_MATRIX
    assert abar == sp.MatMul(sp.Inverse(lhs), sp.Identity(n) + DT / 2 * A_MATRIX).doit()
    assert bbar == (DT * sp.Inverse(lhs)).doit()


def dplr(rng, batch, n, r, complex_lambda=False):
    lam = -np.exp(rng.uniform(-2, 1, (batch, n)))
    if complex_lambda:
        lam = lam + 1j * rng.normal(0, 3, (batch, n))
    P, Q = rng.normal(0, 0.4, (2, batch, r, n))
    return np.einsum("bn,nm->bnm", lam, np.eye(n)) - np.einsum("brn,brm->bnm", P, Q)


@pytest.mark.parametrize("structure", [AStructure.DPLR, AStructure.DENSE])
def test_matrix_zoh_against_expm_and_block_exponential(structure, seed):
    rng = np.random.default_rng(seed)
    batch, n, m = 6, 5, 3
    A = dplr(rng, batch, n, 2) if structure is AStructure.DPLR else rng.normal(0, 0.7, (batch, n, n))
    B = rng.normal(size=(batch, n, m))
    dt = rng.uniform(0.01, 1.5, batch)
    fam = F.s4_dplr(method=Method.ZOH) if structure is AStructure.DPLR else F.dense(method=Method.ZOH)
    d = discretize(fam)
    assert d.structure is structure and is_matrix(d)
    abar, bbar, prev = evaluate(d, dt, A)
    assert abar.shape == bbar.shape == prev.shape == (batch, n, n) and abar.dtype == np.float64
    for i in range(batch):
        np.testing.assert_allclose(abar[i], scipy.linalg.expm(dt[i] * A[i]), rtol=1e-12, atol=1e-14)
        # exp([[A, B], [0, 0]] dt) = [[exp(A dt), int_0^dt exp(A s) ds B], [0, I]]
        block = np.zeros((n + m, n + m))
        block[:n, :n], block[:n, n:] = A[i], B[i]
        want = scipy.linalg.expm(dt[i] * block)[:n, n:]
        np.testing.assert_allclose(bbar[i] @ B[i], want, rtol=1e-10, atol=1e-12)
    assert np.all(prev == 0)


def rk4_step(A, Bu, h0, dt, steps=400):
    h, k = h0.copy(), dt / steps
    for _ in range(steps):
        k1 = A @ h + Bu
        k2 = A @ (h + k / 2 * k1) + Bu
        k3 = A @ (h + k / 2 * k2) + Bu
        k4 = A @ (h + k * k3) + Bu
        h = h + k / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return h


# Local error order of each method on h' = A h + B u with the input held over the step.
ORDER = {Method.ZOH: None, Method.EULER: 2, Method.EXP_EULER: 2, Method.BILINEAR: 3,
         Method.TRAPEZOIDAL: 3}


@pytest.mark.parametrize("method", METHODS)
def test_matrix_methods_against_rk4(method, seed):
    rng = np.random.default_rng(seed)
    n = 4
    A = dplr(rng, 1, n, 1)[0]
    B, h0, u = rng.normal(size=(n, 2)), rng.normal(size=n), rng.normal(size=2)
    d = discretize(F.s4_dplr(state=n, method=method))

    def step_error(dt):
        abar, bbar, prev = evaluate(d, dt, A)
        h1 = abar @ h0 + bbar @ B @ u + prev @ B @ u   # held input: u_prev = u_next
        return np.linalg.norm(h1 - rk4_step(A, B @ u, h0, dt)) / np.linalg.norm(h0)

    if ORDER[method] is None:   # exact for held input
        assert step_error(0.7) < 1e-11
    else:
        e1, e2 = step_error(0.02), step_error(0.01)
        assert 0.6 * 2 ** ORDER[method] < e1 / e2 < 1.5 * 2 ** ORDER[method], (e1, e2)


@pytest.mark.parametrize("method", METHODS)
def test_matrix_forms_are_the_elementwise_forms_on_eigenvalues(method, seed):
    """f(A) = V f(Λ) V⁻¹: the noncommutative derivation agrees with the scalar one for all methods."""
    rng = np.random.default_rng(seed)
    A = dplr(rng, 3, 5, 2, complex_lambda=True)
    dt = rng.uniform(0.05, 1.0, 3)
    lam, V = np.linalg.eig(A)
    elem = evaluate(derive_elementwise(method, complex_a=True), dt[:, None], lam)
    mat = evaluate(discretize(F.dense(state=5, method=method)), dt, A)
    for name, e, m in zip(("abar", "bbar", "bbar_prev"), elem, mat):
        want = V @ (e[..., None] * np.linalg.inv(V))
        np.testing.assert_allclose(m, want, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_matrices_reduce_to_elementwise(method, seed):
    rng = np.random.default_rng(seed)
    n = 6
    for complex_a in (False, True):
        lam = _random_real_a(rng, (2, n)) + (1j * rng.normal(0, 4, (2, n)) if complex_a else 0)
        dt = rng.uniform(1e-3, 3, 2)
        mat = evaluate(discretize(F.dense(state=n, method=method)), dt, lam[..., None] * np.eye(n))
        elem = evaluate(derive_elementwise(method, complex_a), dt[:, None], lam)
        for m, e in zip(mat, elem):
            np.testing.assert_allclose(np.diagonal(m, axis1=-2, axis2=-1), e, rtol=1e-11, atol=1e-14)
            off = m - np.einsum("bi,ij->bij", np.diagonal(m, axis1=-2, axis2=-1), np.eye(n))
            assert np.max(np.abs(off)) < 1e-12


def test_matrix_stability(seed):
    rng = np.random.default_rng(seed)
    A = dplr(rng, 8, 6, 1)
    A = A - (np.max(np.linalg.eigvals(A).real, axis=-1) + 0.05)[:, None, None] * np.eye(6)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 8))
    for method in (Method.ZOH, Method.BILINEAR, Method.EXP_EULER, Method.TRAPEZOIDAL):
        abar = evaluate(discretize(F.dense(state=6, method=method)), dt, A)[0]
        assert np.max(np.abs(np.linalg.eigvals(abar))) < 1, method.value


def test_evaluate_matrix_broadcasts_batches(seed):
    rng = np.random.default_rng(seed)
    A = dplr(rng, 3, 4, 1)
    dt = rng.uniform(0.1, 1, (2, 3))
    abar, bbar, _ = evaluate(discretize(F.dense(state=4, method=Method.BILINEAR)), dt, A)
    assert abar.shape == (2, 3, 4, 4)
    i = np.eye(4)
    np.testing.assert_allclose(abar[1, 2], np.linalg.solve(i - dt[1, 2] / 2 * A[2], i + dt[1, 2] / 2 * A[2]))
    with pytest.raises(ValueError, match="n, n"):
        evaluate(discretize(F.dense()), dt, A[..., :3])


# ---------------------------------------------------------------------------------------------
# The pass and its summary

def test_discretize_every_family_keeps_its_structure():
    cases = [(F.mamba2(), AStructure.SCALAR), (F.mamba1(), AStructure.DIAGONAL),
             (F.s4d(), AStructure.DIAGONAL), (F.s5(), AStructure.COMPLEX_DIAGONAL),
             (F.s4_dplr(), AStructure.DPLR), (F.dense(), AStructure.DENSE)]
    for fam, structure in cases:
        d = discretize(fam)
        assert isinstance(d, Discretized) and d.structure is structure and d.method is fam.method
        assert is_matrix(d) == (structure in (AStructure.DPLR, AStructure.DENSE))
        assert d.a == (A_MATRIX if is_matrix(d) else
                       A_COMPLEX if structure is AStructure.COMPLEX_DIAGONAL else A_REAL)


def test_describe_names_the_math():
    text = describe(F.mamba2(method=Method.ZOH, clamp=(1e-3, 0.1)))
    assert "zoh" in text and "scalar per head" in text
    assert "Δ_t = clamp(softplus(dt_t + dt_bias), 0.001, 0.1)" in text
    assert "np.expm1(" in text and "tl.exp(" in text and "expm1f(" in text
    text = describe(F.s5(method=Method.TRAPEZOIDAL))
    assert "B̄₋" in text and "Δ = delta" in text and "a_re" in text
    text = describe(F.s4_dplr())
    assert "Pᵀ Q" in text and "np.linalg.solve(" in text and "triton cannot print" in text


# ---------------------------------------------------------------------------------------------
# The Δ map and the derived forms the pass attaches

def delta_specs():
    """Every combination of the Δ map's optional terms (clamp: none, both ends, lower only)."""
    from ssmc.ir import DeltaSpec
    return [DeltaSpec(bias=b, softplus=s, clamp=c) for b in (False, True) for s in (False, True)
            for c in (None, (1e-3, 0.1), (0.5, float("inf")))]


def delta_by_hand(spec, raw, bias):
    """Δ written from the math, float64: x = raw (+ bias); log1p(exp(x)); min(max(x, lo), hi)."""
    x = raw + bias if spec.bias else raw
    if spec.softplus:
        x = np.log1p(np.exp(x))
    if spec.clamp is not None:
        x = np.minimum(np.maximum(x, spec.clamp[0]), spec.clamp[1])
    return x


@pytest.mark.parametrize("spec", delta_specs(), ids=str)
def test_delta_map_evaluates_to_the_math(spec, seed):
    from ssmc.discretize import DT_BIAS, DT_RAW, delta_map, evaluate_delta
    from ssmc.functions import Clamp, Softplus
    expr = delta_map(spec)
    assert expr.has(DT_BIAS) == spec.bias and expr.has(Softplus) == spec.softplus
    assert expr.has(Clamp) == (spec.clamp is not None)
    disc = discretize(F.mamba1(softplus=spec.softplus, bias=spec.bias, clamp=spec.clamp))
    assert disc.delta == expr and disc.dt_raw is DT_RAW and disc.dt_bias is DT_BIAS
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.uniform(-30, 30, 500), [-30.0, 0.0, 19.9, 20.1, 30.0]])
    bias = rng.uniform(-3, 3, raw.shape)
    assert np.allclose(evaluate_delta(disc, raw, bias), delta_by_hand(spec, raw, bias),
                       rtol=1e-12, atol=0)
    # A bias that is absent at call time drops its term.
    assert np.allclose(evaluate_delta(disc, raw), delta_by_hand(spec, raw, 0.0), rtol=1e-12, atol=0)
    # sympy's own numeric evaluation (evalf) agrees too.
    for r, b in zip(raw[:5], bias[:5]):
        got = float(sp.N(expr.subs({DT_RAW: float(r), DT_BIAS: float(b)}), 30))
        assert got == pytest.approx(float(delta_by_hand(spec, r, b)), rel=1e-13)


def test_derived_log_decay_prev_input_and_split():
    for m in METHODS:
        d = derive_elementwise(m)
        assert sp.simplify(sp.exp(d.log_decay) - d.abar) == 0, m
        if m is Method.TRAPEZOIDAL:
            assert sp.simplify(d.prev_input * d.abar - d.bbar_prev) == 0
        else:
            assert d.prev_input is None
        assert d.split is None
        c = derive_elementwise(m, complex_a=True)
        assert c.split == tuple(split_complex(e) for e in (c.abar, c.bbar, c.bbar_prev))
    # exp-type methods have the closed form a*dt (no log of a product to underflow).
    assert derive_elementwise(Method.ZOH).log_decay == A_REAL * DT
    dense = discretize(F.dense())
    assert dense.log_decay is None and dense.prev_input is None and dense.delta is not None
