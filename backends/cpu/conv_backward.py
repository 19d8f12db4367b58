"""The convolution's backward kernels (LTI, real and complex diagonal A) as TVMScript.

The forward is y = gate(z) (K * x + C Ā^(t+1) h0 + D x) with K_k = m Re Σ_n C_n g_k,n, the
state's response to a unit input g_0 = B̄ B, g_k = Ā^k B̄ B + Ā^(k-1) B̄₋ B (k >= 1), and m = 2
for complex-diagonal A (conjugate pairs), else 1; the final state is
h_T = Ā^L h0 + Σ_s g_(L-1-s) x_s. Its backward is three steps (``launch.ConvBackwardRunner``):

1. ``ssmc_conv_boundary_backward`` (TIR, one task per sequence x channel) walks the sequence
   forward: the output before the gate (K * x from the forward's own FFT, plus the initial
   state's free response and D x), the gate's gradient, dD, and the gradient reaching the
   convolution, dy_lin = dy gate(z). On the way it sums the polynomials in Ā the initial and
   final state's gradients need (Σ_t dy_lin_t Ā^(t+1), Σ_s x_s Ā^(L-1-s) and their
   derivatives in Ā, Horner-style: no power of Ā is formed, none can overflow), and walks
   back once for the final state's share of dx. It writes the partial derivatives of the loss
   in Ā, B̄, B̄₋, B and C per sequence (the launcher sums them) and dh0.
2. torch's FFT (float64, as the forward's): dK_k = Σ_t dy_lin_t x_(t-k), summed over the
   batch, and dx += Σ_t dy_lin_t K_(t-k), both correlations, zero-padded to 2L.
3. ``ssmc_conv_kernel_backward`` (TIR, one task per channel), the adjoint of the forward's K
   generator: per state element the polynomial Q(Ā) = Σ_(k>=1) dK_k Ā^(k-1) and Q'(Ā) by
   Horner from the longest lag down, P = dK_0 + Ā Q, P' = Q + Ā Q', so that
   Σ_k dK_k g_k = B̄ B P + B̄₋ B Q and its Ā-derivative B̄ B P' + B̄₋ B Q'. The partials in Ā,
   B̄, B̄₋ then reach Δ and A through ``plan.disc.derivatives`` (sympy), and Δ's map
   (softplus, bias, clamp) through its derivative ``delta_raw``.

Complex values (a = a_re + i a_im) are (re, im) pairs; the partials are the holomorphic ones
(∂L/∂w for L = Re(...) of a holomorphic expression in w), the gradients torch expects their
conjugates. Memory: per-sequence partials O(sequences x d x n), nothing per token and state.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import sympy as sp

from ssmc.discretize import split_complex
from ssmc.ir import AStructure, KernelPlan, Sharing
from ssmc.printers import TIRPrinter

from . import coeffs as co
from .fastmath import MathOptions
from .tir import DeltaPrinter, Writer, delta_expr, match_buffer

BOUNDARY = "ssmc_conv_boundary_backward"
ADJOINT = "ssmc_conv_kernel_backward"
ZERO = "T.float32(0.0)"


def supports_backward(plan: KernelPlan) -> Optional[str]:
    f = plan.family
    if f.A.structure not in (AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        what = ("scalar A (the SSD layout; its backward is the scan's or the chunked "
                "algorithm's)" if f.A.structure is AStructure.SCALAR else
                f"{f.A.structure.value} A (Ā is formed from the matrix on the host, whose "
                "adjoint is not generated)")
        return f"the cpu conv's backward is generated for real and complex diagonal A, not {what}"
    if plan.disc.derivatives is None:
        return "the plan carries no derivatives of its discretization"
    if f.gate is not None and plan.disc.derivatives.gate_dz is None:
        return f"the pass derives no derivative of the {f.gate.kind} gate"
    return None


Num = Tuple[str, ...]   # a real value (text,) or a complex one (re, im)


def _p(text: str) -> str:
    """``text`` parenthesized unless it is one name or buffer element."""
    return text if " " not in text or text.startswith("(") and text.endswith(")") and \
        text.count("(") == 1 else f"({text})"


class _Gen:
    """What both functions share: the family's sizes, complex arithmetic on text pairs, and
    the per-state coefficients (printed from the plan) as let-lines."""

    def __init__(self, plan: KernelPlan, config: dict):
        self.plan, self.fam = plan, plan.family
        f = self.fam
        self.cx = f.A.structure is AStructure.COMPLEX_DIAGONAL
        self.U, self.n, self.G = f.dims.d_inner, f.dims.state, f.dims.groups
        self.parts = (0, 1) if self.cx else (0,)
        self.m = "T.float32(2.0)" if self.cx else "T.float32(1.0)"
        self.cp = co.plan_coefficients(plan.disc)
        self.trap = not self.cp.is_zero("bbar_prev")
        self.bias = f.delta.bias
        self.w = Writer()
        self.w.math = MathOptions.for_config(config)

    # ---- complex arithmetic on (re, im) texts, each result let-bound --------------------------
    def let(self, stem: str, value: Sequence[str]) -> Num:
        stem = "v_" + stem    # let names never shadow a buffer's
        if all(v.isidentifier() for v in value):   # no let of a let (TVM rejects a float alias)
            return tuple(value)
        if len(value) == 1:
            return (self.w.let(stem, value[0]),)
        return (self.w.let(stem + "_re", value[0]), self.w.let(stem + "_im", value[1]))

    def mul(self, stem: str, x: Num, y: Num) -> Num:
        x, y = tuple(_p(v) for v in x), tuple(_p(v) for v in y)
        if not self.cx:
            return self.let(stem, (f"{x[0]} * {y[0]}",))
        return self.let(stem, (f"{x[0]} * {y[0]} - {x[1]} * {y[1]}",
                               f"{x[0]} * {y[1]} + {x[1]} * {y[0]}"))

    def mul3(self, stem: str, x: Num, y: Num, z: Num) -> Num:
        return self.mul(stem, self.mul(stem + "p", x, y), z)

    @staticmethod
    def add(*terms: Num) -> Num:
        return tuple(" + ".join(t[j] for t in terms) for j in range(len(terms[0])))

    @staticmethod
    def scale(s: str, x: Num) -> Num:
        return tuple(f"{_p(s)} * {_p(v)}" for v in x)

    def conj(self, x: Num) -> Num:
        return (x[0], f"(T.float32(0.0) - {_p(x[1])})") if self.cx else x

    def at(self, buf: str, index: str) -> Num:
        """(buf[index, 0], buf[index, 1]) for complex, buf[index] for real."""
        if self.cx:
            return tuple(f"{buf}[{index}, {j}]" for j in self.parts)
        return (f"{buf}[{index}]",)

    def store(self, buf: str, index: str, value: Num) -> None:
        for target, v in zip(self.at(buf, index), value):
            self.w(f"{target} = {v}")

    def alloc(self, name: str, size) -> None:
        dims = f"({size}, 2)" if self.cx else f"({size},)"
        self.w(f'{name} = T.alloc_buffer({dims}, "float32", scope="global")')

    def cx_shape(self, *dims) -> tuple:
        return tuple(dims) + ((2,) if self.cx else ())

    # ---- inputs and coefficients ---------------------------------------------------------------
    def parameter_buffers(self) -> None:
        f, U, n, G = self.fam, self.U, self.n, self.G
        match_buffer(self.w, "dt", "dt_h", (U,))
        match_buffer(self.w, "A", "A_h", self.cx_shape(U, n))
        for name, spec in (("B", f.B), ("C", f.C)):
            rows = G if spec.sharing is Sharing.GROUP else U
            match_buffer(self.w, name, f"{name}_h", self.cx_shape(rows, n))
        if self.bias:
            match_buffer(self.w, "bias", "bias_h", (U,))

    def bc(self, name: str) -> Num:
        spec = getattr(self.fam, name)
        row = f"u // {self.U // self.G}" if spec.sharing is Sharing.GROUP else "u"
        return self.at(name, f"{row}, s")

    def a_env(self) -> Dict[str, str]:
        if self.cx:
            return {"a_re": "A[u, s, 0]", "a_im": "A[u, s, 1]"}
        return {"a": "A[u, s]"}

    def coefficients(self, delta: str) -> Dict[str, Num]:
        """Ā, B̄ (B̄₋) of state s, channel u, printed from the plan (``coeffs.emit``)."""
        env = dict(self.a_env(), dt=delta)
        lines: List[str] = []
        outs = [o for o in co.OUTPUTS if not self.cp.is_zero(o)]
        vals = co.emit(self.cp, outs, lines, self.w.ind, self.w.names, env, opts=self.w.math)
        self.w.extend(lines)
        return {o: (tuple(vals[o]) if self.cx else (vals[o],)) for o in outs}

    def delta(self) -> str:
        return delta_expr(self.w, self.plan.disc, "dt[u]", "bias[u]" if self.bias else None)

    def header(self, name: str, handles: List[str], scalars: str = "") -> None:
        w = self.w
        w(f"# ssmc CPU convolution backward (generated; see backends/cpu/conv_backward.py)")
        w("@T.prim_func")
        w(f"def {name}({', '.join(h + '_h: T.handle' for h in handles)}{scalars}):")
        w.depth += 1
        w(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')


class _Boundary(_Gen):
    """``ssmc_conv_boundary_backward``: per (sequence, channel), the gate, D, the initial and
    final states' partials and the final state's share of dx (module docstring, step 1)."""

    def generate(self) -> str:
        f, w, U, n = self.fam, self.w, self.U, self.n
        params = ["dt", "A", "B", "C"] + (["bias"] if self.bias else [])
        opt_in = (["D"] if f.D is not None else []) + (["z"] if f.gate is not None else [])
        outs = ["dpre", "dx"] + (["dD"] if f.D is not None else []) + \
            (["dz"] if f.gate is not None else []) + self.partial_names() + ["dh0"]
        handles = ["x"] + params + opt_in + ["h0", "dhT", "seg", "ylin", "dout"] + outs
        self.header(BOUNDARY, handles, ", has_init: T.int32, has_dhT: T.int32")
        for v in ("nb", "L", "nseg", "ninit", "nfin"):
            w(f"{v} = T.int64()")
        tok = ("nb", U, "L")
        match_buffer(w, "x", "x_h", tok)
        self.parameter_buffers()
        if f.D is not None:
            match_buffer(w, "D", "D_h", (U,))
        if f.gate is not None:
            match_buffer(w, "z", "z_h", tok)
        match_buffer(w, "h0", "h0_h", self.cx_shape("ninit", U, n))
        match_buffer(w, "dhT", "dhT_h", self.cx_shape("nfin", U, n))
        match_buffer(w, "seg", "seg_h", ("nseg", 3), "int64")
        for name in ("ylin", "dout", "dpre", "dx"):
            match_buffer(w, name, f"{name}_h", tok)
        if f.D is not None:
            match_buffer(w, "dD", "dD_h", ("nseg", U))
        if f.gate is not None:
            match_buffer(w, "dz", "dz_h", tok)
        for name in self.partial_names() + ["dh0"]:
            match_buffer(w, name, f"{name}_h", self.cx_shape("nseg", U, n))
        with w.block(f"for task in T.parallel(nseg * {U}):"):
            self.task()
        return w.text()

    def partial_names(self) -> List[str]:
        return ["gabar", "gbbar"] + (["gbprev"] if self.trap else []) + ["gB", "gC"]

    def task(self) -> None:
        f, w, n = self.fam, self.w, self.n
        w(f"sq: T.let = task // {self.U}")
        w(f"u: T.let = task % {self.U}")
        w("bi: T.let = seg[sq, 0]")
        w("t0: T.let = seg[sq, 1]")
        w("tl: T.let = seg[sq, 2] - seg[sq, 1]")
        # per state: Ā, B̄ (B̄₋), B; Ā^t (pw) and Ā^(t+1) (pn); the initial state h0 and
        # q = Σ_t dy_lin_t Ā^(t+1), q1 = Σ_t (t+1) dy_lin_t Ā^t; the final state's
        # R = Σ_s x_s Ā^(t-1-s) after t tokens, R1 = ∂R/∂Ā, T1 = ∂Ā^t/∂Ā; Rp, Rp1: R, R1 one
        # token before the end; lam, lamn: the final state's gradient decayed backward
        tables = ["ab", "bb"] + (["bp"] if self.trap else []) + ["Bv", "Cv", "hv", "pw", "pn",
                                                               "q", "q1", "R", "R1", "T1"]
        tables += (["Rp", "Rp1"] if self.trap else []) + ["lam", "lamn"]
        for name in tables:
            self.alloc(name, n)
        w('acc = T.alloc_buffer((1,), "float32", scope="global")')
        w('tw = T.alloc_buffer((1,), "float32", scope="global")')
        if f.D is not None:
            w('accD = T.alloc_buffer((1,), "float32", scope="global")')
            w("accD[0] = T.float32(0.0)")
        delta = self.delta()
        with w.block(f"for s in T.serial({n}):"):
            c = self.coefficients(delta)
            self.store("ab", "s", c["abar"])
            self.store("bb", "s", c["bbar"])
            if self.trap:
                self.store("bp", "s", c["bbar_prev"])
            self.store("Bv", "s", self.bc("B"))
            self.store("Cv", "s", self.bc("C"))
            for j, part in enumerate(self.parts):
                h0 = f"T.Select(has_init != 0, h0[T.min(sq, ninit - 1), u, s{', %d' % j if self.cx else ''}], {ZERO})"
                one = "T.float32(1.0)" if j == 0 else ZERO
                for name, value in (("hv", h0), ("pw", one), ("pn", one)):
                    w(f"{self.at(name, 's')[j]} = {value}")
                for name in ("q", "q1", "R", "R1", "T1") + (("Rp", "Rp1") if self.trap else ()):
                    w(f"{self.at(name, 's')[j]} = {ZERO}")
        with w.block("for t in T.serial(tl):"):
            w("tt: T.let = t0 + t")
            self.forward_token()
        self.partials()
        with w.block("if has_dhT != 0:"):
            self.final_state_dx()

    def forward_token(self) -> None:
        """Token tt: the output before the gate, its gradient, and the states' sums."""
        f, w, n = self.fam, self.w, self.n
        ab, hv, cv = self.at("ab", "s"), self.at("hv", "s"), self.at("Cv", "s")
        w(f"acc[0] = {ZERO}")
        with w.block("if has_init != 0:"):
            with w.block(f"for s in T.serial({n}):"):
                pn = self.mul("pn", self.at("pw", "s"), ab)
                self.store("pn", "s", pn)
                free = self.mul3("fr", cv, pn, hv)
                w(f"acc[0] = acc[0] + {free[0]}")
        x = "x[bi, u, tt]"
        pre = f"ylin[bi, u, tt] + {self.m} * acc[0]" + (f" + D[u] * {x}" if f.D is not None else "")
        out = w.let("v_out", pre)
        g = "dout[bi, u, tt]"
        if f.gate is not None:
            der = self.plan.disc.derivatives
            gate, slope = self.gate_texts(der, "z[bi, u, tt]")
            w(f"dz[bi, u, tt] = {g} * {out} * ({slope})")
            dpre = w.let("v_dpre", f"{g} * ({gate})")
        else:
            dpre = w.let("v_dpre", g)
        w(f"dpre[bi, u, tt] = {dpre}")
        if f.D is not None:
            w(f"accD[0] = accD[0] + {dpre} * {x}")
            w(f"dx[bi, u, tt] = D[u] * {dpre}")
        else:
            w(f"dx[bi, u, tt] = {ZERO}")
        with w.block("if has_init != 0:"):
            # (t+1) dy_lin_t in a buffer: as a shared subexpression, TVM's CSE would bind it to
            # a float let that its integer-set analysis then rejects
            w(f"tw[0] = T.Cast('float32', t + 1) * {dpre}")
            with w.block(f"for s in T.serial({n}):"):
                pw = self.at("pw", "s")
                q1 = self.at("q1", "s")
                self.store("q1", "s", self.add(q1, self.scale("tw[0]", pw)))
                self.store("q", "s", self.add(self.at("q", "s"), self.scale(dpre, self.at("pn", "s"))))
        with w.block("if has_dhT != 0:"):
            with w.block(f"for s in T.serial({n}):"):
                if self.trap:   # R, R1 after all but the last token
                    with w.block("if t == tl - 1:"):
                        self.store("Rp", "s", self.at("R", "s"))
                        self.store("Rp1", "s", self.at("R1", "s"))
                r, r1, t1, pw = (self.at(k, "s") for k in ("R", "R1", "T1", "pw"))
                r1n = self.add(self.mul("ar1", ab, r1), r)
                t1n = self.add(self.mul("at1", ab, t1), pw)
                rn = self.mul("ar", ab, r)
                self.store("R1", "s", r1n)
                self.store("T1", "s", t1n)
                self.store("R", "s", (f"{rn[0]} + {x}",) + rn[1:])
        with w.block(f"for s in T.serial({n}):"):   # Ā^t -> Ā^(t+1)
            self.store("pw", "s", self.mul("pw", self.at("pw", "s"), ab))

    def gate_texts(self, der, z: str) -> Tuple[str, str]:
        """gate(z) and ∂gate/∂z, printed from the pass (one Sigmoid let shared by both)."""
        reps, (gate, slope) = sp.cse([der.gate, der.gate_dz],
                                     symbols=sp.numbered_symbols("ssmc_g"))
        names = {der.gate_z.name: self.w.let("v_zg", z)}
        for sym, sub in reps:
            names[sym.name] = self.w.let("v_sg", TIRPrinter(names=names).doprint(sub))
        printer = TIRPrinter(names=names)
        return printer.doprint(gate), printer.doprint(slope)

    def partials(self) -> None:
        """The loss's partials in Ā, B̄, B̄₋, B, C of this sequence, and dh0 (conjugated)."""
        f, w, n = self.fam, self.w, self.n
        if f.D is not None:
            w("dD[sq, u] = accD[0]")
        with w.block(f"for s in T.serial({n}):"):
            ab, bb, bv, cv, hv = (self.at(k, "s") for k in ("ab", "bb", "Bv", "Cv", "hv"))
            ini = w.let("v_ini", "T.Cast('float32', has_init != 0)")
            fin = w.let("v_fin", "T.Cast('float32', has_dhT != 0)")
            # the initial state's free response, m Re Σ C h0 Σ_t dy_lin_t Ā^(t+1)
            mc = self.scale(self.m, cv)
            g_ab = self.scale(ini, self.mul3("gi", mc, hv, self.at("q1", "s")))
            g_c = self.scale(ini, self.scale(self.m, self.mul("gc", hv, self.at("q", "s"))))
            dh0 = self.scale(ini, self.mul("dhi", mc, self.at("q", "s")))
            # the final state, Re Σ conj(G) h_T
            G = self.conj(tuple(f"dhT[T.min(sq, nfin - 1), u, s{', %d' % j if self.cx else ''}]"
                                for j in self.parts))
            G = self.let("gf", tuple(f"{fin} * {v}" for v in G))
            r, r1 = self.at("R", "s"), self.at("R1", "s")
            gb = self.mul("gbr", G, bv)
            fa = self.add(self.mul("ft", self.at("T1", "s"), hv), self.mul3("fb", bb, bv, r1))
            fbb = self.mul("fbb", gb, r)
            fB = self.mul("fB", bb, r)
            if self.trap:
                bp, rp, rp1 = self.at("bp", "s"), self.at("Rp", "s"), self.at("Rp1", "s")
                fa = self.add(fa, self.mul3("fp", bp, bv, rp1))
                fB = self.add(fB, self.mul("fBp", bp, rp))
                self.store("gbprev", "sq, u, s", self.mul("fbp", gb, rp))
            self.store("gabar", "sq, u, s", self.add(g_ab, self.mul("fa", G, fa)))
            self.store("gbbar", "sq, u, s", fbb)
            self.store("gB", "sq, u, s", self.mul("fBB", G, fB))
            self.store("gC", "sq, u, s", g_c)
            dh0 = self.add(dh0, self.mul("dhf", G, self.at("pw", "s")))
            self.store("dh0", "sq, u, s", self.conj(dh0))
            # the final state's gradient walked back from the last token: lam = conj(G) Ā^(L-1-t)
            self.store("lam", "s", G)
            for target in self.at("lamn", "s"):
                w(f"{target} = {ZERO}")

    def final_state_dx(self) -> None:
        """dx_t += Re Σ_n conj(G) (Ā^(L-1-t) B̄ + Ā^(L-2-t) B̄₋) B, walked back from the end."""
        w, n = self.w, self.n
        with w.block("for tb in T.serial(tl):"):
            w("tt: T.let = t0 + tl - 1 - tb")
            w(f"acc[0] = {ZERO}")
            with w.block(f"for s in T.serial({n}):"):
                lam, ab, bv = self.at("lam", "s"), self.at("ab", "s"), self.at("Bv", "s")
                term = self.mul("lb", lam, self.at("bb", "s"))
                if self.trap:
                    term = self.add(term, self.mul("lp", self.at("lamn", "s"), self.at("bp", "s")))
                term = self.mul("lB", self.let("lt", term), bv)
                w(f"acc[0] = acc[0] + {term[0]}")
                self.store("lamn", "s", lam)
                self.store("lam", "s", self.mul("la", lam, ab))
            w("dx[bi, u, tt] = dx[bi, u, tt] + acc[0]")


class _Adjoint(_Gen):
    """``ssmc_conv_kernel_backward``: dK and the summed boundary partials to dA, dB, dC, dΔ
    (module docstring, step 3)."""

    def generate(self) -> str:
        w, U, n = self.w, self.U, self.n
        params = ["dt", "A", "B", "C"] + (["bias"] if self.bias else [])
        partials = ["gabar", "gbbar"] + (["gbprev"] if self.trap else []) + ["gB", "gC"]
        outs = ["dA", "dB", "dC", "ddt"] + (["dbias"] if self.bias else [])
        self.header(ADJOINT, params + ["dK"] + partials + outs)
        w("Lk = T.int64()")
        self.parameter_buffers()
        match_buffer(w, "dK", "dK_h", (U, "Lk"))
        for name in partials + ["dA", "dB", "dC"]:
            match_buffer(w, name, f"{name}_h", self.cx_shape(U, n))
        match_buffer(w, "ddt", "ddt_h", (U,))
        if self.bias:
            match_buffer(w, "dbias", "dbias_h", (U,))
        with w.block(f"for u in T.parallel({U}):"):
            self.alloc("hq", 1)
            self.alloc("hq1", 1)
            w('acc = T.alloc_buffer((1,), "float32", scope="global")')
            w(f"acc[0] = {ZERO}")
            delta = self.delta()
            with w.block(f"for s in T.serial({n}):"):
                self.state(delta)
            self.delta_gradient(delta)
        return w.text()

    def state(self, delta: str) -> None:
        w = self.w
        c = self.coefficients(delta)
        ab = self.let("abv", c["abar"])
        q, q1 = self.at("hq", "0"), self.at("hq1", "0")
        for target in q + q1:
            w(f"{target} = {ZERO}")
        # Q(Ā) = Σ_(k>=1) dK_k Ā^(k-1) and Q' by Horner, from the longest lag down
        with w.block("for kb in T.serial(Lk - 1):"):
            w("k: T.let = Lk - 1 - kb")
            q1n = self.add(self.mul("hq1", q1, ab), q)
            qa = self.mul("hqa", q, ab)
            self.store("hq1", "0", q1n)
            self.store("hq", "0", (f"{qa[0]} + dK[u, k]",) + qa[1:])
        aq = self.mul("aq", ab, q)
        P = self.let("P", (f"dK[u, 0] + {aq[0]}",) + aq[1:])
        P1 = self.let("P1", self.add(q, self.mul("aq1", ab, q1)))
        bb, bv, cv = c["bbar"], self.bc("B"), self.bc("C")
        mc = self.let("mc", self.scale(self.m, cv))
        bbv = self.mul("bbv", bb, bv)
        s_val = self.mul("sP", bbv, P)                        # Σ_k dK_k g_k
        s_da = self.mul("sP1", bbv, P1)                       # its derivative in Ā
        s_b = self.mul("sB", bb, P)
        if self.trap:
            bpv = self.mul("bpv", c["bbar_prev"], bv)
            s_val = self.add(s_val, self.mul("sQ", bpv, q))
            s_da = self.add(s_da, self.mul("sQ1", bpv, q1))
            s_b = self.add(s_b, self.mul("sBp", c["bbar_prev"], q))
        at = "u, s"
        g = {"abar": self.let("ga", self.add(self.at("gabar", at), self.mul("ka", mc, s_da))),
             "bbar": self.let("gb", self.add(self.at("gbbar", at), self.mul3("kb", mc, bv, P)))}
        if self.trap:
            g["bbar_prev"] = self.let("gp", self.add(self.at("gbprev", at),
                                                     self.mul3("kp", mc, bv, q)))
        self.store("dB", at, self.conj(self.add(self.at("gB", at), self.mul("kB", mc, s_b))))
        self.store("dC", at, self.conj(self.add(self.at("gC", at),
                                                self.scale(self.m, s_val))))
        d_a, d_dt = [], []
        for key, (dv_dt, dv_da) in self.derivatives().items():
            if key not in g:
                continue
            if dv_da is not None:
                d_a.append(self.mul(f"c{key}a", g[key], self.let(f"d{key}a", dv_da)))
            if dv_dt is not None:
                d_dt.append(self.mul(f"c{key}t", g[key], self.let(f"d{key}t", dv_dt))[0])
        self.store("dA", at, self.conj(self.add(*d_a) if d_a else (ZERO,) * len(self.parts)))
        if d_dt:
            w(f"acc[0] = acc[0] + {' + '.join(d_dt)}")

    def derivatives(self) -> Dict[str, Tuple[Optional[Num], Optional[Num]]]:
        """{abar, bbar, bbar_prev: (∂/∂Δ, ∂/∂a) as TIR texts or None where zero} for state s,
        printed from the pass's ``Derivatives`` (split into re, im for complex a)."""
        der = self.plan.disc.derivatives
        # in float64: zoh's ∂B̄/∂a = (aΔ e^(aΔ) - e^(aΔ) + 1)/a² cancels in fp32 for small
        # |aΔ|, and these are evaluated once per (channel, state), outside the Horner loop
        names = {k: f'T.Cast("float64", {v})' for k, v in
                 dict(self.a_env(), dt=self.delta_name).items()}
        out = {}
        for key, pair in (("abar", (der.abar_dt, der.abar_a)), ("bbar", (der.bbar_dt, der.bbar_a)),
                          ("bbar_prev", (der.bbar_prev_dt, der.bbar_prev_a))):
            texts = []
            for expr in pair:
                expr = sp.sympify(expr)
                if expr == 0:
                    texts.append(None)
                    continue
                parts = split_complex(expr) if self.cx else (expr,)
                printer = TIRPrinter(names=names, dtype="float64")
                texts.append(tuple(f'T.Cast("float32", {printer.doprint(sp.sympify(p))})'
                                   for p in parts))
            out[key] = tuple(texts)
        return out

    def delta(self) -> str:
        self.delta_name = super().delta()
        return self.delta_name

    def delta_gradient(self, delta: str) -> None:
        """dΔ through the Δ map: ∂Δ/∂dt_raw (= ∂Δ/∂dt_bias), printed from the pass."""
        w = self.w
        names = {"dt_raw": "dt[u]", "dt_bias": "bias[u]" if self.bias else ZERO}
        slope = DeltaPrinter(w, names).doprint(sp.sympify(self.plan.disc.derivatives.delta_raw))
        dr = w.let("v_ddr", f"acc[0] * ({slope})")
        w(f"ddt[u] = {dr}")
        if self.bias:
            w(f"dbias[u] = {dr}")


def generate(plan: KernelPlan, config: dict) -> str:
    """TVMScript of an IRModule with ``ssmc_conv_boundary_backward`` and
    ``ssmc_conv_kernel_backward`` (the K generator itself is the forward module's)."""
    def indent(text):
        return "\n".join(("    " + ln) if ln else ln for ln in text.splitlines())

    return ("# ssmc CPU convolution backward (generated; backends/cpu/conv_backward.py)\n"
            "@I.ir_module\nclass Module:\n" + indent(_Boundary(plan, config).generate()) +
            "\n\n" + indent(_Adjoint(plan, config).generate()) + "\n")
