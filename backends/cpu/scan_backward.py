"""The selective scan's backward kernel (real and complex diagonal A) as TVMScript:
``ssmc_scan_backward``. Scalar A (SSD) has its own generator, ssd_backward.py.

The adjoint recurrence (``ssmc.ir.Derivatives`` has the algebra): per channel and state,
λ_t = C_t dy_t + μ_t with μ_t = Ā_{t+1} λ_{t+1} carried backward in time, and every input's
gradient is λ_t (or dy_t) times a partial derivative of the forward's coefficients, printed
here from the plan's sympy ``Derivatives`` like the forward prints Ā and B̄.

The trapezoidal rule's previous-token term feeds the gradients of x_{t-1} and B_{t-1}: the
reverse walk carries dL/dx_{t-1} to the next (earlier) step.

Complex-diagonal A (y = 2 Re(C h)): every complex value is a (re, im) pair of real buffers, the
coefficients and derivatives are the pass's splits (``Discretized.split``,
``Derivatives.split``). The walk carries the holomorphic adjoint μ = ∂L/∂h as a complex number
(dL = Re(μ dh)): μ enters as conj(the final state's gradient), λ_t = 2 C_t dy_t + μ_t, and every
product with a derivative is the real case's with complex multiplication. A real input's
gradient is the real part of its sum; a complex parameter's is the conjugate (torch's
convention for a real loss: ∂L/∂Re p + i ∂L/∂Im p), stored as its (re, im) pair.

Memory: nothing per token is kept from the forward. A task walks its channels' sequence
forward once, storing the state every ``ckpt`` steps (``ck``: one state per chunk); then
backward chunk by chunk: the chunk's states are recomputed from its checkpoint into a local
tile (``ckpt`` steps x n x W, in L1) with their Ā and B̄, and the reverse loop reads h_{t-1}
from it exactly (no division by Ā, no shifted loads: the CPU walks time one step at a time).

Work: tasks are (sequence, group, part): a part is a range of the group's channel blocks of
W lanes (vectorized, as in the forward), walked one block after another, so that dB and dC
(shared by the group's channels) are summed inside the task and written as one partial per
part, which the launcher sums (deterministic; ``parts`` is chosen per call from the thread
count). A, D, Δ's bias and constant B, C, Δ are summed per (sequence, channel) and summed over
sequences by the launcher.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import sympy as sp

from ssmc.ir import AStructure, KernelPlan
from ssmc.printers import TIRPrinter, stable_form

from . import buffers, fastmath
from .tir import Writer, DeltaPrinter, delta_expr, lanes_for, match_buffer

FUNC = "ssmc_scan_backward"
# Steps per checkpoint: the recomputed chunk (ckpt x n x W floats, x3 tiles) stays in L1.
DEFAULT_CKPT = 16


def supports_backward(plan: KernelPlan) -> Optional[str]:
    f = plan.family
    if f.A.structure is AStructure.SCALAR:   # its own generator (rows of n-vectors)
        from . import ssd_backward
        return ssd_backward.supports_backward(plan)
    if f.A.structure not in (AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        return (f"the cpu scan's backward is generated for real and complex diagonal and "
                f"scalar A, not {f.A.structure.value} A (not yet)")
    if f.gate and f.gate.kind != "silu":
        return f"the cpu scan's backward knows the silu gate, not {f.gate.kind}"
    if plan.disc.derivatives is None:
        return "the plan carries no derivatives of its discretization"
    if f.A.structure is AStructure.COMPLEX_DIAGONAL and plan.disc.derivatives.split is None:
        return "the plan carries no split (re, im) derivatives of its complex discretization"
    return None


def _print(expr, names: Dict[str, str]) -> str:
    return TIRPrinter(names=names).doprint(sp.sympify(expr))


class _StablePrinter(TIRPrinter):
    """TIR printer whose expm1 (the pass's stable form of exp(x) - 1, which the complex
    splits keep for small |a Δ|) is fastmath's polynomial near 0, emitted as let-lines: the
    plain TIR printer spells it exp(x) - 1, which loses the digits of a small a Δ."""
    has_expm1 = True

    def __init__(self, w: Writer, names):
        super().__init__(names=names)
        self._w = w

    def _print_expm1(self, expr):
        x = self._w.let("em1_x", self._print(expr.args[0]))
        lines: List[str] = []
        out = fastmath.expm1_from(lines, self._w.ind, self._w.names, x, f"T.exp({x})")
        self._w.extend(lines)
        return out


ZERO = "T.float32(0.0)"
Cx = Tuple[Optional[str], Optional[str]]   # a complex value's (re, im) texts; None: zero


def _prod(*factors: Optional[str]) -> Optional[str]:
    return None if any(f is None for f in factors) else " * ".join(factors)


def _sum(*terms: Tuple[str, Optional[str]]) -> Optional[str]:
    """Signed terms ("+" / "-", text), zero (None) terms dropped; None when all are."""
    out = ""
    for sign, t in terms:
        if t is not None:
            out = (t if sign == "+" else f"{ZERO} - {t}") if not out else f"{out} {sign} {t}"
    return f"({out})" if out else None


def _cmul(x: Cx, y: Cx) -> Cx:
    (xr, xi), (yr, yi) = x, y
    return (_sum(("+", _prod(xr, yr)), ("-", _prod(xi, yi))),
            _sum(("+", _prod(xr, yi)), ("+", _prod(xi, yr))))


def _cadd(*xs: Cx) -> Cx:
    return (_sum(*(("+", x[0]) for x in xs)), _sum(*(("+", x[1]) for x in xs)))


def _text(part: Optional[str]) -> str:
    return ZERO if part is None else part


class _Backward:
    def __init__(self, plan: KernelPlan, config: dict):
        self.plan, self.fam = plan, plan.family
        f = self.fam
        self.n, self.g = f.dims.state, f.dims.groups
        self.d = f.dims.d_inner
        self.cpg = self.d // self.g
        self.W = int(config.get("lanes") or lanes_for(self.cpg, 8))
        self.K = int(config.get("ckpt", DEFAULT_CKPT))
        self.sel = {"dt": f.delta.selective, "A": f.A.selective, "B": f.B.selective,
                    "C": f.C.selective}
        self.w = Writer()
        der = plan.disc.derivatives
        self.coef = {"abar": plan.disc.abar, "bbar": plan.disc.bbar}
        self.der = {"abar_dt": der.abar_dt, "abar_a": der.abar_a, "bbar_dt": der.bbar_dt,
                    "bbar_a": der.bbar_a}
        # the trapezoidal rule's previous-token term B̄₋ B_{t-1} x_{t-1} (zero at a sequence's
        # first token, as the forward has it)
        self.trap = sp.sympify(plan.disc.bbar_prev) != 0
        if self.trap:
            self.coef["bbar_prev"] = plan.disc.bbar_prev
            self.der.update(bbar_prev_dt=der.bbar_prev_dt, bbar_prev_a=der.bbar_prev_a)
        # complex A: every coefficient and derivative as the pass's (re, im) split
        self.cplx = f.A.structure is AStructure.COMPLEX_DIAGONAL
        if self.cplx:
            split = dict(zip(("abar", "bbar", "bbar_prev"), plan.disc.split))
            self.coef = {k: split[k] for k in self.coef}
            split = dict(der.split)
            self.der = {k: split[k] for k in self.der}
        self.delta_raw = der.delta_raw
        self.names = dict(buffers.inputs(plan))

    # ---- text helpers ------------------------------------------------------------------------
    def alloc(self, name: str, shape) -> None:
        dims = ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "")
        self.w(f'{name} = T.alloc_buffer(({dims}), "float32", scope="global")')

    def loop(self, var: str, count, kind: str = "serial"):
        return self.w.block(f"for {var} in T.{kind}({count}):")

    def lanes(self):
        return self.loop("v", self.W, "vectorized")

    def x_at(self, buf: str, t: str = "tt") -> str:
        return f"{buf}[bi, c0 + v, {t}]"

    def raw_dt(self, t: str = "tt") -> str:
        return f"dt[bi, c0 + v, {t}]" if self.sel["dt"] else "dt[c0 + v]"

    def a_at(self, t: str = "tt") -> str:
        return f"A[bi, c0 + v, s, {t}]" if self.sel["A"] else "A[c0 + v, s]"

    def bc_at(self, name: str, t: str = "tt") -> str:
        return f"{name}[bi, g, {t}, s]" if self.sel[name] else f"{name}[c0 + v, s]"

    def st(self, buf: str, row: str = "sq", mid: str = "", part: Optional[int] = None) -> str:
        """State element s of lane v in a (rows, units..., [mid,] n[, 2]) state buffer
        (``part``: the re or im plane of a complex one)."""
        tail = "" if part is None else f", {part}"
        return f"{buf}[{row}, c0 + v, {mid + ', ' if mid else ''}s{tail}]"

    # ---- complex A: (re, im) pairs ---------------------------------------------------------
    def a_pair(self, t: str = "tt") -> Cx:
        at = f"A[bi, c0 + v, s, {t}" if self.sel["A"] else "A[c0 + v, s"
        return f"{at}, 0]", f"{at}, 1]"

    def bc_pair(self, name: str, t: str = "tt") -> Cx:
        at = f"{name}[bi, g, {t}, s" if self.sel[name] else f"{name}[c0 + v, s"
        return f"{at}, 0]", f"{at}, 1]"

    @staticmethod
    def pair(buf: str, index: str) -> Cx:
        """Element ``index`` of the (re, im) buffers ``buf``_re, ``buf``_im."""
        return f"{buf}_re[{index}]", f"{buf}_im[{index}]"

    def assign(self, dst: Cx, value: Cx, conj: bool = False) -> None:
        """dst = value (its conjugate with ``conj``), part by part."""
        re, im = value
        if conj:
            im = _sum(("-", im))
        self.w(f"{dst[0]} = {_text(re)}")
        self.w(f"{dst[1]} = {_text(im)}")

    def accumulate(self, dst: Cx, value: Cx, conj: bool = False) -> None:
        """dst += value (its conjugate with ``conj``); zero parts add nothing."""
        for d, v, sign in zip(dst, value, ("+", "-" if conj else "+")):
            if v is not None:
                self.w(f"{d} = {d} {sign} {v}")

    def let_pair(self, stem: str, value: Cx) -> Cx:
        """A complex value's nonzero parts as let names (zero parts stay None)."""
        return tuple(None if v is None else self.w.let(f"{stem}_{p}", v)
                     for v, p in zip(value, ("re", "im")))

    def xp_pair(self) -> Cx:
        """B_{t-1} x_{t-1} of state s (zero at a sequence's first token), complex."""
        xp = self.xp()
        return tuple(f"{b} * {xp}" for b in self.bc_pair("B", "tp"))

    def d_at(self) -> str:
        return "D[c0 + v]"

    def previous(self) -> str:
        """B̄₋ B_{t-1} x_{t-1} of state s, lane v at token tt (``tp`` = tt - 1, clamped)."""
        return f"{self.bc_at('B', 'tp')} * {self.xp()}"

    def xp(self) -> str:
        return (f"T.Select(tt > t_begin, {self.x_at('x', 'tp')}, T.float32(0.0))")

    def has(self, op: str) -> bool:
        return op in self.names

    # ---- the function ------------------------------------------------------------------------
    def generate(self) -> str:
        w, f, n, W, K = self.w, self.fam, self.n, self.W, self.K
        ins = [name for name, _ in buffers.inputs(self.plan)]
        grads = ["dx", "ddt", "dA", "dB", "dC"] + [f"d{name}" for name in ("D", "z", "bias")
                                                   if name in ins] + ["dh0"]
        handles = ins + ["seg", "dout", "dhT", "ck"] + grads
        w("# ssmc CPU scan backward kernel (generated; see backends/cpu/scan_backward.py)")
        w("@T.prim_func")
        params = ", ".join(f"{h}_h: T.handle" for h in handles)
        w(f"def {FUNC}({params}, has_init: T.int32, has_dhT: T.int32, parts: T.int32):")
        w.depth += 1
        w(f'T.func_attr({{"global_symbol": "{FUNC}", "tir.noalias": True}})')
        for v in ("nb", "L", "nseg", "ninit", "nck", "nparts", "nfin"):
            w(f"{v} = T.int64()")
        sizes = buffers.sizes_of(f, b="nb", l="L")
        for name, op in buffers.inputs(self.plan):     # the forward's inputs, as it takes them
            at = dict(sizes, s="ninit" if name == "h0" else sizes.get("s"))
            bc = op.name in ("B", "C") and op.selective
            match_buffer(w, name, f"{name}_h", buffers.shape(op, at, bc))
        match_buffer(w, "seg", "seg_h", ("nseg", 3), "int64")
        d = self.d
        token, state = ("nb", d, "L"), (d,)
        cx = (2,) if self.cplx else ()   # complex: a trailing (re, im) axis
        match_buffer(w, "dout", "dout_h", token)
        match_buffer(w, "dhT", "dhT_h", ("nfin",) + state + (n,) + cx)
        match_buffer(w, "ck", "ck_h", ("nseg",) + state + ("nck", n) + cx)
        match_buffer(w, "dx", "dx_h", token)
        match_buffer(w, "ddt", "ddt_h", token if self.sel["dt"] else ("nseg", d))
        match_buffer(w, "dA", "dA_h", (("nb", d, n, "L") if self.sel["A"] else ("nseg", d, n))
                     + cx)
        for name in ("B", "C"):
            shape = ("nparts", "nb", self.g, "L", n) if self.sel[name] else ("nseg", d, n)
            match_buffer(w, f"d{name}", f"d{name}_h", shape + cx)
        if "D" in ins:
            match_buffer(w, "dD", "dD_h", ("nseg", d))
        if "z" in ins:
            match_buffer(w, "dz", "dz_h", token)
        if "bias" in ins:
            match_buffer(w, "dbias", "dbias_h", ("nseg", d))
        match_buffer(w, "dh0", "dh0_h", ("nseg",) + state + (n,) + cx)
        blocks = self.cpg // W
        with self.loop("task", f"nseg * {self.g} * parts", "parallel"):
            w(f"sq: T.let = task // (parts * {self.g})")
            w(f"g: T.let = task // parts % {self.g}")
            w("part: T.let = task % parts")
            w("bi: T.let = seg[sq, 0]")
            w("t_begin: T.let = seg[sq, 1]")
            w("t_len: T.let = seg[sq, 2] - seg[sq, 1]")
            self.allocations()
            w(f"per: T.let = ({blocks} + parts - 1) // parts")
            with self.loop("kb", f"T.max(T.min(per, {blocks} - part * per), 0)"):
                w(f"c0: T.let = g * {self.cpg} + (part * per + kb) * {W}")
                if self.cplx:
                    self.complex_block()
                else:
                    self.channel_block()
        return w.text()

    def allocations(self):
        n, W, K = self.n, self.W, self.K
        if self.cplx:
            return self.complex_allocations()
        self.alloc("h", (n, W))
        self.alloc("mu", (n, W))
        self.alloc("hs", (K + 1, n, W))      # the chunk's states, h_{t0-1} first
        self.alloc("abar_s", (K, n, W))
        self.alloc("bbar_s", (K, n, W))
        if self.trap:
            self.alloc("bbarp_s", (K, n, W))
            self.alloc("dbpv", (n, W))
            self.alloc("dxc", (W,))      # dL/dx_{t-1} from step t's previous-token term
            self.alloc("dxn", (W,))
        self.alloc("dts", (K, W))
        self.alloc("acc_a", (n, W))
        for name in ("acc_b", "acc_c"):
            self.alloc(name, (n, W))
        self.alloc("acc_dt", (W,))
        self.alloc("acc_d", (W,))
        self.alloc("acc_bias", (W,))
        self.alloc("dbv", (n, W))
        self.alloc("ysum", (W,))
        self.alloc("dyv", (W,))
        self.alloc("dxv", (W,))
        self.alloc("ddv", (W,))

    def coefficients(self, j: str, extra: bool):
        """Ā, B̄ (and with ``extra`` their derivatives) of step j at state s, lane v, into
        local let names; returns {key: text}."""
        w = self.w
        keys = dict(self.coef)
        if extra:
            keys.update(self.der)
        names = {"dt": f"dts[{j}, v]", "a": self.a_at()}
        out = {}
        for key, expr in keys.items():
            if sp.sympify(expr) == 0:
                out[key] = None
                continue
            out[key] = w.let(key, _print(expr, names))
        return out

    def channel_block(self):
        w, n, W, K, sel = self.w, self.n, self.W, self.K, self.sel
        ins = self.names
        # ---- pass 1: the state at every chunk's start
        with self.loop("s", n):
            with self.lanes():
                w(f"h[s, v] = T.Select(has_init != 0, {self.st('h0', 'T.min(sq, ninit - 1)')}, "
                  "T.float32(0.0))")
        with self.loop("t", "t_len"):
            w("tt: T.let = t_begin + t")
            if self.trap:
                w("tp: T.let = T.max(tt - 1, t_begin)")
            with w.block(f"if t % {K} == 0:"):
                with self.loop("s", n):
                    with self.lanes():
                        w(f"{self.st('ck', mid=f't // {K}')} = h[s, v]")
            with self.lanes():
                w(f"dts[0, v] = {delta_expr(w, self.plan.disc, self.raw_dt(), self.bias())}")
            with self.loop("s", n):
                with self.lanes():
                    c = self.coefficients("0", extra=False)
                    prev = f" + {c['bbar_prev']} * {self.previous()}" if self.trap else ""
                    w(f"h[s, v] = {c['abar']} * h[s, v] + {c['bbar']} * {self.bc_at('B')} * "
                      f"{self.x_at('x')}{prev}")
        # ---- pass 2
        with self.loop("s", n):
            with self.lanes():
                w(f"mu[s, v] = T.Select(has_dhT != 0, {self.st('dhT', 'T.min(sq, nfin - 1)')}, "
                  "T.float32(0.0))")
                w("acc_a[s, v] = T.float32(0.0)")
                w("acc_b[s, v] = T.float32(0.0)")
                w("acc_c[s, v] = T.float32(0.0)")
        with self.lanes():
            for name in ("acc_dt", "acc_d", "acc_bias") + (("dxc",) if self.trap else ()):
                w(f"{name}[v] = T.float32(0.0)")
        with self.loop("ci", f"(t_len + {K - 1}) // {K}"):
            w(f"c: T.let = (t_len + {K - 1}) // {K} - 1 - ci")
            w(f"nt: T.let = T.min({K}, t_len - c * {K})")
            # recompute the chunk's states, Abar and Bbar
            with self.loop("s", n):
                with self.lanes():
                    w(f"hs[0, s, v] = {self.st('ck', mid='c')}")
            with self.loop("j", "nt"):
                w(f"tt: T.let = t_begin + c * {K} + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                with self.lanes():
                    w(f"dts[j, v] = {delta_expr(w, self.plan.disc, self.raw_dt(), self.bias())}")
                with self.loop("s", n):
                    with self.lanes():
                        c = self.coefficients("j", extra=False)
                        w(f"abar_s[j, s, v] = {c['abar']}")
                        w(f"bbar_s[j, s, v] = {c['bbar']}")
                        prev = ""
                        if self.trap:
                            w(f"bbarp_s[j, s, v] = {c['bbar_prev']}")
                            prev = f" + bbarp_s[j, s, v] * {self.previous()}"
                        w(f"hs[j + 1, s, v] = abar_s[j, s, v] * hs[j, s, v] + bbar_s[j, s, v] * "
                          f"{self.bc_at('B')} * {self.x_at('x')}{prev}")
            # walk the chunk backward
            with self.loop("jj", "nt"):
                w("j: T.let = nt - 1 - jj")
                w(f"tt: T.let = t_begin + c * {K} + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                self.step_backward()
        with self.loop("s", n):
            with self.lanes():
                w("dh0[sq, c0 + v, s] = mu[s, v]")
                if not sel["A"]:
                    w("dA[sq, c0 + v, s] = acc_a[s, v]")
                for name, acc in (("B", "acc_b"), ("C", "acc_c")):
                    if not sel[name]:
                        w(f"d{name}[sq, c0 + v, s] = {acc}[s, v]")
        self.lane_stores()

    def lane_stores(self):
        """The (sequence, channel) sums of what is per channel: constant Δ, D, Δ's bias."""
        w, sel, ins = self.w, self.sel, self.names
        stores = ([] if sel["dt"] else ["ddt[sq, c0 + v] = acc_dt[v]"]) + \
            (["dD[sq, c0 + v] = acc_d[v]"] if "D" in ins else []) + \
            (["dbias[sq, c0 + v] = acc_bias[v]"] if "bias" in ins else [])
        if stores:
            with self.lanes():
                for line in stores:
                    w(line)

    def bias(self) -> Optional[str]:
        if "bias" not in self.names:
            return None
        return "bias[c0 + v]"

    def step_backward(self):
        """Step j of the chunk, t = tt: the gate's and D's gradients, then per state the
        adjoint and the gradients it feeds."""
        w, n, W, sel, ins = self.w, self.n, self.W, self.sel, self.names
        x = self.x_at("x")
        with self.lanes():
            w("ysum[v] = T.float32(0.0)")
        with self.loop("s", n):
            with self.lanes():
                w(f"ysum[v] = ysum[v] + {self.bc_at('C')} * hs[j + 1, s, v]")
        self.token_head("ysum[v]")
        with self.loop("s", n):
            with self.lanes():
                c = self.coefficients("j", extra=True)
                B, C = self.bc_at("B"), self.bc_at("C")
                lam = w.let("lam", f"{C} * dyv[v] + mu[s, v]")
                dabar = w.let("dabar", f"{lam} * hs[j, s, v]")
                dbbar = w.let("dbbar", f"{lam} * {B} * {x}")
                dbbarp = w.let("dbbarp", f"{lam} * {self.previous()}") if self.trap else None

                def chain(var):
                    terms = [f"{dabar} * {c['abar_' + var]}" if c[f"abar_{var}"] else None,
                             f"{dbbar} * {c['bbar_' + var]}" if c[f"bbar_{var}"] else None]
                    if self.trap and c[f"bbar_prev_{var}"]:
                        terms.append(f"{dbbarp} * {c['bbar_prev_' + var]}")
                    terms = [t for t in terms if t]
                    return " + ".join(terms) if terms else "T.float32(0.0)"
                w(f"ddv[v] = ddv[v] + {chain('dt')}")
                if sel["A"]:
                    w(f"dA[bi, c0 + v, s, tt] = {chain('a')}")
                else:
                    w(f"acc_a[s, v] = acc_a[s, v] + {chain('a')}")
                w(f"dxv[v] = dxv[v] + {lam} * bbar_s[j, s, v] * {B}")
                if self.trap:
                    w(f"dxn[v] = dxn[v] + {lam} * bbarp_s[j, s, v] * {self.bc_at('B', 'tp')}")
                    if sel["B"]:
                        w(f"dbpv[s, v] = {lam} * bbarp_s[j, s, v] * {self.xp()}")
                    else:
                        w(f"acc_b[s, v] = acc_b[s, v] + {lam} * bbarp_s[j, s, v] * {self.xp()}")
                if sel["B"]:
                    w(f"dbv[s, v] = {lam} * bbar_s[j, s, v] * {x}")
                else:
                    w(f"acc_b[s, v] = acc_b[s, v] + {lam} * bbar_s[j, s, v] * {x}")
                if not sel["C"]:
                    w(f"acc_c[s, v] = acc_c[s, v] + dyv[v] * hs[j + 1, s, v]")
                w(f"mu[s, v] = abar_s[j, s, v] * {lam}")
        # dB, dC of the group's channels at this token: summed over the task's lanes into the
        # task's partial (zeroed by the launcher)
        for name, term in (("B", "dbv[s, v]"), ("C", "dyv[v] * hs[j + 1, s, v]")):
            if not sel[name]:
                continue
            def at(t):
                return f"d{name}[part, bi, g, {t}, s]"
            with self.loop("s", n):
                with self.loop("v", W):
                    w(f"{at('tt')} = {at('tt')} + {term}")
                    if self.trap and name == "B":   # the previous token's B (zero at the first)
                        w(f"{at('tp')} = {at('tp')} + dbpv[s, v]")
        self.token_tail()

    def token_head(self, y_sum: str):
        """Step j, per lane, before the states: the gate's gradient (``y_sum``: the readout
        before D and the gate), dL/dy into ``dyv``, D's gradient, and the per-lane sums
        zeroed."""
        w, ins = self.w, self.names
        x = self.x_at("x")
        with self.lanes():
            g = self.x_at("dout")
            if "z" in ins:
                z = self.x_at("z")
                sig = w.let("sig", f"T.float32(1.0) / (T.float32(1.0) + T.exp(T.float32(0.0) - {z}))")
                y = y_sum + (f" + {self.d_at()} * {x}" if "D" in ins else "")
                w(f"{self.x_at('dz')} = {g} * ({y}) * {sig} * (T.float32(1.0) + {z} * "
                  f"(T.float32(1.0) - {sig}))")
                w(f"dyv[v] = {g} * {z} * {sig}")
            else:
                w(f"dyv[v] = {g}")
            if "D" in ins:
                w(f"acc_d[v] = acc_d[v] + dyv[v] * {x}")
                w(f"dxv[v] = {self.d_at()} * dyv[v]")
            else:
                w("dxv[v] = T.float32(0.0)")
            w("ddv[v] = T.float32(0.0)")
            if self.trap:
                w("dxn[v] = T.float32(0.0)")

    def token_tail(self):
        """Step j, per lane, after the states: dx (with the next token's previous-input term),
        and dΔ through the Δ map to the raw dt and its bias."""
        w, sel, ins, W = self.w, self.sel, self.names, self.W
        with self.lanes():
            if self.trap:
                w(f"{self.x_at('dx')} = dxv[v] + dxc[v]")
                w("dxc[v] = dxn[v]")
            else:
                w(f"{self.x_at('dx')} = dxv[v]")
            raw = self.raw_dt()
            names = {"dt_raw": raw, "dt_bias": self.bias() or "T.float32(0.0)"}
            # printed like the forward's Δ map (its vectorizable softplus as let-lines)
            slope = DeltaPrinter(w, names).doprint(sp.sympify(self.delta_raw))
            dr = w.let("ddr", f"ddv[v] * ({slope})")
            if sel["dt"]:
                w(f"ddt[bi, c0 + v, tt] = {dr}")
            else:
                w(f"acc_dt[v] = acc_dt[v] + {dr}")
            if "bias" in ins:
                w(f"acc_bias[v] = acc_bias[v] + {dr}")

    # ---- complex-diagonal A -------------------------------------------------------------------
    # The same passes as channel_block / step_backward, each complex value a (re, im) pair of
    # buffers or lets; the module's docstring has the conjugation rules.
    def complex_allocations(self):
        n, W, K = self.n, self.W, self.K
        pairs = [("h", (n, W)), ("mu", (n, W)), ("hs", (K + 1, n, W)), ("abar_s", (K, n, W)),
                 ("bbar_s", (K, n, W)), ("acc_a", (n, W)), ("acc_b", (n, W)),
                 ("acc_c", (n, W)), ("dbv", (n, W))]
        if self.trap:
            pairs += [("bbarp_s", (K, n, W)), ("dbpv", (n, W))]
        for name, shape in pairs:
            self.alloc(f"{name}_re", shape)
            self.alloc(f"{name}_im", shape)
        if self.trap:
            self.alloc("dxc", (W,))
            self.alloc("dxn", (W,))
        self.alloc("dts", (K, W))
        for name in ("acc_dt", "acc_d", "acc_bias", "ysum", "dyv", "dxv", "ddv"):
            self.alloc(name, (W,))

    def complex_coefficients(self, j: str, extra: bool) -> Dict[str, Cx]:
        """The split Ā, B̄ (B̄₋) of step j at state s, lane v (with ``extra`` their split
        derivatives), printed with shared subexpressions (one exp, cos and sin per argument)
        into let names; {key: (re, im)}, None for a part that is exactly 0."""
        w = self.w
        keys = dict(self.coef)
        if extra:
            keys.update(self.der)
        a_re, a_im = self.a_pair()
        printer = _StablePrinter(w, {"dt": f"dts[{j}, v]", "a_re": a_re, "a_im": a_im})
        exprs = {f"{k}_{p}": stable_form(sp.sympify(e))
                 for k, parts in keys.items() for p, e in zip(("re", "im"), parts)
                 if sp.sympify(e) != 0}
        temps = (sp.Symbol(w.names("cx")) for _ in iter(int, 1))
        replacements, reduced = sp.cse(list(exprs.values()), symbols=temps)
        for sym, sub in replacements:
            w(f"{sym.name}: T.let = {printer.doprint(sub)}")
        finals = {k: w.let(k, printer.doprint(e)) for k, e in zip(exprs, reduced)}
        return {k: tuple(finals.get(f"{k}_{p}") for p in ("re", "im")) for k in keys}

    def complex_drive(self, c: Dict[str, Cx], h: Cx) -> Cx:
        """Ā h + B̄ B_t x_t (+ B̄₋ B_{t-1} x_{t-1}) of state s, lane v."""
        x = self.x_at("x")
        bx = tuple(f"{b} * {x}" for b in self.bc_pair("B"))
        terms = [_cmul(c["abar"], h), _cmul(c["bbar"], bx)]
        if self.trap:
            terms.append(_cmul(c["bbar_prev"], self.xp_pair()))
        return _cadd(*terms)

    def complex_block(self):
        w, n, K, sel = self.w, self.n, self.K, self.sel
        # ---- pass 1: the state at every chunk's start
        with self.loop("s", n):
            with self.lanes():
                for part, h in enumerate(self.pair("h", "s, v")):
                    w(f"{h} = T.Select(has_init != 0, "
                      f"{self.st('h0', 'T.min(sq, ninit - 1)', part=part)}, T.float32(0.0))")
        with self.loop("t", "t_len"):
            w("tt: T.let = t_begin + t")
            if self.trap:
                w("tp: T.let = T.max(tt - 1, t_begin)")
            with w.block(f"if t % {K} == 0:"):
                with self.loop("s", n):
                    with self.lanes():
                        for part, h in enumerate(self.pair("h", "s, v")):
                            w(f"{self.st('ck', mid=f't // {K}', part=part)} = {h}")
            with self.lanes():
                w(f"dts[0, v] = {delta_expr(w, self.plan.disc, self.raw_dt(), self.bias())}")
            with self.loop("s", n):
                with self.lanes():
                    c = self.complex_coefficients("0", extra=False)
                    h = self.pair("h", "s, v")
                    new = self.let_pair("hn", self.complex_drive(c, h))
                    self.assign(h, new)
        # ---- pass 2: μ enters as the conjugate of the final state's gradient
        with self.loop("s", n):
            with self.lanes():
                w(f"mu_re[s, v] = T.Select(has_dhT != 0, "
                  f"{self.st('dhT', 'T.min(sq, nfin - 1)', part=0)}, T.float32(0.0))")
                w(f"mu_im[s, v] = T.Select(has_dhT != 0, T.float32(0.0) - "
                  f"{self.st('dhT', 'T.min(sq, nfin - 1)', part=1)}, T.float32(0.0))")
                for name in ("acc_a", "acc_b", "acc_c"):
                    self.assign(self.pair(name, "s, v"), (ZERO, ZERO))
        with self.lanes():
            for name in ("acc_dt", "acc_d", "acc_bias") + (("dxc",) if self.trap else ()):
                w(f"{name}[v] = T.float32(0.0)")
        with self.loop("ci", f"(t_len + {K - 1}) // {K}"):
            w(f"c: T.let = (t_len + {K - 1}) // {K} - 1 - ci")
            w(f"nt: T.let = T.min({K}, t_len - c * {K})")
            # recompute the chunk's states, Ā and B̄
            with self.loop("s", n):
                with self.lanes():
                    for part, h in enumerate(self.pair("hs", "0, s, v")):
                        w(f"{h} = {self.st('ck', mid='c', part=part)}")
            with self.loop("j", "nt"):
                w(f"tt: T.let = t_begin + c * {K} + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                with self.lanes():
                    w(f"dts[j, v] = {delta_expr(w, self.plan.disc, self.raw_dt(), self.bias())}")
                with self.loop("s", n):
                    with self.lanes():
                        c = self.complex_coefficients("j", extra=False)
                        stored = {"abar": "abar_s", "bbar": "bbar_s", "bbar_prev": "bbarp_s"}
                        for key, buf in stored.items():
                            if key in c:
                                self.assign(self.pair(buf, "j, s, v"), c[key])
                        c = {key: self.pair(buf, "j, s, v") for key, buf in stored.items()
                             if key in c}
                        self.assign(self.pair("hs", "j + 1, s, v"),
                                    self.complex_drive(c, self.pair("hs", "j, s, v")))
            with self.loop("jj", "nt"):
                w("j: T.let = nt - 1 - jj")
                w(f"tt: T.let = t_begin + c * {K} + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                self.complex_step()
        # complex gradients are stored conjugated (torch's convention)
        with self.loop("s", n):
            with self.lanes():
                self.assign((self.st("dh0", part=0), self.st("dh0", part=1)),
                            self.pair("mu", "s, v"), conj=True)
                for name, acc in (("A", "acc_a"), ("B", "acc_b"), ("C", "acc_c")):
                    if not sel[name]:
                        self.assign((f"d{name}[sq, c0 + v, s, 0]", f"d{name}[sq, c0 + v, s, 1]"),
                                    self.pair(acc, "s, v"), conj=True)
        self.lane_stores()

    def complex_step(self):
        """Step j of the chunk (complex A), as ``step_backward``."""
        w, n, W, sel = self.w, self.n, self.W, self.sel
        x = self.x_at("x")
        with self.lanes():
            w("ysum[v] = T.float32(0.0)")
        with self.loop("s", n):
            with self.lanes():
                (cr, ci), (hr, hi) = self.bc_pair("C"), self.pair("hs", "j + 1, s, v")
                w(f"ysum[v] = ysum[v] + {cr} * {hr} - {ci} * {hi}")
        self.token_head("T.float32(2.0) * ysum[v]")    # y = 2 Re(C h) + D x
        two_dy = "T.float32(2.0) * dyv[v]"
        with self.loop("s", n):
            with self.lanes():
                c = self.complex_coefficients("j", extra=True)
                B, C = self.bc_pair("B"), self.bc_pair("C")
                mu = self.pair("mu", "s, v")
                lam = self.let_pair("lam", tuple(f"{two_dy} * {cp} + {m}" for cp, m in zip(C, mu)))
                dabar = self.let_pair("dabar", _cmul(lam, self.pair("hs", "j, s, v")))
                dbbar = self.let_pair("dbbar", _cmul(lam, tuple(f"{b} * {x}" for b in B)))
                dbbarp = self.let_pair("dbbarp", _cmul(lam, self.xp_pair())) if self.trap else None

                def chain(var):
                    terms = [_cmul(dabar, c[f"abar_{var}"]), _cmul(dbbar, c[f"bbar_{var}"])]
                    if self.trap:
                        terms.append(_cmul(dbbarp, c[f"bbar_prev_{var}"]))
                    return _cadd(*terms)
                ddt = chain("dt")[0]
                if ddt is not None:
                    w(f"ddv[v] = ddv[v] + {ddt}")
                da = chain("a")
                if sel["A"]:
                    self.assign((f"dA[bi, c0 + v, s, tt, 0]", f"dA[bi, c0 + v, s, tt, 1]"), da,
                                conj=True)
                else:
                    self.accumulate(self.pair("acc_a", "s, v"), da)
                lb = self.let_pair("lb", _cmul(lam, self.pair("bbar_s", "j, s, v")))
                w(f"dxv[v] = dxv[v] + {_text(_cmul(lb, B)[0])}")
                if self.trap:
                    lbp = self.let_pair("lbp", _cmul(lam, self.pair("bbarp_s", "j, s, v")))
                    w(f"dxn[v] = dxn[v] + {_text(_cmul(lbp, self.bc_pair('B', 'tp'))[0])}")
                    dbp = tuple(f"{p} * {self.xp()}" for p in lbp)
                    if sel["B"]:
                        self.assign(self.pair("dbpv", "s, v"), dbp)
                    else:
                        self.accumulate(self.pair("acc_b", "s, v"), dbp)
                db = tuple(f"{p} * {x}" for p in lb)
                if sel["B"]:
                    self.assign(self.pair("dbv", "s, v"), db)
                else:
                    self.accumulate(self.pair("acc_b", "s, v"), db)
                if not sel["C"]:
                    self.accumulate(self.pair("acc_c", "s, v"), tuple(
                        f"{two_dy} * {h}" for h in self.pair("hs", "j + 1, s, v")))
                # μ_{t-1} = Ā_t λ_t as lets first: both parts read λ, which read μ
                self.assign(mu, self.let_pair("mun", _cmul(self.pair("abar_s", "j, s, v"), lam)))
        # dB, dC at this token, conjugated, into the task's partial (zeroed by the launcher)
        for name, term in (("B", self.pair("dbv", "s, v")),
                           ("C", tuple(f"{two_dy} * {h}" for h in self.pair("hs", "j + 1, s, v")))):
            if not sel[name]:
                continue

            def at(t, part):
                return f"d{name}[part, bi, g, {t}, s, {part}]"
            with self.loop("s", n):
                with self.loop("v", W):
                    self.accumulate((at("tt", 0), at("tt", 1)), term, conj=True)
                    if self.trap and name == "B":   # the previous token's B (zero at the first)
                        self.accumulate((at("tp", 0), at("tp", 1)), self.pair("dbpv", "s, v"),
                                        conj=True)
        self.token_tail()


def generate(plan: KernelPlan, config: dict) -> str:
    return _Backward(plan, config).generate()
