"""The convolution algorithm (LTI families): y = K * x by FFT, K generated in TIR.

Three steps per call:

1. ``ssmc_conv_kernel`` (TIR) writes the impulse response K[unit, k] for k < the longest
   sequence: the scan run on a unit impulse, h_0 = Bbar B, h_1 = Abar h_0 + Bbar_prev B,
   h_k = Abar h_{k-1}, K_k = Re(C h_k) (x2 for conjugate pairs). Units are channels, or heads
   for scalar A (K is then shared by head_dim).
2. torch's real FFT computes the causal convolution per sequence (zero-padded to 2L, so no
   wrap-around), in float64: the FFT's error grows with log L and fp32 would spend most of the
   fp32 tolerance on it.
3. ``ssmc_conv_boundary`` (TIR, from the scan generator in "conv" mode) adds the initial
   state's free response, applies D and the gate, and runs the recurrence for the final state
   only when it is asked for.

Matrix A (DPLR, dense): Ā and B̄ B are formed per call on the host in float64 from the plan's
expressions (``ssmc.lti.host_coefficients``, shared with the C target), and
both TIR functions take them in place of Δ, A, B: K by power iteration (h_k = Ā h_{k-1},
K_k = C h_k, one task per channel), the boundary pass with n x n products.

This module generates the TIR; the call (step 2 and the arguments of 1 and 3) is
``launch.ConvRunner``.
"""
from __future__ import annotations

from typing import List

from ssmc.ir import AStructure, KernelPlan, Sharing
from ssmc.lti import has_prev_term, is_matrix_conv

from . import coeffs as co
from . import scan
from .fastmath import MathOptions
from .tir import Writer, delta_expr, epilogue, lanes_for, match_buffer


def default_config(plan: KernelPlan) -> dict:
    cfg = scan.default_config(plan)
    fam = plan.family
    units = fam.dims.heads if fam.A.structure is AStructure.SCALAR else fam.dims.d_inner
    cfg["kernel_lanes"] = lanes_for(units, 16)
    return cfg


def _kernel_generator(plan: KernelPlan, config: dict) -> str:
    fam = plan.family
    ssd = fam.A.structure is AStructure.SCALAR
    cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
    n, G = fam.dims.state, fam.dims.groups
    U = fam.dims.heads if ssd else fam.dims.d_inner
    W = int(config.get("kernel_lanes") or lanes_for(U, 16))
    cp = co.plan_coefficients(plan.disc)
    outs = [o for o in co.OUTPUTS if not cp.is_zero(o)]
    parts = ("_re", "_im") if cplx else ("",)
    cx = (2,) if cplx else ()
    w = Writer()
    w.math = MathOptions.for_config(config)
    args = ["dt_h", "A_h", "B_h", "C_h"] + (["bias_h"] if fam.delta.bias else []) + ["K_h"]
    w("# ssmc CPU convolution kernel generator (generated; see backends/cpu/conv.py)")
    w("@T.prim_func")
    w(f"def ssmc_conv_kernel({', '.join(a + ': T.handle' for a in args)}):")
    w.depth += 1
    w('T.func_attr({"global_symbol": "ssmc_conv_kernel", "tir.noalias": True})')
    w("Lk = T.int64()")
    match_buffer(w, "dt", "dt_h", (U,))
    match_buffer(w, "A", "A_h", ((U,) if ssd else (U, n)) + cx)
    for name, spec in (("B", fam.B), ("C", fam.C)):
        match_buffer(w, name, f"{name}_h", ((G, n) if spec.sharing is Sharing.GROUP else (U, n)) + cx)
    if fam.delta.bias:
        match_buffer(w, "bias", "bias_h", (U,))
    match_buffer(w, "K", "K_h", (U, "Lk"))

    def local(name, shape):
        dims = ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "")
        w(f'{name} = T.alloc_buffer(({dims}), "float32", scope="global")')

    def bc(name, spec, part):
        unit = "(u0 + v)" if spec.sharing is not Sharing.GROUP else f"((u0 + v) // {U // G})"
        return f"{name}[{unit}, s{'' if part is None else f', {part}'}]"

    with w.block(f"for task in T.parallel({U // W}):"):
        w(f"u0: T.let = task * {W}")
        tables = {}
        for o in outs:
            for suf in parts:
                local(f"tab_{o}{suf}", (n, W))
        for nm in ("Bu", "Cu"):
            for suf in parts:
                local(f"{nm}{suf}", (n, W))
        for suf in parts:
            local(f"g{suf}", (n, W))
        local("acc", (W,))
        with w.block(f"for s in T.serial({n}):"):
            with w.block(f"for v in T.vectorized({W}):"):
                env = {"dt": delta_expr(w, plan.disc, "dt[u0 + v]", "bias[u0 + v]")}
                if ssd:
                    env["a"] = "A[u0 + v]"
                elif cplx:
                    env.update(a_re="A[u0 + v, s, 0]", a_im="A[u0 + v, s, 1]")
                else:
                    env["a"] = "A[u0 + v, s]"
                lines: List[str] = []
                vals = co.emit(cp, outs, lines, w.ind, w.names, env, opts=w.math)
                w.extend(lines)
                for o in outs:
                    for suf, text in zip(parts, vals[o] if cplx else (vals[o],)):
                        w(f"tab_{o}{suf}[s, v] = {text}")
                for j, suf in enumerate(parts):
                    part = j if cplx else None
                    w(f"Bu{suf}[s, v] = {bc('B', fam.B, part)}")
                    w(f"Cu{suf}[s, v] = {bc('C', fam.C, part)}")
                    w(f"g{suf}[s, v] = T.float32(0.0)")
        for o in outs:
            tables[o] = tuple(f"tab_{o}{suf}[s, v]" for suf in parts)
        with w.block("for k in T.serial(Lk):"):
            with w.block(f"for v in T.vectorized({W}):"):
                w("acc[v] = T.float32(0.0)")
            with w.block(f"for s in T.serial({n}):"):
                with w.block(f"for v in T.vectorized({W}):"):
                    if cplx:
                        (ar, ai), (br, bi) = tables["abar"], tables["bbar"]
                        gr, gi = "g_re[s, v]", "g_im[s, v]"
                        w(f"dr: T.let = {ar} * {gr} - {ai} * {gi}")
                        w(f"di: T.let = {ar} * {gi} + {ai} * {gr}")
                        w(f"ir_: T.let = {br} * Bu_re[s, v] - {bi} * Bu_im[s, v]")
                        w(f"ii_: T.let = {br} * Bu_im[s, v] + {bi} * Bu_re[s, v]")
                        if "bbar_prev" in tables:
                            pr, pi = tables["bbar_prev"]
                            w(f"pr_: T.let = T.Select(k == 1, {pr} * Bu_re[s, v] - {pi} * Bu_im[s, v], T.float32(0.0))")
                            w(f"pi_: T.let = T.Select(k == 1, {pr} * Bu_im[s, v] + {pi} * Bu_re[s, v], T.float32(0.0))")
                            dr, di = "dr + pr_", "di + pi_"
                        else:
                            dr, di = "dr", "di"
                        w(f"{gr} = T.Select(k == 0, ir_, {dr})")
                        w(f"{gi} = T.Select(k == 0, ii_, {di})")
                        w(f"acc[v] = acc[v] + Cu_re[s, v] * {gr} - Cu_im[s, v] * {gi}")
                    else:
                        nxt = f"{tables['abar'][0]} * g[s, v]"
                        if "bbar_prev" in tables:
                            nxt += f" + T.Select(k == 1, {tables['bbar_prev'][0]} * Bu[s, v], T.float32(0.0))"
                        w(f"g[s, v] = T.Select(k == 0, {tables['bbar'][0]} * Bu[s, v], {nxt})")
                        w("acc[v] = acc[v] + Cu[s, v] * g[s, v]")
            with w.block(f"for v in T.vectorized({W}):"):
                w(f"K[u0 + v, k] = {'T.float32(2.0) * ' if cplx else ''}acc[v]")
    return w.text()


def _matrix_signature(w: Writer, name: str, args: List[str], scalars: str = "") -> None:
    w("@T.prim_func")
    w(f"def {name}({', '.join(a + ': T.handle' for a in args)}{scalars}):")
    w.depth += 1
    w(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')


def _matrix_inputs(w: Writer, plan: KernelPlan) -> List[str]:
    """abar (d, n, n), bbar_B (d, n) [, bbar_prev_B], C (d, n): the host's discretization."""
    d, n = plan.family.dims.d_inner, plan.family.dims.state
    match_buffer(w, "abar", "abar_h", (d, n, n))
    names = ["abar", "bbar_B"] + (["bbar_prev_B"] if has_prev_term(plan) else []) + ["C"]
    for name in names[1:]:
        match_buffer(w, name, f"{name}_h", (d, n))
    return [f"{a}_h" for a in names]


def _local(w: Writer, name: str, size: int) -> None:
    w(f'{name} = T.alloc_buffer(({size},), "float32", scope="global")')


def _matvec(w: Writer, n: int, src: str, dst: str, extra: str = "") -> None:
    """dst = Abar[u] src (+ extra(i)); acc[0] holds each row's sum."""
    with w.block(f"for i in T.serial({n}):"):
        w("acc[0] = T.float32(0.0)")
        with w.block(f"for j in T.serial({n}):"):
            w(f"acc[0] = acc[0] + abar[u, i, j] * {src}[j]")
        w(f"{dst}[i] = acc[0]{extra}")


def _matrix_kernel_generator(plan: KernelPlan, config: dict) -> str:
    """K[u, k] = C_u v_k: v_0 = Bbar B, v_1 = Abar v_0 (+ Bbar_prev B), v_k = Abar v_{k-1}."""
    d, n = plan.family.dims.d_inner, plan.family.dims.state
    w = Writer()
    w("# ssmc CPU convolution kernel generator, matrix A (generated; see backends/cpu/conv.py)")
    args = ["abar_h", "bbar_B_h"] + (["bbar_prev_B_h"] if has_prev_term(plan) else []) + ["C_h", "K_h"]
    _matrix_signature(w, "ssmc_conv_kernel", args)
    w("Lk = T.int64()")
    _matrix_inputs(w, plan)
    match_buffer(w, "K", "K_h", (d, "Lk"))
    with w.block(f"for u in T.parallel({d}):"):
        for name in ("v", "v_next"):
            _local(w, name, n)
        _local(w, "acc", 1)
        with w.block(f"for i in T.serial({n}):"):
            w("v[i] = bbar_B[u, i]")
        with w.block("for k in T.serial(Lk):"):
            w("acc[0] = T.float32(0.0)")
            with w.block(f"for i in T.serial({n}):"):
                w("acc[0] = acc[0] + C[u, i] * v[i]")
            w("K[u, k] = acc[0]")
            lag1 = (" + T.Select(k == 0, bbar_prev_B[u, i], T.float32(0.0))"
                    if has_prev_term(plan) else "")
            _matvec(w, n, "v", "v_next", lag1)
            with w.block(f"for i in T.serial({n}):"):
                w("v[i] = v_next[i]")
    return w.text()


def _matrix_boundary_generator(plan: KernelPlan, config: dict) -> str:
    """Per (sequence, channel): y = ylin + C Abar^(t+1) h0, D, gate; the final state's
    recurrence h = Abar h + Bbar B x_t (+ Bbar_prev B x_{t-1}) only when asked for."""
    fam = plan.family
    d, n = fam.dims.d_inner, fam.dims.state
    prev = has_prev_term(plan)
    w = Writer()
    w.math = MathOptions.for_config(config)
    w("# ssmc CPU convolution boundary pass, matrix A (generated; see backends/cpu/conv.py)")
    coef = ["abar_h", "bbar_B_h"] + (["bbar_prev_B_h"] if prev else []) + ["C_h"]
    args = ["x_h"] + coef + (["D_h"] if fam.D is not None else []) + \
        (["z_h"] if fam.gate is not None else []) + ["h0_h", "seg_h", "y_h", "hT_h", "ylin_h"]
    _matrix_signature(w, "ssmc_conv_boundary", args, ", has_init: T.int32, has_final: T.int32")
    for v in ("nb", "L", "nseg", "ninit", "nfin"):
        w(f"{v} = T.int64()")
    act = ("nb", d, "L")
    match_buffer(w, "x", "x_h", act)
    _matrix_inputs(w, plan)
    if fam.D is not None:
        match_buffer(w, "D", "D_h", (d,))
    if fam.gate is not None:
        match_buffer(w, "z", "z_h", act)
    match_buffer(w, "h0", "h0_h", ("ninit", d, n))
    match_buffer(w, "seg", "seg_h", ("nseg", 3), "int64")
    match_buffer(w, "y", "y_h", act)
    match_buffer(w, "hT", "hT_h", ("nfin", d, n))
    match_buffer(w, "ylin", "ylin_h", act)
    with w.block(f"for task in T.parallel(nseg * {d}):"):
        w(f"sq: T.let = task // {d}")
        w(f"u: T.let = task % {d}")
        w("bi: T.let = seg[sq, 0]")
        w("t0: T.let = seg[sq, 1]")
        w("tl: T.let = seg[sq, 2] - seg[sq, 1]")
        for name in ("h", "h_next"):
            _local(w, name, n)
        for name in ("acc", "yt", "xprev"):
            _local(w, name, 1)

        def load_h0():
            # a statement-level branch: without an initial state h0 is a 1-row placeholder
            with w.block("if has_init != 0:"):
                with w.block(f"for i in T.serial({n}):"):
                    w("h[i] = h0[sq, u, i]")
            with w.block("else:"):
                with w.block(f"for i in T.serial({n}):"):
                    w("h[i] = T.float32(0.0)")
        load_h0()
        with w.block("for t in T.serial(tl):"):
            w("yt[0] = ylin[bi, u, t0 + t]")
            with w.block("if has_init != 0:"):
                _matvec(w, n, "h", "h_next")
                with w.block(f"for i in T.serial({n}):"):
                    w("h[i] = h_next[i]")
                    w("yt[0] = yt[0] + C[u, i] * h[i]")
            out = epilogue(w, fam, "yt[0]", "x[bi, u, t0 + t]",
                           "D[u]" if fam.D is not None else None,
                           "z[bi, u, t0 + t]" if fam.gate is not None else None)
            w(f"y[bi, u, t0 + t] = {out}")
        with w.block("if has_final != 0:"):
            load_h0()
            w("xprev[0] = T.float32(0.0)")
            with w.block("for t in T.serial(tl):"):
                drive = " + bbar_B[u, i] * x[bi, u, t0 + t]"
                if prev:
                    drive += " + bbar_prev_B[u, i] * xprev[0]"
                _matvec(w, n, "h", "h_next", drive)
                with w.block(f"for i in T.serial({n}):"):
                    w("h[i] = h_next[i]")
                if prev:
                    w("xprev[0] = x[bi, u, t0 + t]")
            with w.block(f"for i in T.serial({n}):"):
                w("hT[sq, u, i] = h[i]")
    return w.text()


def generate(plan: KernelPlan, config: dict) -> str:
    """TVMScript of an IRModule with ``ssmc_conv_kernel`` and ``ssmc_conv_boundary``."""
    if is_matrix_conv(plan):
        kernel = _matrix_kernel_generator(plan, config)
        boundary = _matrix_boundary_generator(plan, config)
    else:
        kernel = _kernel_generator(plan, config)
        boundary = scan.generate(plan, config, mode="conv")

    def indent(text):
        return "\n".join(("    " + ln) if ln else ln for ln in text.splitlines())

    return ("# ssmc CPU convolution: K generator + boundary pass (generated; backends/cpu/conv.py)\n"
            "@I.ir_module\nclass Module:\n" + indent(kernel) + "\n\n" + indent(boundary) + "\n")
