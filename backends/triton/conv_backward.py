"""Generator of the convolution's backward (LTI, real and complex diagonal A), appended to the
conv module (``conv.generate``) as ``backward(dout, dlast, **arguments)``.

The forward is y = gate(z) (K * x + m Re Σ_n C_n h0_n Ā_n^(t+1) + D x) with
K_k = m Re Σ_n C_n (w_n Ā_n^k + w₋_n Ā_n^(k-1) [k >= 1]), w = B̄ B, w₋ = B̄₋ B (the
trapezoidal rule's previous-input term) and m = 2 for complex-diagonal A (conjugate pairs),
else 1; the final state is h_T = Ā^L h0 + w R + w₋ R₋ with R = Σ_s x_s Ā^(L-1-s) and
R₋ = Σ_(s<=L-2) x_s Ā^(L-2-s).
Every Ā-polynomial the gradients need has the form Σ_k c_k Ā^k for a real sequence c, so one
generated Triton kernel serves them all, the adjoint of the forward's Vandermonde kernel:

    ``_moments(c)``: S(Ā) = Σ_k c_k Ā^k and S'(Ā) = Σ_k k c_k Ā^(k-1), per (row, state),

with powers as exp(k λ) like the forward (λ = log Ā, or the exponent of Ā where the method's Ā
is an exponential): every k is independent, nothing is a running product over the sequence.
The backward (``backward``, host launcher):

1. the output before the gate from the forward's own pieces; the gate's gradient and
   dy_lin = dy gate(z), both printed from the pass (``Derivatives.gate``, ``gate_dz``); dD;
2. torch's FFT (float64): dK_k = Σ_b Σ_t dy_lin_t x_(t-k) and dx += Σ_t dy_lin_t K_(t-k)
   (correlations, zero-padded to 2L), dx += D dy_lin;
3. the moments of dK₊ = dK_(k>=1) give Q = Σ_(k>=1) dK_k Ā^(k-1), Q' and P = dK_0 + Ā Q,
   P' = Q + Ā Q', so that ∂/∂C = m (w P + w₋ Q), ∂/∂w = m C P, ∂/∂w₋ = m C Q and
   ∂/∂Ā = m C (w P' + w₋ Q'); the moments of dy_lin (Y, Y') give the initial state's terms
   (Σ_t dy_lin_t Ā^(t+1) = Ā Y), those of the reversed inputs the final state's (R, R₋);
   the final state's share of dx is the forward's own Vandermonde kernel with C replaced by
   the final state's gradient;
4. the partials in Ā, B̄, B̄₋ reach Δ and A through ``plan.disc.derivatives`` (sympy, printed
   here in float64 torch like the forward's coefficients), Δ's map (softplus, bias, clamp)
   through its derivative ``delta_raw``.

Complex values: the partials are the holomorphic ones (∂L/∂w for L = Re of a holomorphic
expression in w); torch's gradients are their conjugates. Memory: nothing per token and
state; per (sequence, channel, state) partials only.

Not generated (``supports_backward`` says so): DPLR and dense A, whose Ā is formed from the
matrix on the host.
"""
from __future__ import annotations

from typing import Optional

import sympy as sp

from ssmc import printers
from ssmc.discretize import without_bias
from ssmc.ir import AStructure, KernelPlan

from . import codegen


def supports_backward(plan: KernelPlan) -> Optional[str]:
    """None when the conv's backward is generated for ``plan``, else why not."""
    f = plan.family
    if f.A.structure not in (AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        return ("the Triton conv's backward is generated for real and complex diagonal A, not "
                f"{f.A.structure.value} A (Ā is formed from the matrix on the host, whose "
                "adjoint is not generated)")
    if plan.disc.derivatives is None:
        return "the plan carries no derivatives of its discretization"
    if f.gate is not None and plan.disc.derivatives.gate_dz is None:
        return f"the pass derives no derivative of the {f.gate.kind} gate"
    return None


def _torch(expr, names) -> str:
    """``expr`` as float64 torch text (expm1 where exp(x) - 1 would cancel)."""
    printer = printers.TorchPrinter(names=names, dtype="float64")
    expr = sp.sympify(expr)
    printer.check(expr)
    return printer.doprint(printers.stable_form(expr))


MOMENTS = '''

@triton.jit
def {name}(
        s0_ptr, s1_ptr, lam_ptr, c_ptr, n_rows, n_channels, length,
        N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # The adjoint of the Vandermonde kernel for one state element n and BLOCK_R rows r
    # (channel r % d), Abar = exp(lam[r % d, n]), complex values as (re, im) pairs:
    #   s0[r, n] = sum_k c[r, k] Abar^k,   s1[r, n] = sum_k k c[r, k] Abar^(k - 1)
    # Powers as exp(k lam) like the forward: every k independent, no running product.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1)
    r_ok = rows < n_rows
    rl = tl.minimum(rows, n_rows - 1).to(tl.int64)
    ch = rl % n_channels
    lam_re = tl.load(lam_ptr + (ch * N + n) * 2) * {log2e!r}
    lam_im = tl.load(lam_ptr + (ch * N + n) * 2 + 1)
    s0_re = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    s0_im = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    s1_re = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    s1_im = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        c = tl.load(c_ptr + rl[:, None] * length + ks[None, :],
                    mask=r_ok[:, None] & (ks < length)[None, :], other=0.0)
        kf = ks.to(tl.float32)
        # the k = 0 term of s1 is zero: its power is taken at k - 1 = 0 (Abar^-1 can overflow)
        km = tl.maximum(kf - 1.0, 0.0)
        ck = c * kf[None, :]
{body}
    out = (rl * N + n) * 2
    tl.store(s0_ptr + out, tl.sum(s0_re, axis=1), mask=r_ok)
    tl.store(s0_ptr + out + 1, tl.sum(s0_im, axis=1), mask=r_ok)
    tl.store(s1_ptr + out, tl.sum(s1_re, axis=1), mask=r_ok)
    tl.store(s1_ptr + out + 1, tl.sum(s1_im, axis=1), mask=r_ok)
'''

_BODY_COMPLEX = '''\
        mag = tl.exp2(kf[None, :] * lam_re[:, None])
        ang = kf[None, :] * lam_im[:, None]
        s0_re += c * mag * _cos(ang)
        s0_im += c * mag * _sin(ang)
        mag1 = tl.exp2(km[None, :] * lam_re[:, None])
        ang1 = km[None, :] * lam_im[:, None]
        s1_re += ck * mag1 * _cos(ang1)
        s1_im += ck * mag1 * _sin(ang1)'''

# Real Abar > 0: lam is real, the sums are real (s0_im, s1_im stay 0)
_BODY_REAL = '''\
        s0_re += c * tl.exp2(kf[None, :] * lam_re[:, None])
        s1_re += ck * tl.exp2(km[None, :] * lam_re[:, None])'''


LAUNCHER = '''

# How backward allocates the kernels' outputs (a test fills them with NaN).
EMPTY = torch.empty
COMPLEX_A = {cplx}


def _moments(lam, c):
    """(S, S') (rows, n) with S = sum_k c[r, k] Abar^k, S' = sum_k k c[r, k] Abar^(k - 1) for
    the real sequences c (rows, length), Abar = exp(lam[r % d]) (Triton, fp32); complex128, or
    float64 (their real parts) for real A."""
    rows, length = c.shape
    s0 = EMPTY((rows, N, 2), device=c.device, dtype=torch.float32)
    s1 = EMPTY((rows, N, 2), device=c.device, dtype=torch.float32)
    if rows > 0:
        lam2 = torch.view_as_real(lam.to(torch.complex64)).contiguous()
        grid = (triton.cdiv(rows, CONFIG["block_r"]), N)
        c = c.to(torch.float32).contiguous()
        {moments}[grid](s0, s1, lam2, c, rows, lam.shape[0], length, N=N,
            BLOCK_R=CONFIG["block_r"], BLOCK_K=CONFIG["block_k"], num_warps=CONFIG["num_warps"])
    s0, s1 = (torch.view_as_complex(s.to(torch.float64)) for s in (s0, s1))
    return (s0, s1) if COMPLEX_A else (s0.real, s1.real)


def _correlate(g, h):
    """c[..., k] = sum_t g[..., t] h[..., t - k] for k < L (float64 FFT zero-padded to 2L):
    the adjoint of _fft_conv in either argument."""
    L = g.shape[-1]
    n = 2 * L
    gf = torch.fft.rfft(g.to(torch.float64), n=n)
    hf = torch.fft.rfft(h[..., :L].to(torch.float64), n=n)
    return torch.fft.irfft(gf * hf.conj(), n=n)[..., :L]


def _per_sequence(t, segments, length, reverse=False):
    """(sequences, d, length) float64: each sequence's tokens of t (time-reversed when asked),
    zero-padded."""
    if len(segments) == 1 and segments[0][2] == slice(None):   # the batch, one length
        t = t.to(torch.float64)
        return t.flip(-1) if reverse else t
    out = torch.zeros((len(segments), t.shape[1], length), device=t.device, dtype=torch.float64)
    for i, (s0, s1, _) in enumerate(segments):
        piece = t[0, :, s0:s1].to(torch.float64)
        out[i, :, :s1 - s0] = piece.flip(-1) if reverse else piece
    return out


def _chain(co, g_abar, g_bbar, g_bprev):
    """dL/dDelta (d,) and the holomorphic dL/da (d, n) from the partials in Abar, Bbar, Bbar'
    (printed from the plan's derivatives, float64)."""
    dt_, a_ = co["dt"], co["a"]
{chain}


def _delta_slope(delta, delta_bias):
    """dDelta/d(delta) = dDelta/d(delta_bias) per channel, printed from the plan's Delta map."""
    dt_raw = delta.to(torch.float64)
{slope}


def backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None,
             initial_state=None, cu_seqlens=None, P=None, Q=None, **_):
    """Gradients of {name}'s (y, last_state) given dout and dlast (None: zero), keyed by argument
    name: per-token ones in their input's dtype, the rest float32 (complex64 for complex A)."""
    batch, d, L = u.shape
    f64 = torch.float64
    co = _coefficients(delta, A, B, C, delta_bias, P, Q, d)
    cplx = A.is_complex()
    segments = _segments(cu_seqlens, L)
    nseq = len(segments) if cu_seqlens is not None else batch
    lengths = [s1 - s0 for s0, s1, _ in segments] if cu_seqlens is not None else [L] * batch
    longest = max(lengths, default=0)
    x = u.float()
    K = _conv_kernel(co, L) if L > 0 else None
    # 1. the output before the gate, the gate's gradient, dy_lin and dD
    pre = _before_gate(co, u, initial_state, segments, K)
    if D is not None:
        pre = pre + D.float()[:, None] * x
    dy = dout.float()
    grads = {{}}
    if z is not None:
        z_ = z.float()
{gate}
        grads["z"] = (dy * pre * dgate_dz).to(z.dtype)
        dy = dy * gate
    du = D.float()[:, None] * dy if D is not None else torch.zeros_like(dy)
    if D is not None:
        grads["D"] = (dy.to(f64) * x.to(f64)).sum((0, 2)).float()
    # 2. dK and the convolution's share of du: correlations by FFT
    dK = torch.zeros((d, max(longest, 1)), device=u.device, dtype=f64)
    for s0, s1, _ in segments:
        if s1 > s0:
            dK[:, :s1 - s0] += _correlate(dy[..., s0:s1], x[..., s0:s1]).sum(0)
            du[..., s0:s1] += _correlate(dy[..., s0:s1], K[:, :s1 - s0]).float()
    # 3. the Abar-polynomials: K's adjoint (P, Q), the initial state's (Y), the final state's (R)
    abar, w, wp, Cd = co["abar"], co["w"], co["wp"], co["Cd"]
    mc = co["pair"] * Cd
    q, q1 = _moments(co["lam"], dK[:, 1:])
    p, p1 = dK[:, :1] + abar * q, q + abar * q1
    g_abar, g_w, g_c = mc * w * p1, mc * p, co["pair"] * w * p
    if wp is not None:
        g_abar, g_wp, g_c = g_abar + mc * wp * q1, mc * q, g_c + co["pair"] * wp * q
    dh0 = 0.0
    if initial_state is not None:
        h0 = initial_state.to(Cd.dtype)
        y0, y1 = (s.reshape(nseq, d, N) for s in _moments(
            co["lam"], _per_sequence(dy, segments, longest).reshape(nseq * d, longest)))
        # sum_t dy_lin_t Abar^(t+1) = Abar Y, and its derivative in Abar
        zr, zr1 = abar * y0, y0 + abar * y1
        dh0 = mc * zr
        g_c = g_c + co["pair"] * (h0 * zr).sum(0)
        g_abar = g_abar + mc * (h0 * zr1).sum(0)
    if dlast is not None:
        G = dlast.conj().to(Cd.dtype) if cplx else dlast.to(f64)   # dL/dh_T, holomorphic
        rev = _per_sequence(x, segments, longest, reverse=True)     # rev[j] = x_(L-1-j)
        # R- = sum_j rev_(j+1) Abar^j; R = rev_0 + Abar R-
        rm, rm1 = (s.reshape(nseq, d, N) for s in _moments(
            co["lam"], rev[..., 1:].reshape(nseq * d, max(longest - 1, 0))))
        r0 = rev[..., :1] if longest > 0 else rev.new_zeros(rev.shape[:-1] + (1,))
        r, r1 = r0 + abar * rm, rm + abar * rm1
        n_t = torch.tensor(lengths, device=u.device, dtype=f64)[:, None, None]
        lam = co["lam"]
        pw = torch.exp(n_t * lam)                                    # Abar^L
        dpw = torch.where(n_t > 0, n_t * torch.exp((n_t - 1).clamp(min=0) * lam), 0.0)
        if not cplx:
            pw, dpw = pw.real, dpw.real
        start = initial_state.to(Cd.dtype) if initial_state is not None else 0.0
        g_abar = g_abar + (G * (dpw * start + w * r1)).sum(0)
        g_w = g_w + (G * r).sum(0)
        if wp is not None:
            g_abar = g_abar + (G * wp * rm1).sum(0)
            g_wp = g_wp + (G * rm).sum(0)
        dh0 = dh0 + G * pw
        if longest > 0:
            # du_s += Re sum_n G (w Abar^(L-1-s) + w- Abar^(L-2-s)): the forward's Vandermonde
            rows = nseq * d
            share = _vandermonde(lam, (G * w).reshape(rows, N), rows, longest, 0)
            if wp is not None and longest > 1:
                share[:, 1:] += _vandermonde(lam, (G * wp).reshape(rows, N), rows, longest - 1, 0)
            share = share.reshape(nseq, d, longest)
            if cu_seqlens is None:
                du += share.flip(-1)
            else:
                for i, (s0, s1, _) in enumerate(segments):
                    du[0, :, s0:s1] += share[i, :, :s1 - s0].flip(-1)
    # 4. through Bbar, Bbar' and B; then Delta and A through the plan's derivatives
    g_bbar = g_w * co["Bd"]
    g_bprev = g_wp * co["Bd"] if wp is not None else None
    g_b = g_w * co["bbar"] + (g_wp * co["bbar_prev"] if wp is not None else 0.0)
    g_dt, g_a = _chain(co, g_abar, g_bbar, g_bprev)
    g_dt = g_dt * _delta_slope(delta, delta_bias)
    grads["u"] = du.to(u.dtype)
    grads["delta"] = g_dt.float()
    if delta_bias is not None:
        grads["delta_bias"] = g_dt.float()
    grads["A"] = _as_gradient(g_a, A)
    for name, g, t in (("B", g_b, B), ("C", g_c, C)):
        if t.shape[0] != d:   # a group's channels share one row
            g = g.reshape(t.shape[0], d // t.shape[0], N).sum(1)
        grads[name] = _as_gradient(g, t)
    if initial_state is not None:
        grads["initial_state"] = _as_gradient(dh0, initial_state)
    return grads


def _as_gradient(g, t):
    """torch's gradient of a real loss for tensor t from the holomorphic partial g."""
    if t.is_complex():
        return g.conj().to(torch.complex64)
    return (g.real if g.is_complex() else g).float()
'''


def _chain_body(plan: KernelPlan) -> str:
    """The lines of ``_chain``: the derivatives of Ā, B̄ (B̄₋) in Δ and a, printed with shared
    subexpressions, and the partials summed through them (zero derivatives drop their term)."""
    der = plan.disc.derivatives
    trap = not codegen.is_zero(plan.disc.bbar_prev)
    pairs = [("abar", "g_abar", der.abar_dt, der.abar_a), ("bbar", "g_bbar", der.bbar_dt,
                                                           der.bbar_a)]
    if trap:
        pairs.append(("bprev", "g_bprev", der.bbar_prev_dt, der.bbar_prev_a))
    exprs = {}
    for key, _, ddt, dda in pairs:
        exprs[f"d{key}_ddt"], exprs[f"d{key}_da"] = ddt, dda
    live = {k: e for k, e in exprs.items() if not codegen.is_zero(e)}
    lines, finals = printers.cse_print(live, "torch", {"dt": "dt_", "a": "a_"}, dtype="float64",
                                       tmp_prefix="t")
    lines += [f"{k} = {finals[k]}" for k in live]
    dt_terms = [f"{g} * d{key}_ddt" for key, g, _, _ in pairs if f"d{key}_ddt" in live]
    a_terms = [f"{g} * d{key}_da" for key, g, _, _ in pairs if f"d{key}_da" in live]
    lines.append(f"g_dt = ({' + '.join(dt_terms) or '0.0 * g_abar'}).real.sum(-1)  # Delta real")
    lines.append(f"g_a = {' + '.join(a_terms) or '0.0 * g_abar'}")
    lines.append("return g_dt, g_a")
    return "\n".join("    " + ln for ln in lines)


def _slope_body(plan: KernelPlan) -> str:
    """The lines of ``_delta_slope``: ∂Δ/∂dt_raw with and without the bias term."""
    expr = sp.sympify(plan.disc.derivatives.delta_raw)
    names = {"dt_raw": "dt_raw", "dt_bias": "bias"}

    def shaped(e):   # a constant slope (no softplus, no clamp) broadcast to delta's shape
        text = _torch(e, names)
        return text if codegen.uses(e, "dt_raw") else f"torch.full_like(dt_raw, {text})"

    full, plain = shaped(expr), shaped(without_bias(expr))
    if full == plain:
        return f"    return {plain}"
    lines = ["if delta_bias is None:", f"    return {plain}",
             "bias = delta_bias.to(torch.float64)", f"return {full}"]
    return "\n".join("    " + ln for ln in lines)


def _gate_lines(plan: KernelPlan) -> str:
    """``gate`` = gate(z) and ``dgate_dz`` = ∂gate/∂z in ``z_`` (fp32 torch), printed from the
    pass with their shared subexpressions (the sigmoid)."""
    der = plan.disc.derivatives
    if der.gate is None:    # no gate in the family: z is never passed
        return "        gate, dgate_dz = 1.0, 0.0"
    lines, finals = printers.cse_print({"gate": der.gate, "dgate_dz": der.gate_dz}, "torch",
                                       {der.gate_z.name: "z_"}, tmp_prefix="s")
    lines += [f"{k} = {v}" for k, v in finals.items()]
    return "\n".join("        " + ln for ln in lines)


def generate(plan: KernelPlan, config: dict, base: str, real_positive: bool) -> str:
    """The moments kernel and ``backward`` for the conv module (after its forward); ``base`` the
    family's name as an identifier, ``real_positive`` the forward's choice of a real kernel."""
    name = f"ssmc_conv_moments_{base}"
    body = MOMENTS.format(name=name, log2e=codegen.LOG2E,
                          body=_BODY_REAL if real_positive else _BODY_COMPLEX)
    launcher = LAUNCHER.format(moments=name, name=plan.family.name, chain=_chain_body(plan),
                               slope=_slope_body(plan), gate=_gate_lines(plan),
                               cplx=plan.family.A.structure is AStructure.COMPLEX_DIAGONAL)
    return body + launcher
