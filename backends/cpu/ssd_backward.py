"""The backward kernel of scalar A (Mamba-2 / SSD) as TVMScript: ``ssmc_ssd_backward``.

The math is the scan's adjoint recurrence (``ssmc.ir.Derivatives``; scan_backward.py is the
diagonal case); with one Ā_t, B̄_t per (head, token) it splits into head_dim independent rows:
row p of a head's state is an n-vector h_t[p, :] = Ā_t h_{t-1}[p, :] + B̄_t x_t[p] B_t (+ the
trapezoidal rule's B̄₋_t x_{t-1}[p] B_{t-1}). Per row and token, with dy = dL/dy_pre
(dout times the gate) and λ = C_t dy_t[p] + μ, μ_{t-1} = Ā_t λ:

    dx_t[p]   = B̄_t G_t[p] + D dy_t[p],   G_t[p] = Σ_n λ B_t        (a row's sum over n)
    dB_t      = B̄_t Σ_p λ x_t[p],  dC_t = Σ_p dy_t[p] h_t[p, :]      (sums over the rows)
    dL/dĀ_t   = Σ_p Σ_n λ h_{t-1},  dL/dB̄_t = Σ_p x_t[p] G_t[p]       (one number per head-token)

and dΔ_t, dA follow from those two numbers times the plan's sympy derivatives, printed here
once per (head, token) (never per state element). The gate's derivative is printed from the
pass too (``Derivatives.gate``, ``gate_dz``).

Layout (bench/NOTES_cpu.md has the measurements): the vector lanes run along the state (n),
so h, μ and λ of a row are n/16 registers and B_t, C_t, dB_t, dC_t are vectors shared by the
rows; the rows are walked in blocks of R (``bwd_rows``), so B_t and C_t are loaded once per
block and dB_t, dC_t are summed over the block in registers before one add into memory.
Only G and the readout y (for the gate's derivative) need a sum across the lanes, once per
(row, token).

Memory: nothing per token is kept from the forward. A row block walks its sequence forward
once, storing its state every ``ckpt`` steps (``ck``: the task's row block only, l / ckpt x R x
n floats, in L2; one for all heads would be l h p n / ckpt, 100 MB at Mamba-2's l2048 h24,
whose page faults alone took 25 ms a call); then backward chunk by chunk: the chunk's states
are recomputed from its checkpoint into a local tile (ckpt + 1 states of R rows), and the
reverse walk reads h_{t-1} and h_t from it exactly (no division by Ā).

Work: tasks are (sequence, group, part), a part being a range of the group's heads (a head
stays in one task: what is per head is summed without atomics); dB and dC are added into the
part's partial, which the launcher sums (deterministic). Per head: a token pass computes Δ,
Ā, B̄ (``tc``), zeroes the per-token sums (``tacc``) and stores dy in dx; the row blocks; a
token pass turns the sums into dΔ, dt's and its bias's gradients, dA, dD and dz (the walk left
the readout y in dz).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import sympy as sp

from ssmc.ir import KernelPlan
from ssmc.printers import stable_form

from . import buffers, fastmath
from .fastmath import MathOptions
from .tir import DeltaPrinter, Writer, delta_expr, lanes_for, match_buffer, scalar_temporaries

FUNC = "ssmc_ssd_backward"
DEFAULT_CKPT = 16
DEFAULT_ROWS = 4
ZERO = "T.float32(0.0)"


def supports_backward(plan: KernelPlan) -> Optional[str]:
    f = plan.family
    if f.A.selective or not f.delta.selective:
        return ("the cpu backward of scalar A (SSD) is generated for a constant A and a "
                "per-token Δ, as Mamba-2 has them")
    if not (f.B.selective and f.C.selective):
        return "the cpu backward of scalar A (SSD) is generated for per-token B and C"
    if f.gate and f.gate.kind != "silu":
        return f"the cpu backward knows the silu gate, not {f.gate.kind}"
    der = plan.disc.derivatives
    if der is None:
        return "the plan carries no derivatives of its discretization"
    if f.gate is not None and der.gate_dz is None:
        return "the plan carries no derivative of its gate"
    return None


def checkpoint(config: dict) -> int:
    return int(config.get("ckpt", DEFAULT_CKPT))


class _FastPrinter(DeltaPrinter):
    """TIR printer whose exp is fastmath's polynomial (let-lines; T.exp is a libm call, per
    lane in vector code), softplus DeltaPrinter's, expm1 (``stable_form``) fastmath's."""

    def _print_exp(self, expr):
        lines: List[str] = []
        out = fastmath.exp(lines, self._w.ind, self._w.names, self._print(expr.args[0]),
                           opts=self._w.math)
        self._w.extend(lines)
        return out

    def _print_expm1(self, expr):
        x = self._w.let("em1_x", self._print(expr.args[0]))
        lines: List[str] = []
        e = fastmath.exp(lines, self._w.ind, self._w.names, x, opts=self._w.math)
        out = fastmath.expm1_from(lines, self._w.ind, self._w.names, x, e)
        self._w.extend(lines)
        return out


class _Gen:
    def __init__(self, plan: KernelPlan, config: dict):
        self.plan, self.fam = plan, plan.family
        f = self.fam
        self.H, self.P, self.n, self.g = f.dims.heads, f.dims.head_dim, f.dims.state, f.dims.groups
        self.hpg = self.H // self.g
        self.W = lanes_for(self.n, 16)                # lanes along the state
        self.NV = self.n // self.W
        self.R = lanes_for(self.P, int(config.get("bwd_rows", DEFAULT_ROWS)))
        self.WP = lanes_for(self.P, 16)               # lanes along head_dim (token passes)
        self.K = checkpoint(config)
        self.w = Writer()
        self.w.math = MathOptions.for_config(config)
        disc, der = plan.disc, plan.disc.derivatives
        self.der = der
        self.trap = sp.sympify(disc.bbar_prev) != 0
        self.coef = {"abar": disc.abar, "bbar": disc.bbar}
        self.slopes = {"abar": (der.abar_dt, der.abar_a), "bbar": (der.bbar_dt, der.bbar_a)}
        if self.trap:
            self.coef["bbarp"] = disc.bbar_prev
            self.slopes["bbarp"] = (der.bbar_prev_dt, der.bbar_prev_a)
        # tc planes: Δ, then each coefficient; tacc planes: dL/d(coefficient) per head-token
        self.tc = {"delta": 0, **{k: i + 1 for i, k in enumerate(self.coef)}}
        # and the forward pass's weights to the end of the token's checkpoint chunk: the decay
        # Π_{u >= t} Ā_u and B̄ (B̄₋) times Π_{u > t} Ā_u
        for key in ("aend", "bend") + (("bpend",) if self.trap else ()):
            self.tc[key] = len(self.tc)
        self.tacc = {k: i for i, k in enumerate(self.coef)}
        self.names = dict(buffers.inputs(plan))
        self.d_per_p = "D" in self.names and self.names["D"].dims == ("h", "p")
        self.scratch: List[str] = []

    # ---- text helpers --------------------------------------------------------------------
    def alloc(self, name: str, shape) -> None:
        dims = ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "")
        self.w(f'{name} = T.alloc_buffer(({dims}), "float32", scope="global")')

    def loop(self, var: str, count, kind: str = "serial"):
        return self.w.block(f"for {var} in T.{kind}({count}):")

    def has(self, name: str) -> bool:
        return name in self.names

    def tok(self, buf: str, p: str, t: str = "tt") -> str:
        return f"{buf}[bi, {t}, hh, {p}]"

    def coef_at(self, key: str, t: str = "tt") -> str:
        return f"tc[bi, hh, {self.tc[key]}, {t}]"

    def d_at(self, p: str) -> str:
        return f"D[hh, {p}]" if self.d_per_p else "D[hh]"

    def scalar_lines(self, emit) -> None:
        """Run ``emit`` (which writes scalar let-lines) with its lets turned into stores to
        one-element buffers (``tir.scalar_temporaries``: TVM would inline the chains)."""
        start = len(self.w.lines)
        emit()
        self.w.lines[start:] = scalar_temporaries(self.w.lines[start:], self.declare)

    def declare(self, name: str) -> None:
        if name not in self.scratch:
            self.scratch.append(name)

    def lane_sums(self, vectors: List[Tuple[str, int]]) -> None:
        """sums[k] = the sum of the W lanes buf[base : base + W], (buf, base) = vectors[k].

        A transposing tree instead of one halving per vector: two vectors of w lanes, each
        in groups of s lanes (one group per vector summed so far), become one: the first half
        of every group of both (a shuffle) plus the second halves (another), groups of s / 2.
        When a vector holds all of its share, its groups are halved in place the same way,
        down to one lane per vector. 8 sums of 16 lanes: 24 shuffles and adds, not 64."""
        w, W = self.w, self.W
        k = 0
        while k < len(vectors):
            m = 1
            while m * 2 <= min(W, len(vectors) - k):
                m *= 2
            if W == 1:
                buf, base = vectors[k]
                w(f"sums[{k}] = {buf}[{base}]")
                k += 1
                continue
            parts = [(w.let("ls", f"{buf}[T.Ramp({base}, 1, {W})]"), W, 1)   # (text, lanes,
                     for buf, base in vectors[k:k + m]]                     # vectors held)
            while len(parts) > 1:
                nxt = []
                for (a, lanes, na), (b, _, nb) in zip(parts[0::2], parts[1::2]):
                    size = lanes // na                            # lanes per vector so far
                    lo = [g * size + j for g in range(na) for j in range(size // 2)]
                    lo += [lanes + g * size + j for g in range(nb) for j in range(size // 2)]
                    hi = [i + size // 2 for i in lo]
                    nxt.append((w.let("ls", f"T.Shuffle([{a}, {b}], {lo}) + "
                                      f"T.Shuffle([{a}, {b}], {hi})"), lanes, na + nb))
                parts = nxt
            cur, lanes, held = parts[0]
            while lanes > held:
                size = lanes // held
                if lanes == 2:   # to a scalar (a 1-lane Shuffle would be a vector)
                    cur = w.let("ls", f'T.vectorlow("float32", {cur}) + '
                                      f'T.vectorhigh("float32", {cur})')
                    break
                lo = [g * size + j for g in range(held) for j in range(size // 2)]
                hi = [i + size // 2 for i in lo]
                cur = w.let("ls", f"T.Shuffle([{cur}], {lo}) + T.Shuffle([{cur}], {hi})")
                lanes //= 2
            w(f"sums[T.Ramp({k}, 1, {m})] = {cur}" if m > 1 else f"sums[{k}] = {cur}")
            k += m

    # ---- the function ----------------------------------------------------------------------
    def generate(self) -> str:
        w, f, n, H, P = self.w, self.fam, self.n, self.H, self.P
        ins = [name for name, _ in buffers.inputs(self.plan)]
        opt = [k for k in ("D", "z", "bias") if k in ins]
        grads = ["dx", "ddt", "dA", "dB", "dC"] + [f"d{k}" for k in opt] + ["dh0"]
        handles = ins + ["seg", "dout", "dhT", "ck", "tc", "tacc"] + grads
        w("# ssmc CPU SSD backward kernel (generated; see backends/cpu/ssd_backward.py)")
        w("@T.prim_func")
        params = ", ".join(f"{h}_h: T.handle" for h in handles)
        w(f"def {FUNC}({params}, has_init: T.int32, has_dhT: T.int32, parts: T.int32):")
        w.depth += 1
        w(f'T.func_attr({{"global_symbol": "{FUNC}", "tir.noalias": True}})')
        for v in ("nb", "L", "nseg", "ninit", "ntask", "nck", "nparts", "nfin"):
            w(f"{v} = T.int64()")
        sizes = buffers.sizes_of(f, b="nb", l="L")
        for name, op in buffers.inputs(self.plan):
            at = dict(sizes, s="ninit" if name == "h0" else sizes.get("s"))
            match_buffer(w, name, f"{name}_h", buffers.shape(op, at))
        match_buffer(w, "seg", "seg_h", ("nseg", 3), "int64")
        token = ("nb", "L", H, P)
        match_buffer(w, "dout", "dout_h", token)
        match_buffer(w, "dhT", "dhT_h", ("nfin", H, P, n))
        match_buffer(w, "ck", "ck_h", ("ntask", "nck", P, n))
        match_buffer(w, "tc", "tc_h", ("nb", H, len(self.tc), "L"))
        match_buffer(w, "tacc", "tacc_h", ("nb", H, len(self.tacc), "L"))
        match_buffer(w, "dx", "dx_h", token)
        match_buffer(w, "ddt", "ddt_h", ("nb", "L", H))
        match_buffer(w, "dA", "dA_h", ("nseg", H))
        for name in ("B", "C"):
            match_buffer(w, f"d{name}", f"d{name}_h", ("nparts", "nb", "L", self.g, n))
        if "D" in ins:
            match_buffer(w, "dD", "dD_h", ("nseg", H) + ((P,) if self.d_per_p else ()))
        if "z" in ins:
            match_buffer(w, "dz", "dz_h", token)
        if "bias" in ins:
            match_buffer(w, "dbias", "dbias_h", ("nseg", H))
        match_buffer(w, "dh0", "dh0_h", ("nseg", H, P, n))
        with self.loop("task", f"nseg * {self.g} * parts", "parallel"):
            w(f"sq: T.let = task // (parts * {self.g})")
            w(f"g: T.let = task // parts % {self.g}")
            w("part: T.let = task % parts")
            w("bi: T.let = seg[sq, 0]")
            w("t_begin: T.let = seg[sq, 1]")
            w("t_len: T.let = seg[sq, 2] - seg[sq, 1]")
            self.allocations()
            scratch_at, ind = len(w.lines), w.ind
            w(f"per: T.let = ({self.hpg} + parts - 1) // parts")
            with self.loop("kh", f"T.max(T.min(per, {self.hpg} - part * per), 0)"):
                w(f"hh: T.let = g * {self.hpg} + part * per + kh")
                self.head_prologue()
                self.forward_checkpoints()
                self.reverse()
                self.head_epilogue()
            w.lines[scratch_at:scratch_at] = [
                f'{ind}{name} = T.alloc_buffer((1,), "float32", scope="global")'
                for name in self.scratch]
        return w.text()

    def allocations(self):
        R, n, K, W = self.R, self.n, self.K, self.W
        P = self.P
        self.alloc("h", (P, n))
        self.alloc("mu", (P, n))
        self.alloc("hs", (K + 1, R, n))      # a row block's states in the chunk, h_{t0-1} first
        for name in ("dys", "xs") + (("xps",) if self.trap else ()):
            self.alloc(name, (R,))
        for name in ("bx",) + (("bxp", "dxc") if self.trap else ()):
            self.alloc(name, (P,))
        for name in ("yacc", "gacc", "sacc") + (("gpacc",) if self.trap else ()):
            self.alloc(name, (R * W,))
        for name in ("dba", "dca") + (("dbpa",) if self.trap else ()):
            self.alloc(name, (W,))
        self.alloc("xg", (len(self.tacc),))
        self.alloc("decay", (1,))
        self.alloc("sums", (3 * R + 1,))
        self.alloc("hacc", (2,))            # per-head sums: dA, dbias
        if "D" in self.names:
            self.alloc("dacc", (self.P,))

    # ---- per head: token passes ------------------------------------------------------------
    def head_prologue(self):
        """Δ, Ā, B̄ (B̄₋) of every token of the head into tc, the per-token sums zeroed, and
        dy = dout gate(z) into dx (the walk reads it there, then overwrites it with dx)."""
        w, P, WP = self.w, self.P, self.WP
        with self.loop("t", "t_len"):
            w("tt: T.let = t_begin + t")

            def coefficients():
                bias = "bias[hh]" if self.has("bias") else None
                delta = delta_expr(w, self.plan.disc, "dt[bi, tt, hh]", bias)
                w(f"{self.coef_at('delta')} = {delta}")
                names = {"dt": self.coef_at("delta"), "a": "A[hh]"}
                for key, expr in self.coef.items():
                    value = _FastPrinter(w, names).doprint(stable_form(sp.sympify(expr)))
                    w(f"{self.coef_at(key)} = {value}")
            self.scalar_lines(coefficients)
            for k in self.tacc.values():
                w(f"tacc[bi, hh, {k}, tt] = {ZERO}")
            if self.has("z"):
                with self.loop("pb", P // WP):
                    with self.loop("v", WP, "vectorized"):
                        p = f"pb * {WP} + v"
                        gate = self.gate_text(self.tok("z", p))[0]
                        w(f"{self.tok('dx', p)} = {self.tok('dout', p)} * {gate}")
        K = self.K
        with self.loop("ci", f"(t_len + {K - 1}) // {K}"):
            w(f"nt: T.let = T.min({K}, t_len - ci * {K})")
            w("decay[0] = T.float32(1.0)")
            with self.loop("jj", "nt"):
                w(f"tt: T.let = t_begin + ci * {K} + nt - 1 - jj")
                w(f"{self.coef_at('bend')} = {self.coef_at('bbar')} * decay[0]")
                if self.trap:
                    w(f"{self.coef_at('bpend')} = {self.coef_at('bbarp')} * decay[0]")
                w(f"decay[0] = decay[0] * {self.coef_at('abar')}")
                w(f"{self.coef_at('aend')} = decay[0]")

    def gate_text(self, z: str):
        """(gate(z), ∂gate/∂z) printed from the pass, sharing subexpressions, as lets."""
        der, w = self.der, self.w
        printer = _FastPrinter(w, {der.gate_z.name: z})
        temps = (sp.Symbol(w.names("gt")) for _ in iter(int, 1))
        reps, (gate, slope) = sp.cse([der.gate, der.gate_dz], symbols=temps)
        for sym, sub in reps:
            w(f"{sym.name}: T.let = {printer.doprint(sub)}")
        return w.let("gate", printer.doprint(gate)), w.let("gate_dz", printer.doprint(slope))

    def dy_at(self, p: str, t: str = "tt") -> str:
        """dL/dy before the gate: stored in dx by the prologue with a gate, else dout."""
        return self.tok("dx" if self.has("z") else "dout", p, t)

    def head_epilogue(self):
        """dΔ from the per-token sums, through the Δ map to dt and its bias; dA; dD; dz from
        the readout the walk left in dz."""
        w, P, WP, H = self.w, self.P, self.WP, self.H
        for i in range(2):
            w(f"hacc[{i}] = {ZERO}")
        if self.has("D"):
            with self.loop("v", P, "vectorized"):
                w(f"dacc[v] = {ZERO}")
        with self.loop("t", "t_len"):
            w("tt: T.let = t_begin + t")

            def scalars():
                names = {"dt": self.coef_at("delta"), "a": "A[hh]"}
                dd, da = [], []
                for key, (s_dt, s_a) in self.slopes.items():
                    acc = f"tacc[bi, hh, {self.tacc[key]}, tt]"
                    for out, slope in ((dd, s_dt), (da, s_a)):
                        if sp.sympify(slope) != 0:
                            out.append(f"{acc} * ({_FastPrinter(w, names).doprint(slope)})")
                ddelta = w.let("ddelta", " + ".join(dd) if dd else ZERO)
                raw = {"dt_raw": "dt[bi, tt, hh]",
                       "dt_bias": "bias[hh]" if self.has("bias") else ZERO}
                slope = _FastPrinter(w, raw).doprint(sp.sympify(self.der.delta_raw))
                ddr = w.let("ddr", f"{ddelta} * ({slope})")
                w(f"ddt[bi, tt, hh] = {ddr}")
                w(f"hacc[0] = hacc[0] + {' + '.join(da) if da else ZERO}")
                if self.has("bias"):
                    w(f"hacc[1] = hacc[1] + {ddr}")
            self.scalar_lines(scalars)
            if self.has("z") or self.has("D"):
                with self.loop("pb", P // WP):
                    with self.loop("v", WP, "vectorized"):
                        p = f"pb * {WP} + v"
                        x, g = self.tok("x", p), self.tok("dout", p)
                        dy = g
                        if self.has("z"):
                            gate, slope = self.gate_text(self.tok("z", p))
                            dy = w.let("dy", f"{g} * {gate}")
                            pre = self.tok("dz", p) + (f" + {self.d_at(p)} * {x}"
                                                       if self.has("D") else "")
                            w(f"{self.tok('dz', p)} = {g} * ({pre}) * {slope}")
                        if self.has("D"):
                            w(f"dacc[{p}] = dacc[{p}] + {dy} * {x}")
        w("dA[sq, hh] = hacc[0]")
        if self.has("bias"):
            w("dbias[sq, hh] = hacc[1]")
        if self.has("D"):
            if self.d_per_p:
                with self.loop("v", P, "vectorized"):
                    w("dD[sq, hh, v] = dacc[v]")
            else:
                w(f"dD[sq, hh] = {ZERO}")
                with self.loop("v", P):
                    w("dD[sq, hh] = dD[sq, hh] + dacc[v]")

    # ---- per row block ---------------------------------------------------------------------
    def rows(self):
        return self.loop("r", self.R, "unroll")

    def lanes(self):
        return self.loop("v", self.W, "vectorized")

    def drive_rows(self, p0: str, count: int, t: str = "tt"):
        """B̄ x_t (and B̄₋ x_{t-1}) of rows p0 .. p0 + count into bx (bxp)."""
        w = self.w
        with self.loop("r", count):
            w(f"bx[r] = {self.coef_at('bbar', t)} * {self.tok('x', f'{p0}r', t)}")
            if self.trap:
                w(f"bxp[r] = {self.coef_at('bbarp', t)} * T.Select({t} > t_begin, "
                  f"{self.tok('x', f'{p0}r', 'tp')}, {ZERO})")

    def drive(self, h_new: str, h_old: str, t: str = "tt") -> str:
        """The text of h_new = Ā h_old + B̄ x B_t (+ B̄₋ x_{t-1} B_{t-1}) at row r, state s."""
        prev = " + bxp[r] * B[bi, tp, g, s]" if self.trap else ""
        return (f"{h_new} = {self.coef_at('abar', t)} * {h_old} + bx[r] * B[bi, {t}, g, s]"
                f"{prev}")

    def forward_checkpoints(self):
        """The head's state at every chunk's start, all rows at once (B_t loaded once per token
        for the head), each chunk as its end state's sum: h_end = (Π Ā) h_start +
        Σ_t B̄_t (Π_{u > t} Ā_u) x_t B_t, one FMA per state element and token (the recurrence
        is two: the decay is applied once per chunk)."""
        w, n, K, P = self.w, self.n, self.K, self.P
        with self.loop("r", P):
            with self.loop("s", n, "vectorized"):
                w(f"h[r, s] = T.Select(has_init != 0, h0[T.min(sq, ninit - 1), hh, r, s], "
                  f"{ZERO})")
        with self.loop("ci", f"(t_len + {K - 1}) // {K} - 1"):   # the last chunk's end: unused
            w(f"t0: T.let = t_begin + ci * {K}")
            with self.loop("r", P):
                with self.loop("s", n, "vectorized"):
                    w(f"ck[task, ci, r, s] = h[r, s]")
                    w(f"h[r, s] = {self.coef_at('aend', 't0')} * h[r, s]")
            with self.loop("j", K):
                w("tt: T.let = t0 + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                with self.loop("r", P):
                    w(f"bx[r] = {self.coef_at('bend')} * {self.tok('x', 'r')}")
                    if self.trap:
                        w(f"bxp[r] = {self.coef_at('bpend')} * T.Select(tt > t_begin, "
                          f"{self.tok('x', 'r', 'tp')}, {ZERO})")
                prev = " + bxp[r] * B[bi, tp, g, s]" if self.trap else ""
                with self.loop("r", P):
                    with self.loop("s", n, "vectorized"):
                        w(f"h[r, s] = h[r, s] + bx[r] * B[bi, tt, g, s]{prev}")
        with w.block("if t_len > 0:"):   # (an empty packed sequence has no chunk)
            w(f"c_last: T.let = (t_len + {K - 1}) // {K} - 1")
            with self.loop("r", P):
                with self.loop("s", n, "vectorized"):
                    w("ck[task, c_last, r, s] = h[r, s]")

    def reverse(self):
        """Chunk by chunk backward; inside a chunk, row block by row block (the chunk's B, C,
        dB, dC stay in cache while the head's rows pass over them)."""
        w, n, K, R, P = self.w, self.n, self.K, self.R, self.P
        with self.loop("r", P):
            with self.loop("s", n, "vectorized"):
                w(f"mu[r, s] = T.Select(has_dhT != 0, dhT[T.min(sq, nfin - 1), hh, r, s], "
                  f"{ZERO})")
            if self.trap:
                w(f"dxc[r] = {ZERO}")
        with self.loop("ci", f"(t_len + {K - 1}) // {K}"):
            w(f"c: T.let = (t_len + {K - 1}) // {K} - 1 - ci")
            w(f"nt: T.let = T.min({K}, t_len - c * {K})")
            with self.loop("rb", P // R):
                w(f"p0: T.let = rb * {R}")
                with self.rows():
                    with self.loop("s", n, "vectorized"):
                        w("hs[0, r, s] = ck[task, c, p0 + r, s]")
                with self.loop("j", "nt"):
                    w(f"tt: T.let = t_begin + c * {K} + j")
                    if self.trap:
                        w("tp: T.let = T.max(tt - 1, t_begin)")
                    self.drive_rows("p0 + ", R)
                    with self.rows():
                        with self.loop("s", n, "vectorized"):
                            w(self.drive("hs[j + 1, r, s]", "hs[j, r, s]"))
                with self.loop("jj", "nt"):
                    w("j: T.let = nt - 1 - jj")
                    w(f"tt: T.let = t_begin + c * {K} + j")
                    if self.trap:
                        w("tp: T.let = T.max(tt - 1, t_begin)")
                    self.step()
        with self.loop("r", P):
            with self.loop("s", n, "vectorized"):
                w("dh0[sq, hh, r, s] = mu[r, s]")

    def step(self):
        """Token tt of the block's rows, walking backward."""
        w, R, W, gate = self.w, self.R, self.W, self.has("z")
        with self.rows():
            w(f"dys[r] = {self.dy_at('p0 + r')}")
            w(f"xs[r] = {self.tok('x', 'p0 + r')}")
            if self.trap:
                w(f"xps[r] = T.Select(tt > t_begin, {self.tok('x', 'p0 + r', 'tp')}, {ZERO})")
        accs = ["gacc", "sacc"] + (["yacc"] if gate else []) + (["gpacc"] if self.trap else [])
        with self.loop("i", R * W, "vectorized"):
            for a in accs:
                w(f"{a}[i] = {ZERO}")
        abar = w.let("abar", self.coef_at("abar"))
        with self.loop("sv", self.NV):
            w(f"s0: T.let = sv * {W}")
            # lanes outside the rows: B_t, C_t are loaded once for the block, and dB, dC are
            # summed over its rows in registers
            with self.lanes():
                Bv = w.let("Bv", "B[bi, tt, g, s0 + v]")
                Cv = w.let("Cv", "C[bi, tt, g, s0 + v]")
                if self.trap:
                    Bp = w.let("Bp", "B[bi, tp, g, s0 + v]")
                for a in ("dba", "dca") + (("dbpa",) if self.trap else ()):
                    w(f"{a}[v] = {ZERO}")
                with self.rows():
                    hc, hp = "hs[j + 1, r, s0 + v]", "hs[j, r, s0 + v]"
                    lam = w.let("lam", f"{Cv} * dys[r] + mu[p0 + r, s0 + v]")
                    if gate:
                        w(f"yacc[r * {W} + v] = yacc[r * {W} + v] + {Cv} * {hc}")
                    w(f"gacc[r * {W} + v] = gacc[r * {W} + v] + {lam} * {Bv}")
                    w(f"sacc[r * {W} + v] = sacc[r * {W} + v] + {lam} * {hp}")
                    w(f"dba[v] = dba[v] + {lam} * xs[r]")
                    w(f"dca[v] = dca[v] + dys[r] * {hc}")
                    if self.trap:
                        w(f"gpacc[r * {W} + v] = gpacc[r * {W} + v] + {lam} * {Bp}")
                        w(f"dbpa[v] = dbpa[v] + {lam} * xps[r]")
                    w(f"mu[p0 + r, s0 + v] = {abar} * {lam}")
                at = "part, bi, tt, g, s0 + v"
                w(f"dB[{at}] = dB[{at}] + {self.coef_at('bbar')} * dba[v]")
                w(f"dC[{at}] = dC[{at}] + dca[v]")
                if self.trap:   # the previous token's B (dbpa is 0 at a sequence's start)
                    at = "part, bi, tp, g, s0 + v"
                    w(f"dB[{at}] = dB[{at}] + {self.coef_at('bbarp')} * dbpa[v]")
        # Σ of S over the rows first (one accumulator for the block would be a chain of
        # R n / W dependent FMAs per token)
        with self.loop("r", R - 1):
            with self.lanes():
                w(f"sacc[v] = sacc[v] + sacc[(r + 1) * {W} + v]")
        # every lane sum of the token at once: sums[k] is the k-th of
        # G (R rows), y (R rows, with the gate), G₋ (R rows, trapezoidal), S
        at = {}
        vectors = []
        for name in ["gacc"] + (["yacc"] if gate else []) + (["gpacc"] if self.trap else []):
            at[name] = len(vectors)
            vectors += [(name, r * W) for r in range(R)]
        at["sacc"] = len(vectors)
        vectors.append(("sacc", 0))
        self.lane_sums(vectors)
        S = f"sums[{at['sacc']}]"
        w(f"xg[{self.tacc['abar']}] = {S}")
        for k in ("bbar",) + (("bbarp",) if self.trap else ()):
            w(f"xg[{self.tacc[k]}] = {ZERO}")
        with self.rows():
            G = f"sums[{at['gacc']} + r]"
            dx = f"{self.coef_at('bbar')} * {G}"
            if self.has("D"):
                dx += f" + {self.d_at('p0 + r')} * dys[r]"
            if self.trap:
                # dxc: the previous-token term's share of dx at this token, from token tt + 1
                dx += " + dxc[p0 + r]"
            w(f"{self.tok('dx', 'p0 + r')} = {dx}")
            if self.trap:
                Gp = f"sums[{at['gpacc']} + r]"
                w(f"dxc[p0 + r] = {self.coef_at('bbarp')} * {Gp}")
                w(f"xg[{self.tacc['bbarp']}] = xg[{self.tacc['bbarp']}] + xps[r] * {Gp}")
            w(f"xg[{self.tacc['bbar']}] = xg[{self.tacc['bbar']}] + xs[r] * {G}")
            if gate:
                w(f"{self.tok('dz', 'p0 + r')} = sums[{at['yacc']} + r]")
        for k in self.tacc.values():
            w(f"tacc[bi, hh, {k}, tt] = tacc[bi, hh, {k}, tt] + xg[{k}]")


def generate(plan: KernelPlan, config: dict) -> str:
    return _Gen(plan, config).generate()
