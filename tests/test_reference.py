"""The float64 oracle against independent math: hand-computed cases, exact matrix exponentials,
convolution kernels from matrix powers, plain-loop transcriptions of the Mamba papers' equations.
Never against the oracle itself or any other backend."""
from __future__ import annotations

import cmath
import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import families as F
from conftest import TOL, assert_rel_close, rel_err
from ssmc.backends import reference as R
from ssmc.ir import Algorithm, AStructure, Convention, Method, Sharing
from ssmc.signature import bind, example_inputs

METHODS = list(Method)
NON_TRAPEZOIDAL = [m for m in Method if m is not Method.TRAPEZOIDAL]


def t64(*values):
    return torch.tensor(values, dtype=torch.float32)


def oracle(family, conv, **kwargs):
    return R.run_float64(bind(family, conv, (), kwargs))


# --------------------------------------------------------------------------------------------
# Independent per-method coefficients (written here from the methods' definitions)

def scalar_coefs(method, a, dt):
    """(abar, bbar, bbar_prev) for one scalar/complex a; works for floats and complex."""
    e = cmath.exp(a * dt) if isinstance(a, complex) else math.exp(a * dt)
    return {
        Method.ZOH: (e, (e - 1) / a, 0.0),
        Method.BILINEAR: ((1 + a * dt / 2) / (1 - a * dt / 2), dt / (1 - a * dt / 2), 0.0),
        Method.EULER: (1 + a * dt, dt, 0.0),
        Method.EXP_EULER: (e, dt, 0.0),
        Method.TRAPEZOIDAL: (e, dt / 2, dt / 2 * e),
    }[method]


def matrix_coefs(method, A, dt):
    n = A.shape[0]
    eye = np.eye(n)
    E = scipy.linalg.expm(dt * A)
    if method is Method.ZOH:
        return E, np.linalg.solve(A, E - eye), 0 * eye
    if method is Method.BILINEAR:
        left = eye - dt / 2 * A
        return np.linalg.solve(left, eye + dt / 2 * A), np.linalg.solve(left, dt * eye), 0 * eye
    if method is Method.EULER:
        return eye + dt * A, dt * eye, 0 * eye
    if method is Method.EXP_EULER:
        return E, dt * eye, 0 * eye
    return E, dt / 2 * eye, dt / 2 * E


# --------------------------------------------------------------------------------------------
# Hand-computed cases

def test_euler_by_hand():
    # a = -1, Δ = 0.5, B = C = 1: abar = 1 - 0.5 = 0.5, bbar = 0.5.
    # h = 0.5*1 = 0.5; h = 0.25 + 1 = 1.25; h = 0.625 + 1.5 = 2.125.
    fam = F.mamba1(channels=1, state=1, method=Method.EULER, D=False, gate=False,
                   softplus=False, bias=False)
    y, h = oracle(fam, "selective_scan", u=t64(1, 2, 3).reshape(1, 1, 3),
                  delta=t64(0.5, 0.5, 0.5).reshape(1, 1, 3), A=t64(-1).reshape(1, 1),
                  B=torch.ones(1, 1, 1, 3), C=torch.ones(1, 1, 1, 3))
    assert y.flatten().tolist() == pytest.approx([0.5, 1.25, 2.125], abs=1e-15)
    assert h.flatten().tolist() == pytest.approx([2.125], abs=1e-15)


def _by_hand(method, a_values, dts, xs, Bs, Cs, h0=None):
    """y_t = sum_n C h for the diagonal recurrence, one scalar loop per state element."""
    n = len(a_values)
    h = list(h0) if h0 is not None else [0.0] * n
    prev = [0.0] * n
    ys = []
    for dt, x, b, c in zip(dts, xs, Bs, Cs):
        for i, a in enumerate(a_values):
            abar, bbar, bprev = scalar_coefs(method, a, dt)
            h[i], prev[i] = abar * h[i] + bbar * b[i] * x + bprev * prev[i], b[i] * x
        ys.append(sum(ci * hi for ci, hi in zip(c, h)))
    return ys, h


# Binary fractions, so that the fp32 inputs carry exactly these values.
DTS, XS = [0.125, 0.25, 0.5], [1.0, -2.0, 3.0]
BS = [[1.0, 0.5], [2.0, -1.0], [0.5, 1.0]]
CS = [[0.5, -1.0], [1.5, 2.0], [-1.0, 0.25]]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_diagonal_each_method_by_hand(method):
    fam = F.mamba1(channels=1, state=2, method=method, D=False, gate=False, softplus=False,
                   bias=False)
    y, h = oracle(fam, "selective_scan", u=t64(*XS).reshape(1, 1, 3),
                  delta=t64(*DTS).reshape(1, 1, 3), A=t64(-1, -2).reshape(1, 2),
                  B=torch.tensor(BS).T.contiguous().reshape(1, 1, 2, 3),
                  C=torch.tensor(CS).T.contiguous().reshape(1, 1, 2, 3),
                  initial_state=torch.tensor([[[0.25, -0.5]]]))
    ys, hs = _by_hand(method, [-1.0, -2.0], DTS, XS, BS, CS, h0=[0.25, -0.5])
    assert y.flatten().tolist() == pytest.approx(ys, rel=1e-12)
    assert h.flatten().tolist() == pytest.approx(hs, rel=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_scalar_ssd_each_method_by_hand(method):
    # One head, head_dim 2: both columns share a; column j sees x[:, j].
    fam = F.mamba2(heads=1, head_dim=2, state=2, method=method, D=None, gate=False,
                   softplus=False, bias=False)
    x = torch.tensor([[1.0, 2.0], [-2.0, 0.5], [3.0, -1.0]])
    y, h = oracle(fam, "ssd", x=x.reshape(1, 3, 1, 2), dt=t64(*DTS).reshape(1, 3, 1),
                  A=t64(-1.5), B=torch.tensor(BS).reshape(1, 3, 1, 2),
                  C=torch.tensor(CS).reshape(1, 3, 1, 2), return_final_states=True)
    for j in range(2):
        ys, hs = _by_hand(method, [-1.5, -1.5], DTS, x[:, j].tolist(), BS, CS)
        assert y[0, :, 0, j].tolist() == pytest.approx(ys, rel=1e-12)
        assert h[0, 0, j].tolist() == pytest.approx(hs, rel=1e-12)


@pytest.mark.parametrize("method", [Method.ZOH, Method.BILINEAR, Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
def test_complex_diagonal_by_hand(method):
    # S5-like LTI: constant Δ, complex A, B, C; y = 2 Re(sum_n C h) + D x.
    fam = F.s5(channels=1, state=2, method=method)
    a = [complex(-0.5, 1.0), complex(-0.25, -3.0)]
    b = [complex(1.0, 0.5), complex(-0.5, 2.0)]
    c = [complex(0.3, -1.0), complex(1.0, 0.25)]
    y, h = oracle(fam, "selective_scan", u=t64(*XS).reshape(1, 1, 3), delta=t64(0.25),
                  A=torch.tensor([a], dtype=torch.complex64),
                  B=torch.tensor([b], dtype=torch.complex64),
                  C=torch.tensor([c], dtype=torch.complex64), D=t64(0.5))
    a, b, c = (torch.tensor(v, dtype=torch.complex64).to(torch.complex128).tolist() for v in (a, b, c))
    state, prev, ys = [0j, 0j], [0j, 0j], []
    for x in XS:
        for i in range(2):
            abar, bbar, bprev = scalar_coefs(method, a[i], 0.25)
            state[i], prev[i] = abar * state[i] + bbar * b[i] * x + bprev * prev[i], b[i] * x
        ys.append(2 * sum(ci * hi for ci, hi in zip(c, state)).real + 0.5 * x)
    assert y.flatten().tolist() == pytest.approx(ys, rel=1e-12)
    assert h.flatten().tolist() == pytest.approx(state, rel=1e-12)


def test_D_gate_softplus_bias_clamp_by_hand():
    # Δ = clamp(softplus(dt + bias), 0.05, 0.3); y = (C h + D x) * silu(z), exp-euler, n = 1.
    fam = F.mamba1(channels=2, state=1, clamp=(0.05, 0.3))
    dt = [[-4.0, 0.125, 2.0], [-1.0, -0.5, 0.0]]
    bias, A, D = [0.5, -0.25], [-1.0, -3.0], [2.0, -0.5]
    u = [[1.0, -1.0, 0.5], [0.25, 2.0, -1.5]]
    z = [[0.375, -2.0, 1.0], [5.0, 0.0, -0.625]]
    Bv, Cv = [0.5, 1.5, -1.0], [2.0, -0.5, 1.0]
    y, _ = oracle(fam, "selective_scan", u=torch.tensor(u)[None], delta=torch.tensor(dt)[None],
                  A=torch.tensor(A)[:, None], B=torch.tensor(Bv).reshape(1, 1, 1, 3),
                  C=torch.tensor(Cv).reshape(1, 1, 1, 3), D=torch.tensor(D),
                  z=torch.tensor(z)[None], delta_bias=torch.tensor(bias))
    for ch in range(2):
        h = 0.0
        for t in range(3):
            delta = min(max(math.log1p(math.exp(dt[ch][t] + bias[ch])), 0.05), 0.3)
            h = math.exp(A[ch] * delta) * h + delta * Bv[t] * u[ch][t]
            zt = z[ch][t]
            expect = (Cv[t] * h + D[ch] * u[ch][t]) * zt / (1 + math.exp(-zt))
            assert float(y[0, ch, t]) == pytest.approx(expect, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Matrix A: exact simulation (zoh = expm of the augmented system) and the methods' formulas

def _dense_by_simulation(method, A_mats, delta, u, B, C, D, h0):
    """A_mats (d,n,n); delta, u (d,l); B, C (d,n,l); returns y (d,l), h (d,n). zoh is simulated
    exactly as expm([[A, b],[0, 0]] Δ) with the input held over the step."""
    d, n, l = B.shape
    y, h = np.zeros((d, l)), h0.copy()
    for ch in range(d):
        prev = np.zeros(n)
        for t in range(l):
            bx = B[ch, :, t] * u[ch, t]
            if method is Method.ZOH:
                aug = np.zeros((n + 1, n + 1))
                aug[:n, :n], aug[:n, n] = A_mats[ch], bx
                step = scipy.linalg.expm(aug * delta[ch, t])
                h[ch] = step[:n, :n] @ h[ch] + step[:n, n]
            else:
                abar, bbar, bprev = matrix_coefs(method, A_mats[ch], delta[ch, t])
                h[ch] = abar @ h[ch] + bbar @ bx + bprev @ prev
            prev = bx
            y[ch, t] = C[ch, :, t] @ h[ch] + D[ch] * u[ch, t]
    return y, h


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_dense_against_simulation(method, seed):
    fam = F.dense(channels=3, state=4, method=method)   # selective Δ = softplus(dt), B, C
    kw = example_inputs(fam, "selective_scan", 1, 9, seed=seed, with_state=True)
    y, h = oracle(fam, "selective_scan", **kw)
    f64 = {k: v.double().numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    spread = (3, 4, 9)  # one group: every channel reads the same B_t, C_t
    ye, he = _dense_by_simulation(method, f64["A"], np.logaddexp(0, f64["delta"][0]),
                                  f64["u"][0], np.broadcast_to(f64["B"][0, 0], spread),
                                  np.broadcast_to(f64["C"][0, 0], spread), f64["D"],
                                  f64["initial_state"][0])
    assert_rel_close("y", y[0], ye, "float64")
    assert_rel_close("final state", h[0], he, "float64")


def test_dplr_against_simulation(seed):
    # S4's A = diag(Λ) - Pᵀ Q formed here by hand; zoh simulated exactly.
    fam = F.s4_dplr(channels=3, state=4, rank=2, method=Method.ZOH)
    kw = example_inputs(fam, "selective_scan", 1, 8, seed=seed)
    y, _ = oracle(fam, "selective_scan", **kw)
    lam, P, Q = (kw[k].double().numpy() for k in ("A", "P", "Q"))
    A_mats = np.stack([np.diag(lam[c]) - P[c].T @ Q[c] for c in range(3)])
    d, l = 3, 8
    delta = np.repeat(kw["delta"].double().numpy()[:, None], l, 1)
    B = np.repeat(kw["B"].double().numpy()[:, :, None], l, 2)
    C = np.repeat(kw["C"].double().numpy()[:, :, None], l, 2)
    ye, _ = _dense_by_simulation(Method.ZOH, A_mats, delta, kw["u"].double().numpy()[0], B, C,
                                 kw["D"].double().numpy(), np.zeros((d, 4)))
    assert_rel_close("y", y[0], ye, "float64")


# --------------------------------------------------------------------------------------------
# LTI: y is the causal convolution with K_k = C Ā^k B̄ (+ D x)

def _lti_kernel_output(family, kw):
    """y (d, l) for batch row 0 from matrix powers of Ā, per channel."""
    st = family.A.structure
    u = kw["u"].to(torch.float64).numpy()[0]
    d, l = u.shape
    delta = kw["delta"].double().numpy()
    wide = torch.complex128 if st is AStructure.COMPLEX_DIAGONAL else torch.float64
    A, Bm, Cm = (kw[k].to(wide).numpy() for k in ("A", "B", "C"))
    y = np.zeros((d, l))
    for ch in range(d):
        if st in (AStructure.DENSE, AStructure.DPLR):
            Am = A[ch] if st is AStructure.DENSE else (
                np.diag(A[ch]) - kw["P"].double().numpy()[ch].T @ kw["Q"].double().numpy()[ch])
            abar, bbar, _ = matrix_coefs(family.method, Am, delta[ch])
        else:
            coefs = [scalar_coefs(family.method, complex(a) if st is AStructure.COMPLEX_DIAGONAL
                                  else float(a), delta[ch]) for a in A[ch]]
            abar = np.diag([c[0] for c in coefs])
            bbar = np.diag([c[1] for c in coefs])
        K = np.array([Cm[ch] @ np.linalg.matrix_power(abar, k) @ bbar @ Bm[ch] for k in range(l)])
        K = 2 * K.real if st is AStructure.COMPLEX_DIAGONAL else K.real
        y[ch] = np.convolve(u[ch], K)[:l] + kw["D"].double().numpy()[ch] * u[ch]
    return y


@pytest.mark.parametrize("family", [
    F.s4d(method=Method.ZOH), F.s4d(method=Method.BILINEAR), F.s5(method=Method.ZOH),
    F.s5(method=Method.EULER), F.s4_dplr(), F.s4_dplr(method=Method.ZOH),
    F.dense(selective=False, method=Method.BILINEAR)],
    ids=lambda f: f"{f.name}-{f.method.value}")
def test_lti_equals_convolution(family, seed):
    kw = example_inputs(family, "selective_scan", 1, 24, seed=seed)
    y, _ = oracle(family, "selective_scan", **kw)
    assert_rel_close("y", y[0], _lti_kernel_output(family, kw), "float64", tol=1e-9)


# --------------------------------------------------------------------------------------------
# Mamba semantics, transcribed from the papers' equations as plain torch loops

@pytest.mark.parametrize("groups,bc_3d", [(1, True), (2, False)])
def test_mamba1_selective_scan_semantics(groups, bc_3d, seed):
    fam = F.mamba1(channels=8, state=4, groups=groups)
    kw = example_inputs(fam, "selective_scan", 2, 13, seed=seed, with_state=True)
    if bc_3d:  # mamba_ssm also takes (b, n, l) B/C when there is one group
        kw["B"], kw["C"] = kw["B"][:, 0], kw["C"][:, 0]
    y, last = oracle(fam, "selective_scan", **kw)
    u, delta, A, B, C, D, z, bias, h = (kw[k].double() for k in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"))
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per = 8 // groups
    B, C = B.repeat_interleave(per, 1), C.repeat_interleave(per, 1)     # (b, d, n, l)
    delta = torch.nn.functional.softplus(delta + bias[:, None])
    deltaA = torch.exp(delta[..., None] * A[:, None, :])                # (b, d, l, n)
    deltaB_u = delta[..., None] * B.permute(0, 1, 3, 2) * u[..., None]
    ys = []
    for i in range(u.shape[-1]):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append((h * C[..., i]).sum(-1))
    out = (torch.stack(ys, -1) + D[:, None] * u) * torch.nn.functional.silu(z)
    assert_rel_close("out", y, out, "float64")
    assert_rel_close("last_state", last, h, "float64")


@pytest.mark.parametrize("d_sharing", [Sharing.HEAD, Sharing.HEAD_DIM])
def test_mamba2_ssd_semantics(d_sharing, seed):
    fam = F.mamba2(heads=4, head_dim=3, state=5, groups=2, D=d_sharing, clamp=(0.002, 0.05))
    kw = example_inputs(fam, "ssd", 2, 11, seed=seed, with_state=True)
    y, final = oracle(fam, "ssd", **kw)
    x, dt, A, B, C, D, z, bias, h = (kw[k].double() for k in (
        "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"))
    B, C = B.repeat_interleave(2, 2), C.repeat_interleave(2, 2)          # (b, l, h, n)
    Dx = D[:, None] if D.dim() == 1 else D
    ys = []
    for t in range(x.shape[1]):
        delta = torch.nn.functional.softplus(dt[:, t] + bias).clamp(0.002, 0.05)   # (b, h)
        decay = torch.exp(delta * A)[..., None, None]
        h = decay * h + (delta[..., None] * x[:, t])[..., None] * B[:, t, :, None, :]
        yt = torch.einsum("bhpn,bhn->bhp", h, C[:, t]) + Dx * x[:, t]
        ys.append(yt * torch.nn.functional.silu(z[:, t]))
    assert_rel_close("y", y, torch.stack(ys, 1), "float64")
    assert_rel_close("final_states", final, h, "float64")


# --------------------------------------------------------------------------------------------
# Varlen, state chaining, decode steps

SEQ_FAMILIES = [F.mamba1(), F.mamba2(), F.mamba2(method=Method.TRAPEZOIDAL, selective_A=True),
                F.s5(), F.s4_dplr(), F.dense(method=Method.BILINEAR),
                F.mamba1(method=Method.TRAPEZOIDAL, selective_A=True)]


def _time_slice(family, kw, start, end):
    """The per-token tensors of kw restricted to tokens [start, end)."""
    ssd = family.convention is Convention.SSD
    timed = {"x", "u", "z"} | {k for k, s in (("dt", family.delta), ("delta", family.delta),
                                              ("A", family.A), ("B", family.B), ("C", family.C))
                               if s.selective}
    return {k: (v[:, start:end] if ssd else v[..., start:end]) if k in timed else v
            for k, v in kw.items()}


@pytest.mark.parametrize("family", SEQ_FAMILIES, ids=lambda f: f"{f.name}-{f.method.value}")
def test_varlen_equals_separate_runs(family, seed):
    lengths = [5, 1, 0, 7]
    conv = family.convention
    kw = example_inputs(family, conv, 0, 0, seed=seed, varlen=lengths, with_state=True)
    y, final = oracle(family, conv, **kw)
    state_key = "initial_states" if conv is Convention.SSD else "initial_state"
    offsets = np.cumsum([0] + lengths)
    for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        part = {k: v for k, v in _time_slice(family, kw, s, e).items() if k != "cu_seqlens"}
        part[state_key] = kw[state_key][i:i + 1]
        if e == s:
            assert torch.equal(final[i].to(kw[state_key].dtype), kw[state_key][i]), "empty sequence keeps its state"
            continue
        y_i, f_i = oracle(family, conv, **part)
        piece = y[:, s:e] if conv is Convention.SSD else y[..., s:e]
        assert_rel_close(f"y of sequence {i}", piece, y_i, "float64")
        assert_rel_close(f"final state of sequence {i}", final[i:i + 1], f_i, "float64")


@pytest.mark.parametrize("family", [f for f in SEQ_FAMILIES if f.method is not Method.TRAPEZOIDAL],
                         ids=lambda f: f"{f.name}-{f.method.value}")
def test_state_chaining(family, seed):
    conv = family.convention
    kw = example_inputs(family, conv, 2, 17, seed=seed, with_state=True)
    y, final = oracle(family, conv, **kw)
    first = _time_slice(family, kw, 0, 6)
    second = _time_slice(family, kw, 6, 17)
    y1, mid = oracle(family, conv, **first)
    second["initial_states" if conv is Convention.SSD else "initial_state"] = mid.to(
        kw["initial_states" if conv is Convention.SSD else "initial_state"].dtype)
    # The state passed between the calls is fp32, as a user's would be.
    y2, last = oracle(family, conv, **second)
    assert_rel_close("y", torch.cat([y1, y2], 1 if conv is Convention.SSD else -1), y, "float32")
    assert_rel_close("final state", last, final, "float32")


@pytest.mark.parametrize("family", [F.mamba1(), F.mamba2(), F.mamba2(selective_A=True),
                                    F.mamba1(selective_A=True), F.s4d(), F.s5(), F.s4_dplr(),
                                    F.dense()], ids=lambda f: f.name)
def test_steps_equal_scan(family, seed):
    conv = family.convention
    kw = example_inputs(family, conv, 2, 6, seed=seed, with_state=True)
    y, final = oracle(family, conv, **kw)
    ssd = conv is Convention.SSD
    state_key = "initial_states" if ssd else "initial_state"
    state = kw[state_key].clone()
    kernel = R.build(R.plan_for(family, Algorithm.STEP), {})
    names = {"u": "x", "delta": "dt", "delta_bias": "dt_bias"}
    for t in range(6):
        tok = _time_slice(family, kw, t, t + 1)
        step = {names.get(k, k): (v.squeeze(1) if ssd else v.squeeze(-1)).contiguous()
                if v is not kw.get(k) else v for k, v in tok.items()
                if k not in (state_key, "return_final_states", "return_last_state")}
        before = state.data_ptr()
        y_t, none = kernel(bind(family, "state_update", (), dict(step, state=state)))
        assert none is None and state.data_ptr() == before
        assert_rel_close(f"y at step {t}", y_t, y[:, t] if ssd else y[..., t], "float32")
    assert_rel_close("state after the steps", state, final, "float32")


# --------------------------------------------------------------------------------------------
# The backend interface

def test_kernel_dtypes_and_in_place_cast(seed):
    fam = F.mamba2()
    kw = example_inputs(fam, "ssd", 2, 9, dtype="bfloat16", seed=seed, with_state=True)
    kernel = R.build(R.plan_for(fam), {})
    problem = bind(fam, "ssd", (), kw)
    y, final = kernel(problem)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y64, final64 = R.run_float64(problem)
    assert y64.dtype == torch.float64
    assert rel_err(y, y64) <= TOL["bfloat16"]
    # A bf16 decode cache is updated in place, in its own dtype.
    step = example_inputs(fam, "state_update", 3, 0, dtype="bfloat16", seed=seed)
    step["state"] = step["state"].to(torch.bfloat16)
    problem = bind(fam, "state_update", (), step)
    _, new_state = R.run_float64(problem)
    state = step["state"]
    kernel(problem)
    assert state.dtype == torch.bfloat16
    assert torch.equal(state, new_state.to(torch.bfloat16))


def test_complex_final_state_is_complex64(seed):
    fam = F.s5()
    problem = bind(fam, "selective_scan", (), example_inputs(fam, None, 1, 5, seed=seed,
                                                             with_state=True))
    _, final = R.build(R.plan_for(fam), {})(problem)
    assert final.dtype == torch.complex64


def test_lower_prints_the_discretized_math_and_the_artifact_runs(tmp_path):
    from ssmc.discretize import discretize
    from ssmc.printers import print_expr
    fam = F.mamba1(method=Method.TRAPEZOIDAL, D=False, gate=False)
    plan = R.plan_for(fam)
    assert R.supports(plan) is None and R.candidates(plan) == [{}]
    source = R.lower(plan, R.default_config(plan))
    for expr in (discretize(fam).abar, discretize(fam).bbar_prev):
        assert print_expr(expr, "numpy", {"dt": "dt", "a": "a"}) in source
    (path,) = R.write_artifact(plan, {}, tmp_path)
    spec = importlib.util.spec_from_file_location("artifact", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The written file on its own: one channel, one state element, against the hand loop.
    ones = np.ones((1, 1, 1, 1))
    y, h = module.recurrence(x=np.array([1.0, -2.0, 3.0]).reshape(3, 1, 1),
                             dt=np.full((3, 1, 1), 0.2), dt_bias=np.zeros(1), a=-ones, B=ones,
                             C=ones, D=None, z=None, h0=np.zeros((1, 1, 1)))
    delta = math.log1p(math.exp(0.2))
    ys, hs = _by_hand(Method.TRAPEZOIDAL, [-1.0], [delta] * 3, [1.0, -2.0, 3.0],
                      [[1.0]] * 3, [[1.0]] * 3)
    assert y.flatten().tolist() == pytest.approx(ys, rel=1e-12)
    assert h.flatten().tolist() == pytest.approx(hs, rel=1e-12)


def test_trapezoidal_decode_is_refused():
    fam = F.mamba1(method=Method.TRAPEZOIDAL, algorithm=Algorithm.STEP)
    assert "previous" in R.supports(R.plan_for(fam, Algorithm.STEP))


def test_kernel_refuses_a_problem_of_another_family(seed):
    from ssmc.errors import CallError
    kernel = R.build(R.plan_for(F.mamba1()), {})
    other = F.mamba1(D=False)
    kw = example_inputs(other, None, 1, 4, seed=seed)
    with pytest.raises(CallError, match="built for family"):
        kernel(bind(other, "selective_scan", (), kw))
