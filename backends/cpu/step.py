"""The decode step (state_update convention): one token, the state updated in place.

Here the state is the whole memory traffic (Mamba-2 h24 p64 n128: 768 KB read and written per
token), so the kernel walks it in its own layout: the innermost loop is vectorized over the
state index n, which is contiguous, and the readout y = sum_n C h ends with a halving tree.
Per-channel values (Δ, Bbar x, the epilogue) are vectorized over a block of channels around
it; for scalar A, Abar/Bbar are one scalar per head.
"""
from __future__ import annotations

from typing import Dict, List

from ssmc.ir import AStructure, KernelPlan, Sharing

from . import buffers
from . import coeffs as co
from .fastmath import LOG2E, MathOptions, f32
from .tir import Writer, delta_expr, epilogue, lanes_for, match_buffer, scalar_temporaries

ZERO = "(T.float32(0.0))"


def default_config(plan: KernelPlan) -> dict:
    fam = plan.family
    if fam.A.structure is AStructure.SCALAR:
        return {}
    return {"lanes": lanes_for(fam.dims.d_inner // fam.dims.groups, 16)}


class _Step:
    def __init__(self, plan: KernelPlan, config: dict):
        self.plan = plan
        self.fam = fam = plan.family
        self.ssd = fam.A.structure is AStructure.SCALAR
        self.cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
        self.n, self.g = fam.dims.state, fam.dims.groups
        self.disc = plan.disc
        self.cp = co.plan_coefficients(plan.disc)
        if not self.cp.is_zero("bbar_prev"):
            raise ValueError("the decode step has no previous input (trapezoidal method)")
        self.CB = int(config.get("lanes") or default_config(plan).get("lanes") or 1)
        # the state row is walked in chunks of NV lanes: s = sc * NV + v
        self.NV = lanes_for(self.n, 16)
        self.S = f"(sc * {self.NV} + v)"
        self.w = Writer()
        self.w.math = MathOptions.for_config(config)
        self.scratch: List[str] = []

    def declare(self, name):
        if name not in self.scratch:
            self.scratch.append(name)

    def alloc(self, name, size):
        self.w(f'{name} = T.alloc_buffer(({size},), "float32", scope="global")')

    # ---- text ---------------------------------------------------------------------------------
    def generate(self) -> str:
        fam, w, n, g = self.fam, self.w, self.n, self.g
        args = [f"{name}_h" for name, _ in buffers.inputs(self.plan) + buffers.outputs(self.plan)]
        w("# ssmc CPU decode step (generated; see backends/cpu/step.py)")
        w("@T.prim_func")
        w(f"def ssmc_step({', '.join(a + ': T.handle' for a in args)}):")
        w.depth += 1
        w('T.func_attr({"global_symbol": "ssmc_step", "tir.noalias": True})')
        w("nb = T.int64()")
        buffers.buffers(w, self.plan, buffers.sizes_of(fam, b="nb"))
        if self.ssd:
            self.heads()
        else:
            self.channels()
        return w.text()

    def bc(self, name: str, spec, unit_index: str) -> tuple:
        S = self.S
        if spec.selective:
            base = f"{name}[bi, g, {S}"
        elif spec.sharing is Sharing.GROUP:
            base = f"{name}[g, {S}"
        else:
            base = f"{name}[{unit_index}, {S}"
        if self.cplx:
            return f"{base}, 0]", f"{base}, 1]"
        return (f"{base}]",)

    def reduce(self, buf: str, lanes: int) -> str:
        """Sum of buf[0:lanes] (a power of two) by halving: vectorlow + vectorhigh, which LLVM
        turns into extract/shuffle + add, 4 steps for 16 lanes. Returns the text."""
        w = self.w
        if lanes == 1:
            return f"{buf}[0]"
        cur = w.let("r", f"{buf}[T.Ramp(0, 1, {lanes})]")
        half = lanes // 2
        while half >= 1:
            ty = f"float32x{half}" if half > 1 else "float32"
            cur = w.let("r", f'T.vectorlow("{ty}", {cur}) + T.vectorhigh("{ty}", {cur})')
            half //= 2
        return cur

    def update_row(self, coef: Dict[str, object], state_at, dtx: str, unit_index: str):
        """Inside the chunk loop over s = sc * NV + v: h = Abar h + Bbar x B; acc += Re(C h)."""
        fam, w = self.fam, self.w
        B = self.bc("B", fam.B, unit_index)
        C = self.bc("C", fam.C, unit_index)
        if self.cplx:
            (ar, ai), (br, bi) = coef["abar"], coef["bbar"]
            hr, hi = state_at(0), state_at(1)
            bxr = w.let("bxr", f"{B[0]} * {dtx}")
            bxi = w.let("bxi", f"{B[1]} * {dtx}")
            inr = f"{br} * {bxr}" + ("" if bi == ZERO else f" - {bi} * {bxi}")
            ini = f"{br} * {bxi}" + ("" if bi == ZERO else f" + {bi} * {bxr}")
            nr = w.let("hn_re", f"{ar} * {hr} - {ai} * {hi} + {inr}")
            ni = w.let("hn_im", f"{ar} * {hi} + {ai} * {hr} + {ini}")
            w(f"{hr} = {nr}")
            w(f"{hi} = {ni}")
            w(f"acc[v] = acc[v] + {C[0]} * {nr} - {C[1]} * {ni}")
        else:
            h = state_at(None)
            if "bbar" in coef:
                inp = f"{coef['bbar']} * ({B[0]} * {dtx})"
            else:
                inp = f"{dtx} * {B[0]}"
            nh = w.let("hn", f"{coef['abar']} * {h} + {inp}")
            w(f"{h} = {nh}")
            w(f"acc[v] = acc[v] + {C[0]} * {nh}")

    # ---- diagonal / complex diagonal: blocks of CB channels -------------------------------------
    def channels(self):
        fam, w, CB, cp = self.fam, self.w, self.CB, self.cp
        d = fam.dims.d_inner
        blocks = d // CB
        with w.block(f"for task in T.parallel(nb * {blocks}):"):
            w(f"bi: T.let = task // {blocks}")
            w(f"c0: T.let = task % {blocks} * {CB}")
            w(f"g: T.let = c0 // {d // self.g}")
            for name in ("dtv", "xv", "yv", "dtx"):
                self.alloc(name, CB)
            self.alloc("acc", self.NV)
            # A Bbar that does not depend on A (exp-Euler: Δ) folds into Bbar x per channel.
            tok = not cp.depends_on_a("bbar") and not self.cplx
            with w.block(f"for v in T.vectorized({CB}):"):
                raw = "dt[bi, c0 + v]" if fam.delta.selective else "dt[c0 + v]"
                w(f"dtv[v] = {delta_expr(w, self.disc, raw, 'bias[c0 + v]')}")
                w("xv[v] = x[bi, c0 + v]")
                if tok:
                    lines: List[str] = []
                    vals = co.emit(cp, ["bbar"], lines, w.ind, w.names, {"dt": "dtv[v]"},
                                   opts=w.math)
                    w.extend(lines)
                    w(f"dtx[v] = {vals['bbar']} * xv[v]")
                else:
                    w("dtx[v] = xv[v]")
            with w.block(f"for c in T.serial({CB}):"):
                self.channel_row(tok)
            with w.block(f"for v in T.vectorized({CB}):"):
                y = "T.float32(2.0) * yv[v]" if self.cplx else "yv[v]"
                d_t = "D[c0 + v]" if fam.D is not None else None
                z_t = "z[bi, c0 + v]" if fam.gate is not None else None
                w(f"y[bi, c0 + v] = {epilogue(w, fam, y, 'xv[v]', d_t, z_t)}")

    def channel_row(self, tok: bool):
        """One channel's state row, in chunks of NV lanes, then its readout."""
        fam, w, n, cp, NV = self.fam, self.w, self.n, self.cp, self.NV
        with w.block(f"for v in T.vectorized({NV}):"):
            w("acc[v] = T.float32(0.0)")
        with w.block(f"for sc in T.unroll({n // NV}):"):
            with w.block(f"for v in T.vectorized({NV}):"):
                base = f"A[bi, c0 + c, {self.S}" if fam.A.selective else f"A[c0 + c, {self.S}"
                if self.cplx:
                    env = {"a_re": base + ", 0]", "a_im": base + ", 1]"}
                else:
                    env = {"a": base + "]"}
                env["dt"] = "dtv[c]"
                outs = ["abar"] + ([] if tok else ["bbar"])
                lines: List[str] = []
                vals = co.emit(cp, outs, lines, w.ind, w.names, env, opts=w.math)
                w.extend(lines)

                def state_at(part):
                    return f"state[bi, c0 + c, {self.S}{'' if part is None else f', {part}'}]"
                self.update_row(vals, state_at, "dtx[c]", "c0 + c")
        w(f"yv[c] = {self.reduce('acc', NV)}")

    # ---- scalar A: one task per (batch, head) ---------------------------------------------------
    def heads(self):
        fam, w, n, cp = self.fam, self.w, self.n, self.cp
        H, P = fam.dims.heads, fam.dims.head_dim
        with w.block(f"for task in T.parallel(nb * {H}):"):
            w(f"bi: T.let = task // {H}")
            w(f"hh: T.let = task % {H}")
            w(f"g: T.let = hh // {H // self.g}")
            alloc_at, alloc_ind = len(w.lines), w.ind
            for name in ("yv", "dtx"):
                self.alloc(name, P)
            self.alloc("acc", self.NV)
            for name in ("hc_abar", "hc_bbar"):
                self.alloc(name, 1)
            start = len(w.lines)
            raw = "dt[bi, hh]" if fam.delta.selective else "dt[hh]"
            a = "A[bi, hh]" if fam.A.selective else "A[hh]"
            env = {"a": a, "dt": delta_expr(w, self.disc, raw, "bias[hh]")}
            if not fam.A.selective:
                env["a_l2"] = w.let("a_l2", f"A[hh] * {f32(LOG2E)}")
            lines: List[str] = []
            vals = co.emit(cp, ["abar", "bbar"], lines, w.ind, w.names, env, opts=w.math)
            w.extend(lines)
            w(f"hc_abar[0] = {vals['abar']}")
            w(f"hc_bbar[0] = {vals['bbar']}")
            w.lines[start:] = scalar_temporaries(w.lines[start:], self.declare)
            w.lines[alloc_at:alloc_at] = [
                f'{alloc_ind}{nm} = T.alloc_buffer((1,), "float32", scope="global")'
                for nm in self.scratch]
            with w.block(f"for pv in T.vectorized({P}):"):
                w("dtx[pv] = hc_bbar[0] * x[bi, hh, pv]")
            with w.block(f"for p in T.serial({P}):"):
                with w.block(f"for v in T.vectorized({self.NV}):"):
                    w("acc[v] = T.float32(0.0)")
                with w.block(f"for sc in T.unroll({n // self.NV}):"):
                    with w.block(f"for v in T.vectorized({self.NV}):"):
                        self.update_row({"abar": "hc_abar[0]"},
                                        lambda part: f"state[bi, hh, p, {self.S}]", "dtx[p]", "hh")
                total = self.reduce("acc", self.NV)
                w(f"yv[p] = {total}")
            with w.block(f"for pv in T.vectorized({P}):"):
                d_t = None
                if fam.D is not None:
                    d_t = "D[hh, pv]" if fam.D.sharing is Sharing.HEAD_DIM else "D[hh]"
                z_t = "z[bi, hh, pv]" if fam.gate is not None else None
                w(f"y[bi, hh, pv] = {epilogue(w, fam, 'yv[pv]', 'x[bi, hh, pv]', d_t, z_t)}")


def generate(plan: KernelPlan, config: dict) -> str:
    return _Step(plan, config).generate()
