"""Generator of the convolutional mode (LTI families: S4D, S5, S4 DPLR, dense).

An LTI system is a convolution y = K * x with K[k] = C Ā^k B̄ B (+ C Ā^(k-1) B̄' B for the
trapezoidal method). The generated module:

1. evaluates Δ, Ā, B̄, B̄' on the host in float64 with torch expressions printed from the IR
   (``ssmc.printers``, torch dialect: complex and matrix forms included);
2. builds K with a generated Triton kernel:
   - diagonal / complex diagonal: a Vandermonde sum K[r, k] = Σ_n Re(coef[r, n] e^(k λ[n])),
     λ = Δ·a when the method's Ā is an exponential (its exponent, printed from the IR), else
     λ = log Ā (complex log, so negative real Ā of bilinear/Euler are powers too). Real families
     whose Ā is provably positive get a kernel without the cos/sin terms;
   - DPLR / dense: a power iteration v ← Ā v per channel, K[k] = C·v;
3. convolves with torch.fft (zero-padded to 2L), adds D x, the zero-input response of an
   initial state (the same kernels with coef = C h0 and exponents k + 1), and the gate.
The final state, when asked for, is Ā^L h0 + Σ_t Ā^(L-1-t) B̄ B x_t, summed on the host in
float64 chunks. Packed sequences (cu_seqlens) are convolved one by one.

For real and complex diagonal A the module also defines ``backward(dout, dlast, ...)``
(``conv_backward``: the adjoint of the Vandermonde kernel as a second generated kernel, the
FFT correlations in torch); DPLR / dense A have none (``conv_backward.supports_backward``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import sympy as sp

from ssmc.ir import AStructure, KernelPlan, Sharing
from ssmc.plan import plan_limits
from ssmc.printers import print_expr

from . import codegen, conv_backward

WHAT = "convolution (LTI)"

_MATRIX = (AStructure.DPLR, AStructure.DENSE)


def supports(plan: KernelPlan) -> Optional[str]:
    f = plan.family
    limit = plan_limits(plan)
    if limit:
        return limit
    if f.A.structure is AStructure.SCALAR:
        return "conv for scalar A (SSD convention) is not generated; use the chunked algorithm"
    return None


def default_config(plan: KernelPlan) -> dict:
    if plan.family.A.structure in _MATRIX:
        return {"num_warps": 4}
    return {"block_r": 16, "block_k": 64, "num_warps": 4}


def candidates(plan: KernelPlan) -> List[dict]:
    if plan.family.A.structure in _MATRIX:
        return [{"num_warps": w} for w in (1, 2, 4)]
    return [{"block_r": r, "block_k": k, "num_warps": w}
            for r in (8, 16, 32) for k in (32, 64, 128) for w in (2, 4)]


def _exponent(abar):
    """E when abar = exp(E) with E linear in dt (then abar^k = exp(k E)), else None."""
    abar = sp.sympify(abar)
    if isinstance(abar, sp.exp):
        e = abar.args[0]
        k = sp.Symbol("k", positive=True)
        dt = [s for s in e.free_symbols if s.name == "dt"]
        if dt and sp.simplify(e.subs(dt[0], k * dt[0]) - k * e) == 0:
            return e
    return None


VANDERMONDE = '''
@triton.jit
def {name}(out_ptr, lam_ptr, coef_ptr, n_rows, n_channels, seqlen, OFF: tl.constexpr,
           N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[r, k] = sum_n Re(coef[r, n] * exp((k + OFF) * lam[r % d, n])); complex values are
    # (re, im) pairs, powers of A as exp(k * lambda) so every k is independent.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rows < n_rows
    rl = tl.minimum(rows, n_rows - 1).to(tl.int64)
    ch = rl % n_channels
    kf = (ks + OFF).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for n in range(N):
{body}
    out = out_ptr + rl[:, None] * seqlen + ks[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & (ks < seqlen)[None, :])
'''

_BODY_COMPLEX = '''\
        lam_re = tl.load(lam_ptr + (ch * N + n) * 2) * {log2e!r}
        lam_im = tl.load(lam_ptr + (ch * N + n) * 2 + 1)
        c_re = tl.load(coef_ptr + (rl * N + n) * 2)
        c_im = tl.load(coef_ptr + (rl * N + n) * 2 + 1)
        mag = tl.exp2(kf[None, :] * lam_re[:, None])
        ang = kf[None, :] * lam_im[:, None]
        acc += mag * (c_re[:, None] * _cos(ang) - c_im[:, None] * _sin(ang))'''

_BODY_REAL = '''\
        lam_re = tl.load(lam_ptr + (ch * N + n) * 2) * {log2e!r}
        c_re = tl.load(coef_ptr + (rl * N + n) * 2)
        acc += c_re[:, None] * tl.exp2(kf[None, :] * lam_re[:, None])'''

VAND_HOST = '''def _vandermonde(lam, coef, rows, L, off):
    """out[r, k] = sum_n Re(coef[r, n] * exp((k + off) * lam[r % d, n])), in fp32 (Triton)."""
    d = lam.shape[0]
    lam2 = torch.view_as_real(lam.to(torch.complex64)).contiguous()
    coef2 = torch.view_as_real(coef.to(torch.complex64)).contiguous()
    out = _empty((rows, L), lam.device)
    grid = (triton.cdiv(rows, CONFIG["block_r"]), triton.cdiv(L, CONFIG["block_k"]))
    {vand}[grid](out, lam2, coef2, rows, d, L, OFF=off, N=N, BLOCK_R=CONFIG["block_r"],
                 BLOCK_K=CONFIG["block_k"], num_warps=CONFIG["num_warps"])
    return out
'''

POW_HOST = '''def _power_iteration(abar, v0, Cd, rows, L):
    """out[r, k] = C Abar^k v0[r] (Triton), fp32."""
    out = _empty((rows, L), abar.device)
    {powit}[(rows,)](out, abar.to(torch.float32).contiguous(), v0.to(torch.float32).contiguous(),
                     Cd.to(torch.float32).contiguous(), abar.shape[0], L, N=N,
                     NP=triton.next_power_of_2(N), num_warps=CONFIG["num_warps"])
    return out
'''

POWER_ITERATION = '''
@triton.jit
def {name}(out_ptr, abar_ptr, v0_ptr, c_ptr, n_channels, seqlen, N: tl.constexpr,
           NP: tl.constexpr):
    # out[r, k] = C Abar^k v0[r] for one row r (channel r % d): v <- Abar v, k = 0, 1, ...
    r = tl.program_id(0).to(tl.int64)
    ch = r % n_channels
    i = tl.arange(0, NP)
    ok = i < N
    ab = tl.load(abar_ptr + ch * N * N + i[:, None] * N + i[None, :],
                 mask=ok[:, None] & ok[None, :], other=0.0)
    v = tl.load(v0_ptr + r * N + i, mask=ok, other=0.0)
    c = tl.load(c_ptr + ch * N + i, mask=ok, other=0.0)
    for k in range(seqlen):
        tl.store(out_ptr + r * seqlen + k, tl.sum(c * v, axis=0))
        v = tl.sum(ab * v[None, :], axis=1)
'''


def _delta_lines(plan: KernelPlan) -> List[str]:
    """Host float64 Δ, printed from the plan's Δ map (torch); a None bias drops its term."""
    from ssmc.discretize import without_bias
    expr = plan.disc.delta
    lines = ["dt_ = delta.to(f64)"]
    names = {"dt_raw": "dt_", "dt_bias": "delta_bias.to(f64)"}
    full = print_expr(expr, "torch", names, dtype="float64")
    plain = print_expr(without_bias(expr), "torch", names, dtype="float64")
    if full != plain:
        lines += ["if delta_bias is not None:", f"    dt_ = {full}", "else:", f"    dt_ = {plain}"]
    elif plain != "dt_":
        lines.append(f"dt_ = {plain}")
    return lines


LAUNCHER = '''

N = {N}
MATRIX = {matrix}
CONFIG = {config!r}


def _empty(shape, device):
    """fp32 buffers the kernels fill (a test may swap this for a NaN-filled allocator)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _per_channel(t, d, sharing_group):
    """A constant B/C as (d, n): group rows repeated over their channels."""
    if sharing_group and t.shape[0] != d:
        return t.repeat_interleave(d // t.shape[0], dim=0)
    return t


def _coefficients(delta, A, B, C, delta_bias, P, Q, d):
    """float64 host math printed from the IR: Abar-related data, Bbar B, Bbar' B, C."""
    f64 = torch.float64
    cplx = A.is_complex()
    {delta}
    Bd = _per_channel(B, d, {b_group}).to(torch.complex128 if cplx else f64)
    Cd = _per_channel(C, d, {c_group}).to(torch.complex128 if cplx else f64)
{coef_body}


{kernel_host}def _kernel_rows(co, coef_vec, rows, L, off):
    """out[r, k] = Re(C Abar^(k + off) coef_vec[r]) for rows r = (batch x) channel."""
    reps = rows // co["Cd"].shape[0]
    if MATRIX:
        v0 = coef_vec if off == 0 else torch.einsum("rij,rj->ri", co["abar"].repeat(reps, 1, 1),
                                                      coef_vec)
        return _power_iteration(co["abar"], v0, co["Cd"], rows, L)
    return _vandermonde(co["lam"], co["Cd"].repeat(reps, 1) * coef_vec * co["pair"], rows, L, off)


def _conv_kernel(co, L):
    """K (d, L): the response to a unit input, with the trapezoidal previous-input term."""
    d = co["Cd"].shape[0]
    K = _kernel_rows(co, co["w"], d, L, 0)
    if co["wp"] is not None and L > 1:
        Kp = _kernel_rows(co, co["wp"], d, L - 1, 0)
        K[:, 1:] += Kp
    return K


def _fft_conv(x, K):
    """Causal convolution along the last axis, zero-padded to 2L (fp32)."""
    L = x.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(x.float(), n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L]


def _powers(co, k):
    """Abar^k for integer k >= 0 (tensor), float64/complex128, shape (d, n[, n]) x len(k)."""
    lam = co["lam"][..., None]
    return torch.where(k == 0, torch.ones_like(lam), torch.exp(k.to(lam.dtype) * lam))


def _final_state(co, x, h0):
    """Abar^L h0 + sum_t Abar^(L-1-t) (Bbar B x_t + Bbar' B x_(t-1)), float64 on the host."""
    L = x.shape[-1]
    x = x.to(torch.float64)
    if MATRIX:
        h = h0.to(torch.float64).clone()
        xp = x.new_zeros(x.shape[:-1])  # (b, d): no previous input before the first step
        for t in range(L):
            h = torch.einsum("dij,bdj->bdi", co["abar"], h) + co["w"] * x[..., t, None]
            if co["wp"] is not None:
                h = h + co["wp"] * xp[..., None]
            xp = x[..., t]
        return h
    lam = co["lam"]
    h = h0.to(lam.dtype) * _powers(co, torch.tensor([L], device=x.device))[..., 0]
    for t0 in range(0, L, 256):
        ts = torch.arange(t0, min(L, t0 + 256), device=x.device)
        pw = _powers(co, L - 1 - ts)                                   # (d, n, T)
        h = h + co["w"] * torch.einsum("bdt,dnt->bdn", x[..., ts].to(pw.dtype), pw)
        if co["wp"] is not None:
            keep = ts <= L - 2
            pw = _powers(co, (L - 2 - ts).clamp(min=0)) * keep
            h = h + co["wp"] * torch.einsum("bdt,dnt->bdn", x[..., ts].to(pw.dtype), pw)
    return h


def _segments(cu_seqlens, L):
    """(start, end, rows) of each sequence: the whole batch, or each packed piece (row 0)."""
    if cu_seqlens is None:
        return [(0, L, slice(None))]
    offsets = cu_seqlens.tolist()
    return [(offsets[i], offsets[i + 1], slice(i, i + 1)) for i in range(len(offsets) - 1)]


def _before_gate(co, u, initial_state, segments, Kfull):
    """K * u plus the initial state's zero-input response (fp32, u's shape): y before D u and
    the gate."""
    d = u.shape[1]
    y = torch.empty(u.shape, device=u.device, dtype=torch.float32)
    for s0, s1, sl in segments:
        n_t = s1 - s0
        if n_t == 0:
            continue
        ys = _fft_conv(u[..., s0:s1], Kfull[:, :n_t])
        if initial_state is not None:
            h0 = initial_state[sl]
            rows = h0.shape[0] * d
            zi = _kernel_rows(co, h0.reshape(rows, N).to(co["Cd"].dtype), rows, n_t, 1)
            ys = ys + zi.reshape(h0.shape[0], d, n_t)
        y[..., s0:s1] = ys
    return y


def forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
            cu_seqlens=None, return_last_state=False, P=None, Q=None, **_):
    """{name}: y = K * u (+ D u, zero-input response of initial_state, gate); (y, last_state)."""
    batch, d, L = u.shape
    co = _coefficients(delta, A, B, C, delta_bias, P, Q, d)
    cplx = A.is_complex()
    segments = _segments(cu_seqlens, L)
    Kfull = _conv_kernel(co, L) if L > 0 else None
    y = _before_gate(co, u, initial_state, segments, Kfull)
    finals = []
    for s0, s1, sl in segments:
        x = u[..., s0:s1]
        h0 = initial_state[sl] if initial_state is not None else None
        if return_last_state:
            start = h0 if h0 is not None else torch.zeros(
                (x.shape[0], d, N), device=u.device,
                dtype=torch.complex64 if cplx else torch.float32)
            finals.append(_final_state(co, x, start))
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    y = y.to(u.dtype)
    if not return_last_state:
        return y, None
    last = torch.cat(finals, 0)
    return y, (last.to(torch.complex64) if cplx else last.real.to(torch.float32))
'''


def _coef_body(plan: KernelPlan) -> str:
    f = plan.family
    disc = plan.disc
    N = f.dims.state
    lines = []
    if f.A.structure in _MATRIX:
        names = {"dt": "dt_[:, None, None]", "a": "a_", "n": str(N)}
        if f.A.structure is AStructure.DPLR:
            lines.append("a_ = torch.diag_embed(A.to(f64)) - torch.einsum('drn,drm->dnm', "
                         "P.to(f64), Q.to(f64))")
        else:
            lines.append("a_ = A.to(f64)")
        for key in ("abar", "bbar", "bbar_prev"):
            expr = getattr(disc, key)
            if getattr(expr, "is_ZeroMatrix", False):
                lines.append(f"{key} = None")
            else:
                lines.append(f"{key} = {codegen.printers.print_expr(expr, 'torch', names)}")
        lines += ["w = torch.einsum('dij,dj->di', bbar, Bd)",
                  "wp = torch.einsum('dij,dj->di', bbar_prev, Bd) if bbar_prev is not None "
                  "else None",
                  "return dict(abar=abar, w=w, wp=wp, Cd=Cd, lam=None, pair=1.0)"]
    else:
        names = {"dt": "dt_", "a": "a_"}
        lines += ["dt_ = dt_[:, None]",
                  "a_ = A.to(torch.complex128 if cplx else f64)"]
        lines.append(f"abar = ({codegen.printers.print_expr(disc.abar, 'torch', names)})"
                     ".expand(Bd.shape)")
        expo = _exponent(disc.abar)
        if expo is not None:
            lines.append(f"lam = ({codegen.printers.print_expr(expo, 'torch', names)})"
                         ".to(torch.complex128)  # abar = exp(lam): powers are exp(k lam)")
        else:
            lines.append("lam = torch.log(abar.to(torch.complex128))  # abar^k = exp(k log abar)")
            lines.append("lam = torch.complex(lam.real.clamp(min=-1e30), lam.imag)  # abar = 0")
        lines.append("lam = lam.expand(Bd.shape)")
        for key in ("bbar", "bbar_prev"):
            expr = getattr(disc, key)
            if codegen.is_zero(expr):
                lines.append(f"{key} = None")
            else:
                lines.append(f"{key} = {codegen.printers.print_expr(expr, 'torch', names)}")
        lines += ["w = bbar * Bd",
                  "wp = bbar_prev * Bd if bbar_prev is not None else None",
                  "# conjugate pairs: y = 2 Re(C h) for complex-diagonal A",
                  "# and what the backward's chain rule needs (conv_backward.py)",
                  "return dict(lam=lam, w=w, wp=wp, Cd=Cd, pair=2.0 if cplx else 1.0, abar=abar,",
                  "            dt=dt_, a=a_, Bd=Bd, bbar=bbar, bbar_prev=bbar_prev)"]
    return "\n".join("    " + ln for ln in lines)


def generate(plan: KernelPlan, config: dict, notes: Sequence[str] = ()) -> str:
    f = plan.family
    base = "".join(ch if ch.isalnum() else "_" for ch in f.name)
    matrix = f.A.structure in _MATRIX
    vand, powit = f"ssmc_conv_vandermonde_{base}", f"ssmc_conv_power_{base}"
    body = ""
    # Real Ā > 0 (an exponential of a real a): λ is real and the kernels need no cos/sin.
    real_positive = (f.A.structure is AStructure.DIAGONAL and
                     bool(sp.sympify(plan.disc.abar).is_positive))
    if matrix:
        body += POWER_ITERATION.format(name=powit)
    else:
        template = _BODY_REAL if real_positive else _BODY_COMPLEX
        body += VANDERMONDE.format(name=vand, body=template.format(log2e=codegen.LOG2E))
    delta = "\n    ".join(_delta_lines(plan))
    launcher = LAUNCHER.format(
        N=f.dims.state, matrix=matrix, config=dict(config), name=f.name, delta=delta,
        b_group=f.B.sharing is Sharing.GROUP, c_group=f.C.sharing is Sharing.GROUP,
        coef_body=_coef_body(plan),
        kernel_host=(POW_HOST.format(powit=powit) if matrix else VAND_HOST.format(vand=vand)))
    if conv_backward.supports_backward(plan) is None:
        launcher += conv_backward.generate(plan, config, base, real_positive)
    return codegen.module_source(plan, config, WHAT, body + launcher, notes)
