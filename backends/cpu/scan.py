"""The scan kernel: one pass over the tokens with the state in registers/L1, as TVMScript.

Layout of the work (the same for every elementwise A; see NOTES_cpu.md for the measurements):

* parallel over (sequence, block of W lanes): for diagonal/complex A the lanes are W channels
  of one group, for scalar A (SSD) they are W elements of one head's head_dim;
* the time loop is serial inside the task, the state loop (n) is unrolled or serial, and the
  innermost loop is ``T.vectorized(W)`` over the lanes, so every exp, FMA and the readout
  y += C h are vector instructions and there is no horizontal reduction;
* per (state, lane) values (a, a*log2 e; for LTI families also Abar/Bbar) are loaded once per
  task into local buffers; per token values that do not depend on A (Δ, Bbar = Δ for
  exp-Euler) are computed once per token, not per state.

For scalar A, Abar/Bbar are one value per (head, token): they are computed once, outside the
vector loops, and the per-state work is two FMAs and a multiply.

Tokens go in tiles of TT: a prologue pass (loads, Δ, Bbar x: independent per token, so the
out-of-order core overlaps them), the recurrence pass, an epilogue pass (D, gate, stores).
The readout y = sum_s C h is split over R partial sums so it is no n-long dependent chain.

Sizes fixed by the family (d, n, g, h, p) are constants in the text; batch, seqlen and the
number of sequences are symbolic, so one compiled kernel serves every shape. Sequences
(batch rows, or varlen pieces of one row) come as a table ``seg`` of (batch row, start, end).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple


from ssmc.ir import AStructure, KernelPlan, Sharing

from . import buffers
from . import coeffs as co
from .fastmath import LOG2E, MathOptions, f32
from .tir import Writer, delta_expr, epilogue, lanes_for, match_buffer, scalar_temporaries

ZERO = "(T.float32(0.0))"


def default_config(plan: KernelPlan) -> dict:
    fam = plan.family
    if fam.A.structure is AStructure.SCALAR:
        # One task per (sequence, head): all of head_dim in one vector loop (LLVM splits it
        # into 512-bit registers), so B_t/C_t and Abar are loaded/computed once per head-token.
        return {"lanes": fam.dims.head_dim if fam.dims.head_dim <= 64 else lanes_for(fam.dims.head_dim, 64),
                "unroll_state": fam.dims.state <= 16, "tile": 32}
    per_group = fam.dims.d_inner // fam.dims.groups
    # 8 lanes (256-bit): measured faster than 16 on Zen 4 (double-pumped 512-bit ops, fewer
    # cross-lane inserts in the per-token gathers); see NOTES_cpu.md
    return {"lanes": lanes_for(per_group, 8), "unroll_state": fam.dims.state <= 64, "tile": 16}


def _cx(a: Tuple[str, str], b: Tuple[str, str]) -> Tuple[str, str]:
    """Complex product of text pairs, dropping terms with a literal zero part."""
    def mul(x, y):
        if ZERO in (x, y):
            return None
        return f"{x} * {y}"

    def add(*terms):
        ts = [t for t in terms if t is not None]
        return " + ".join(ts) if ts else ZERO

    (ar, ai), (br, bi) = a, b
    re = add(mul(ar, br), None if mul(ai, bi) is None else f"-({mul(ai, bi)})")
    im = add(mul(ar, bi), mul(ai, br))
    return f"({re})", f"({im})"


class _Scan:
    def __init__(self, plan: KernelPlan, config: dict, mode: str = "scan"):
        # mode "conv": the boundary pass of the convolution algorithm (LTI only). y arrives as
        # the FFT convolution (ylin); this kernel adds the initial state's free response,
        # applies D and the gate, and runs the state recurrence only for the final state.
        self.mode = mode
        self.plan, self.fam = plan, plan.family
        fam = self.fam
        self.ssd = fam.A.structure is AStructure.SCALAR
        self.cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
        self.n = fam.dims.state
        self.g = fam.dims.groups
        self.lti = not fam.delta.selective and not fam.A.selective
        self.cp = co.plan_coefficients(plan.disc)
        self.trap = not self.cp.is_zero("bbar_prev")
        self.W = int(config.get("lanes") or default_config(plan)["lanes"])
        unit = fam.dims.head_dim if self.ssd else fam.dims.d_inner // self.g
        if unit % self.W:
            raise ValueError(f"lanes={self.W} must divide {'head_dim' if self.ssd else 'channels per group'} ({unit})")
        self.unroll = bool(config.get("unroll_state", default_config(plan)["unroll_state"]))
        self.TT = int(config.get("tile") or default_config(plan)["tile"])
        self.rows = not self.ssd and bool(config.get("row_tiles", True))
        split = int(config.get("readout_split", 4))
        self.R = split if self.unroll and self.n % split == 0 else 1
        self.w = Writer()
        self.w.math = MathOptions.for_config(config)
        self._declared, self._scratch = set(), []

    # ---- indexing -------------------------------------------------------------------------
    def x_at(self, buf: str) -> str:
        return f"{buf}[bi, tt, hh, p0 + v]" if self.ssd else f"{buf}[bi, c0 + v, tt]"

    def bc_at(self, name: str, spec, t: str) -> Tuple[str, ...]:
        """B_s / C_s at token t: one text (real) or two (complex)."""
        if spec.selective:
            # selective-scan B/C arrive token-major, (b, g, l, n): see Runner
            base = f"{name}[bi, {t}, g, s" if self.ssd else f"{name}[bi, g, {t}, s"
        elif spec.sharing is Sharing.GROUP:
            base = f"{name}[g, s"
        elif self.ssd:
            base = f"{name}[hh, s"
        else:
            base = f"{name}c[s, v"   # preloaded per task
            if self.cplx:
                return f"{name}c_re[s, v]", f"{name}c_im[s, v]"
            return (f"{base}]",)
        if self.cplx:
            return f"{base}, 0]", f"{base}, 1]"
        return (f"{base}]",)

    # ---- the text ---------------------------------------------------------------------------
    def signature(self) -> List[str]:
        w = self.w
        names = [n for n, _ in buffers.inputs(self.plan)] + ["seg"] + \
            [n for n, _ in buffers.outputs(self.plan)] + (["ylin"] if self.mode == "conv" else [])
        args = [f"{n}_h" for n in names]
        params = ", ".join(f"{a}: T.handle" for a in args) + ", has_init: T.int32, has_final: T.int32"
        name = self.func_name()
        w("@T.prim_func")
        w(f"def {name}({params}):")
        w.depth += 1
        w(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        for v in ("nb", "L", "nseg", "ninit", "nfin"):
            w(f"{v} = T.int64()")
        return args

    def func_name(self) -> str:
        return "ssmc_conv_boundary" if self.mode == "conv" else "ssmc_scan"

    def buffers(self):
        fam, w = self.fam, self.w
        sizes = buffers.sizes_of(fam, b="nb", l="L")
        # selective-scan B/C arrive token-major, (b, g, l, n): see launch.py
        buffers.buffers(w, self.plan, sizes, token_major=not self.ssd,
                        state_rows={"h0": "ninit", "hT": "nfin"})
        if self.mode == "conv":
            match_buffer(w, "ylin", "ylin_h", buffers.shape(self.plan.operands.outputs[0], sizes))
        match_buffer(w, "seg", "seg_h", ("nseg", 3), "int64")

    def state_at(self, buf: str, part: Optional[int]) -> str:
        tail = "" if part is None else f", {part}"
        if self.ssd:
            return f"{buf}[sq, hh, p0 + v, s{tail}]"
        return f"{buf}[sq, c0 + v, s{tail}]"

    def generate(self) -> str:
        fam, w, W = self.fam, self.w, self.W
        w("# ssmc CPU scan kernel (generated; see backends/cpu/scan.py)")
        self.signature()
        self.buffers()
        if self.ssd:
            H, P = fam.dims.heads, fam.dims.head_dim
            per_head = P // W
            with w.block(f"for task in T.parallel(nseg * {H * per_head}):"):
                w(f"sq: T.let = task // {H * per_head}")
                w(f"hh: T.let = task // {per_head} % {H}")
                w(f"p0: T.let = task % {per_head} * {W}")
                w(f"g: T.let = hh // {H // self.g}")
                self.task_body()
        else:
            d = fam.dims.d_inner
            blocks = d // W
            with w.block(f"for task in T.parallel(nseg * {blocks}):"):
                w(f"sq: T.let = task // {blocks}")
                w(f"c0: T.let = task % {blocks} * {W}")
                w(f"g: T.let = c0 // {d // self.g}")
                self.task_body()
        return w.text()

    def declare(self, name: str) -> None:
        """A one-element scratch buffer, allocated once per task (before the time loop)."""
        if name not in self._declared:
            self._declared.add(name)
            self._scratch.append(name)

    def alloc(self, name: str, shape) -> None:
        dims = ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "")
        self.w(f'{name} = T.alloc_buffer(({dims}), "float32", scope="global")')

    def state_names(self):
        return ("h_re", "h_im") if self.cplx else ("h",)

    def task_body(self):
        w, n, W = self.w, self.n, self.W
        w("bi: T.let = seg[sq, 0]")
        w("t_begin: T.let = seg[sq, 1]")
        w("t_len: T.let = seg[sq, 2] - seg[sq, 1]")
        alloc_at, alloc_ind = len(w.lines), w.ind
        hs = self.state_names()
        if self.mode == "conv":
            hs = hs + tuple(h.replace("h", "f", 1) for h in hs)
        for h in hs:
            self.alloc(h, (n, W))
        # initial state
        # A statement-level branch, not if_then_else: without an initial state h0 is a 1-row
        # placeholder and must not be read.
        for cond, value in (("if has_init != 0:", "h0"), ("else:", None)):
            with w.block(cond):
                with w.block(f"for s in T.serial({n}):"):
                    with w.block(f"for v in T.vectorized({W}):"):
                        for j, h in enumerate(hs):
                            part = (j % 2) if self.cplx else None
                            src = self.state_at("h0", part) if value else "T.float32(0.0)"
                            w(f"{h}[s, v] = {src}")
        self.per_task_constants()
        TT = self.TT
        self.alloc("yv", (self.R, W))
        for name in ["xt", "yt"] + ([] if self.ssd else ["dtt"]) + (["xpt"] if self.trap else []):
            self.alloc(name, (TT, W))
        if self.rows:
            for name in ("xr", "dr"):
                self.alloc(name, (W, TT))
        self.alloc_token_buffers()
        if self.trap:
            self.alloc("xprev", (W,))
            with w.block(f"for v in T.vectorized({W}):"):
                w("xprev[v] = T.float32(0.0)")
        # Tiles of TT tokens in three passes: the per-token prologue (loads, Δ, Bbar x) and
        # epilogue (D, gate, stores) have no dependence between tokens, so out-of-order
        # execution overlaps them across the tile; only the middle pass is the recurrence.
        with w.block(f"for tile in T.serial((t_len + {TT - 1}) // {TT}):"):
            w(f"t0: T.let = t_begin + tile * {TT}")
            w(f"nt: T.let = T.min({TT}, t_len - tile * {TT})")
            if self.rows:
                # Selective-scan layout: a lane's tokens are contiguous (b, d, l) rows. Full tiles
                # load and store whole rows (vector loads along l) and transpose through an
                # L1-resident tile, instead of gathering lanes l floats apart per token (a
                # power-of-two stride: every lane in one cache set, TLB misses). Partial tiles
                # (sequence ends) take the per-token path.
                with w.block(f"if nt == {TT}:"):
                    self.row_loads()
                    with w.block("for j in T.serial(nt):"):
                        w("tt: T.let = t0 + j")
                        self.prologue(from_rows=True)
                with w.block("else:"):
                    with w.block("for j in T.serial(nt):"):
                        w("tt: T.let = t0 + j")
                        self.prologue()
            else:
                with w.block("for j in T.serial(nt):"):
                    w("tt: T.let = t0 + j")
                    self.prologue()
            with w.block("for j in T.serial(nt):"):
                w("tt: T.let = t0 + j")
                if self.trap:
                    w("tp: T.let = T.max(tt - 1, t_begin)")
                self.recurrence()
            if self.rows:
                with w.block(f"if nt == {TT}:"):
                    self.row_stores()
                with w.block("else:"):
                    with w.block("for j in T.serial(nt):"):
                        w("tt: T.let = t0 + j")
                        self.finish()
            else:
                with w.block("for j in T.serial(nt):"):
                    w("tt: T.let = t0 + j")
                    self.finish()
        # final state
        with w.block("if has_final != 0:"):
            with w.block(f"for s in T.serial({n}):"):
                with w.block(f"for v in T.vectorized({W}):"):
                    for j, h in enumerate(self.state_names()):
                        part = j if self.cplx else None
                        w(f"{self.state_at('hT', part)} = {h}[s, v]")
        w.lines[alloc_at:alloc_at] = [
            f'{alloc_ind}{name} = T.alloc_buffer((1,), "float32", scope="global")'
            for name in self._scratch]

    # ---- per task: A (and for LTI the coefficients), constant per-channel B/C ---------------
    def a_env(self, s_v: str = "s, v") -> Dict[str, str]:
        fam = self.fam
        if self.ssd:
            if fam.A.selective:
                return {"a": "A[bi, tt, hh]"}
            return {"a": "a_h", "a_l2": "a_hl2"}
        if fam.A.selective:
            base = "A[bi, c0 + v, s, tt"
            if self.cplx:
                return {"a_re": base + ", 0]", "a_im": base + ", 1]"}
            return {"a": base + "]"}
        if self.cplx:
            return {"a_re": f"a_re[{s_v}]", "a_im": f"a_im[{s_v}]", "a_re_l2": f"a_rel2[{s_v}]"}
        return {"a": f"a_[{s_v}]", "a_l2": f"a_l2[{s_v}]"}

    def per_task_constants(self):
        fam, w, n, W = self.fam, self.w, self.n, self.W
        if self.ssd:
            if not fam.A.selective:
                w("a_h: T.let = A[hh]")
                w(f"a_hl2: T.let = a_h * {f32(LOG2E)}")
            outs = [o for o in co.OUTPUTS if not self.cp.is_zero(o)]
            for o in outs:
                self.alloc(f"hc_{o}", (1,) if self.lti else (self.TT,))
            if self.lti:
                self.coef = self.head_coefficients("dt[hh]")
            return
        loads = []
        if not fam.A.selective:
            if self.cplx:
                for nm in ("a_re", "a_im", "a_rel2"):
                    self.alloc(nm, (n, W))
                loads += ["a_re[s, v] = A[c0 + v, s, 0]", "a_im[s, v] = A[c0 + v, s, 1]",
                          f"a_rel2[s, v] = A[c0 + v, s, 0] * {f32(LOG2E)}"]
            else:
                self.alloc("a_", (n, W))
                self.alloc("a_l2", (n, W))
                loads += ["a_[s, v] = A[c0 + v, s]", f"a_l2[s, v] = A[c0 + v, s] * {f32(LOG2E)}"]
        for name, spec in (("B", fam.B), ("C", fam.C)):
            if not spec.selective and spec.sharing is not Sharing.GROUP:
                parts = (("_re", ", 0"), ("_im", ", 1")) if self.cplx else (("", ""),)
                for suf, idx in parts:
                    self.alloc(f"{name}c{suf}", (n, W))
                    loads.append(f"{name}c{suf}[s, v] = {name}[c0 + v, s{idx}]")
        if loads:
            with w.block(f"for s in T.serial({n}):"):
                with w.block(f"for v in T.vectorized({W}):"):
                    for ln in loads:
                        w(ln)
        self.tables = {}
        if self.lti:
            # Abar, Bbar are constant per (channel, state): tabulate them once per task.
            outs = [o for o in co.OUTPUTS if not self.cp.is_zero(o)]
            parts = ("_re", "_im") if self.cplx else ("",)
            for o in outs:
                for suf in parts:
                    self.alloc(f"tab_{o}{suf}", (n, W))
            with w.block(f"for s in T.serial({n}):"):
                with w.block(f"for v in T.vectorized({W}):"):
                    env = dict(self.a_env(), dt=delta_expr(w, self.plan.disc, "dt[c0 + v]", "bias[c0 + v]"))
                    lines: List[str] = []
                    vals = co.emit(self.cp, outs, lines, w.ind, w.names, env, opts=w.math)
                    w.extend(lines)
                    for o in outs:
                        v = vals[o] if self.cplx else (vals[o],)
                        for suf, text in zip(parts, v):
                            w(f"tab_{o}{suf}[s, v] = {text}")
            for o in outs:
                self.tables[o] = tuple(f"tab_{o}{suf}[s, v]" for suf in parts)

    def head_coefficients(self, dt_raw: str, index: str = "0") -> Dict[str, str]:
        """Scalar A: Abar, Bbar of one (head, token), computed once as scalars into hc_o[index]."""
        w, fam = self.w, self.fam
        outs = [o for o in co.OUTPUTS if not self.cp.is_zero(o)]
        start = len(w.lines)
        env = dict(self.a_env(), dt=delta_expr(w, self.plan.disc, dt_raw, "bias[hh]"))
        lines: List[str] = []
        vals = co.emit(self.cp, outs, lines, w.ind, w.names, env, opts=w.math)
        w.extend(lines)
        for o in outs:
            w(f"hc_{o}[{index}] = {vals[o]}")
        w.lines[start:] = scalar_temporaries(w.lines[start:], self.declare)
        return {o: f"hc_{o}[{index}]" for o in outs}

    # ---- one token ----------------------------------------------------------------------------
    def token_outputs(self) -> List[str]:
        """Bbar terms computed once per token (times x) rather than per state: those that do not
        depend on A (exp-Euler's Bbar = Δ), and for scalar A all of them."""
        cp = self.cp
        outs = [o for o in ("bbar", "bbar_prev") if not cp.is_zero(o)]
        if self.ssd:
            return outs
        if self.lti:
            return []
        return [o for o in outs if not cp.depends_on_a(o)]

    def alloc_token_buffers(self):
        parts = ("_re", "_im") if self.cplx else ("",)
        for o in self.token_outputs():
            for suf in parts:
                self.alloc(f"tx_{o}{suf}", (self.TT, self.W))

    def head_coef_names(self) -> Dict[str, object]:
        outs = [o for o in co.OUTPUTS if not self.cp.is_zero(o)]
        return {o: f"hc_{o}[{'0' if self.lti else 'j'}]" for o in outs}

    def tokx_names(self) -> Dict[str, Tuple[str, ...]]:
        parts = ("_re", "_im") if self.cplx else ("",)
        out = {}
        for o in self.token_outputs():
            out[o] = tuple(ZERO if (o, suf) in self._tok_zero else f"tx_{o}{suf}[j, v]"
                           for suf in parts)
        return out

    def row_loads(self):
        """Full tile, selective-scan layout: x and Δ of each lane's TT tokens, vectorized along
        the tokens (Δ's softplus too), into xr/dr[lane, token]."""
        fam, w, W, TT = self.fam, self.w, self.W, self.TT
        with w.block(f"for v in T.serial({W}):"):
            with w.block(f"for j in T.vectorized({TT}):"):
                w("xr[v, j] = x[bi, c0 + v, t0 + j]")
                dt_raw = "dt[bi, c0 + v, t0 + j]" if fam.delta.selective else "dt[c0 + v]"
                w(f"dr[v, j] = {delta_expr(w, self.plan.disc, dt_raw, 'bias[c0 + v]')}")

    def row_stores(self):
        """Full tile: D x, the gate and the store, vectorized along each lane's tokens."""
        fam, w, W, TT = self.fam, self.w, self.W, self.TT
        with w.block(f"for v in T.serial({W}):"):
            with w.block(f"for j in T.vectorized({TT}):"):
                d = "D[c0 + v]" if fam.D is not None else None
                z = "z[bi, c0 + v, t0 + j]" if fam.gate is not None else None
                w(f"y[bi, c0 + v, t0 + j] = {epilogue(w, fam, 'yt[j, v]', 'xr[v, j]', d, z)}")

    def prologue(self, from_rows: bool = False):
        """Per token, independent of the state: x, Δ, the per-token Bbar x."""
        fam, w, W, cp = self.fam, self.w, self.W, self.cp
        scalar_coef: Dict[str, object] = {}
        if self.ssd:
            if self.lti:
                scalar_coef = self.coef
            else:
                scalar_coef = self.head_coefficients(
                    "dt[bi, tt, hh]" if fam.delta.selective else "dt[hh]", index="j")
        parts = ("_re", "_im") if self.cplx else ("",)
        self._tok_zero = set()
        with w.block(f"for v in T.vectorized({W}):"):
            if from_rows:
                w("xt[j, v] = xr[v, j]")
                w("dtt[j, v] = dr[v, j]")
            else:
                w(f"xt[j, v] = {self.x_at('x')}")
                if not self.ssd:
                    dt_raw = "dt[bi, c0 + v, tt]" if fam.delta.selective else "dt[c0 + v]"
                    w(f"dtt[j, v] = {delta_expr(w, self.plan.disc, dt_raw, 'bias[c0 + v]')}")
            outs = self.token_outputs()
            if outs:
                if self.ssd:
                    vals = scalar_coef
                else:
                    lines: List[str] = []
                    vals = co.emit(cp, outs, lines, w.ind, w.names, {"dt": "dtt[j, v]"},
                                   opts=w.math)
                    w.extend(lines)
                for o in outs:
                    x = "xt[j, v]" if o == "bbar" else "xprev[v]"
                    texts = vals[o] if self.cplx else (vals[o],)
                    for suf, text in zip(parts, texts):
                        if text == ZERO:
                            self._tok_zero.add((o, suf))
                            continue
                        w(f"tx_{o}{suf}[j, v] = {text} * {x}")
            if self.trap:
                w("xpt[j, v] = xprev[v]")
                w("xprev[v] = xt[j, v]")

    def recurrence(self):
        """The state update and readout of one token (the only loop-carried part)."""
        w, n, W = self.w, self.n, self.W
        scalar_coef = self.head_coef_names() if self.ssd else {}
        tokx = self.tokx_names()
        with w.block(f"for v in T.vectorized({W}):"):
            for q in range(self.R):
                w(f"yv[{q}, v] = T.float32(0.0)")
        loop = "T.unroll" if self.unroll else "T.serial"
        if self.mode == "conv":
            with w.block("if has_init != 0:"):
                with w.block(f"for s in {loop}({n}):"):
                    with w.block(f"for v in T.vectorized({W}):"):
                        self.state_update(scalar_coef, tokx, state="f", drive_input=False)
            with w.block("if has_final != 0:"):
                with w.block(f"for s in {loop}({n}):"):
                    with w.block(f"for v in T.vectorized({W}):"):
                        self.state_update(scalar_coef, tokx, readout=False)
        else:
            with w.block(f"for s in {loop}({n}):"):
                with w.block(f"for v in T.vectorized({W}):"):
                    self.state_update(scalar_coef, tokx)
        with w.block(f"for v in T.vectorized({W}):"):
            two = "T.float32(2.0) * " if self.cplx else ""   # conjugate pairs: 2 Re(C h)
            if self.mode == "conv":
                w(f"yt[j, v] = {self.x_at('ylin')} + {two}({self.ysum()})")
            else:
                w(f"yt[j, v] = {two}({self.ysum()})")

    def finish(self):
        """Per token, after the recurrence: D x, the gate, the store."""
        fam, w, W = self.fam, self.w, self.W
        with w.block(f"for v in T.vectorized({W}):"):
            d = None
            if fam.D is not None:
                if self.ssd:
                    d = "D[hh, p0 + v]" if fam.D.sharing is Sharing.HEAD_DIM else "D[hh]"
                else:
                    d = "D[c0 + v]"
            z = self.x_at("z") if fam.gate is not None else None
            w(f"{self.x_at('y')} = {epilogue(w, fam, 'yt[j, v]', 'xt[j, v]', d, z)}")

    def yacc(self) -> str:
        """The readout accumulator of state s: R independent partial sums (s mod R), so that
        y = sum_s C_s h_s is not one n-long chain of dependent FMAs per token."""
        return "yv[s % {}, v]".format(self.R) if self.R > 1 else "yv[0, v]"

    def ysum(self) -> str:
        return " + ".join(f"yv[{q}, v]" for q in range(self.R))

    def state_update(self, scalar_coef, tokx, state: str = "h", readout: bool = True,
                     drive_input: bool = True):
        """h = Abar h + Bbar B x (+ Bbar_prev B x_prev); y += Re(C h) when ``readout``."""
        fam, w, cp = self.fam, self.w, self.cp
        B = self.bc_at("B", fam.B, "tt")
        C = self.bc_at("C", fam.C, "tt")
        Bp = self.bc_at("B", fam.B, "tp") if self.trap else None
        if self.ssd:
            coef = {o: (v,) for o, v in scalar_coef.items()}
        elif self.lti:
            coef = dict(self.tables)
        else:
            outs = [o for o in co.OUTPUTS if not cp.is_zero(o) and cp.depends_on_a(o)]
            lines: List[str] = []
            vals = co.emit(cp, outs, lines, w.ind, w.names, dict(self.a_env(), dt="dtt[j, v]"),
                           opts=w.math)
            w.extend(lines)
            coef = {o: (vals[o] if self.cplx else (vals[o],)) for o in outs}

        def drive(o: str, bc: Tuple[str, ...], x: str) -> Tuple[str, ...]:
            """Bbar_o * B * x (the per-token Bbar_o * x when there is one)."""
            if o in tokx:
                if self.cplx:
                    return _cx(tokx[o], bc)
                return (f"{tokx[o][0]} * {bc[0]}",)
            c = coef[o]
            if self.cplx:
                return _cx(c, tuple(f"({b} * {x})" for b in bc))
            return (f"{c[0]} * ({bc[0]} * {x})",)

        ab = coef["abar"]
        if self.cplx:
            hr, hi = f"{state}_re[s, v]", f"{state}_im[s, v]"
            new_re, new_im = _cx(ab, (hr, hi))
            terms_re, terms_im = [new_re], [new_im]
            if drive_input:
                inp = drive("bbar", B, "xt[j, v]")
                terms_re.append(inp[0])
                terms_im.append(inp[1])
                if self.trap:
                    prev = drive("bbar_prev", Bp, "xpt[j, v]")
                    terms_re.append(prev[0])
                    terms_im.append(prev[1])
            nr = w.let("hn_re", " + ".join(terms_re))
            ni = w.let("hn_im", " + ".join(terms_im))
            w(f"{hr} = {nr}")
            w(f"{hi} = {ni}")
            if readout:
                w(f"{self.yacc()} = {self.yacc()} + {C[0]} * {nr} - {C[1]} * {ni}")
        else:
            h = f"{state}[s, v]"
            terms = [f"{ab[0]} * {h}"]
            if drive_input:
                terms.append(drive("bbar", B, "xt[j, v]")[0])
                if self.trap:
                    terms.append(drive("bbar_prev", Bp, "xpt[j, v]")[0])
            w(f"{h} = {' + '.join(terms)}")
            if readout:
                w(f"{self.yacc()} = {self.yacc()} + {C[0]} * {h}")


def generate(plan: KernelPlan, config: dict, mode: str = "scan") -> str:
    """TVMScript text of the scan kernel ``ssmc_scan`` for ``plan`` (mode "conv": the
    convolution's boundary pass ``ssmc_conv_boundary``)."""
    return _Scan(plan, config, mode).generate()
