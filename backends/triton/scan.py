"""Generator of the selective-scan kernel (selective_scan_fn convention, diagonal / complex A).

One program owns BLOCK_D channels of one sequence and walks it once, the state on chip. Layout
choices, all for the Mamba-1 shape (b8 d4096 l2048 n16, bf16), where the cost is one exp per
(channel, state, step):

- Every tensor in the kernel is a 1-D vector over the program's lanes (one lane = one channel,
  or one of SPLIT parts of a channel's state). A lane's states are a tuple of such vectors
  (``h[j]``), walked by ``tl.static_range`` loops that Triton unrolls, so each thread keeps its
  channel's states in registers and C·h is a sum of registers, with no cross-thread reduction.
  (A [lanes, N] tile would put the state axis across threads and reduce it with shuffles.)
- Time is loaded CHUNK steps at a time as [lanes, CHUNK] tiles (16 bytes per thread for 16-bit
  inputs at CHUNK=8) and split into a tuple of per-step vectors in registers (``_cols8``: a tree
  of ``tl.split``); the outputs are joined back (``_join8``) and stored 16 bytes wide. B_t and
  C_t of a group are loaded the same way (every lane of a group reads the same 16 bytes, which
  the L1 broadcasts).
- Within a chunk the code walks state-major (all steps of h[0], then of h[1]...), so only one
  state's B/C tiles are live at a time.
- exp(dt * a) is exp2(dt * a_l2) with a_l2 = a * log2(e) precomputed per lane (codegen).
- SPLIT > 1 gives each channel SPLIT threads (N/SPLIT states each) and reduces y across them
  once per chunk: more parallelism when b * d is small (long single sequences).

Full chunks run without time masks; the last partial chunk runs a masked copy of the body.

Only the coefficient lines (Abar, Bbar, Bbar_prev and Δ) are printed from sympy; what they are
called in the kernel (``coef``) depends on whether they vary with the state (``_n[j]``), the
step (``_t[k]``), both (``_v``, computed in the inner loop) or neither.

Latency: u/dt/z tiles are loaded one chunk ahead (``prefetch``); ``prefetch_bc`` = P carries
the B/C tiles of the first P states across the loop too (loaded after the chunk's last state,
used by the next chunk's first ones), real A with selective B/C only (complex A ignores it).

The segmented scan for few channel blocks (``mode`` local / apply) and the configs: see
``scan_launcher``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import sympy as sp

from ssmc.ir import AStructure, KernelPlan, Sharing

from . import codegen, scan_backward
from .codegen import Lines, Part, as_text, cadd, cmul
# supports, default_config, candidates: the backend interface, kept importable from here
from .scan_launcher import (SEGMENT_DEFAULTS, candidates, check_config,  # noqa: F401
                            default_config, few_channels_config, kernel_params,
                            launcher_source, segmented_config, supports)

WHAT = "selective scan"

# A [rows, W] register tile to its W columns and back, for W = 1, 2, 4, 8, 16: each level halves
# the columns with tl.split(tl.reshape(x, (rows, W/2, 2))) (even and odd columns). When a thread
# holds a whole row (16-byte loads of a 16-byte row) no data moves.
TILE_HELPERS = '''
@triton.jit
def _cols1(t):
    return (tl.reshape(t, (t.shape[0],)),)


@triton.jit
def _cols2(t):
    c0, c1 = tl.split(t)
    return c0, c1


@triton.jit
def _cols4(t):
    even, odd = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _cols8(t):
    even, odd = tl.split(tl.reshape(t, (t.shape[0], 4, 2)))
    e = _cols4(even)
    o = _cols4(odd)
    return e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3]


@triton.jit
def _cols16(t):
    even, odd = tl.split(tl.reshape(t, (t.shape[0], 8, 2)))
    e = _cols8(even)
    o = _cols8(odd)
    return (e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3],
            e[4], o[4], e[5], o[5], e[6], o[6], e[7], o[7])


@triton.jit
def _join1(v):
    return tl.reshape(v[0], (v[0].shape[0], 1))


@triton.jit
def _join2(v):
    return tl.join(v[0], v[1])


@triton.jit
def _join4(v):
    return tl.reshape(tl.join(tl.join(v[0], v[2]), tl.join(v[1], v[3])), (v[0].shape[0], 4))


@triton.jit
def _join8(v):
    even = _join4((v[0], v[2], v[4], v[6]))
    odd = _join4((v[1], v[3], v[5], v[7]))
    return tl.reshape(tl.join(even, odd), (v[0].shape[0], 8))


@triton.jit
def _join16(v):
    even = _join8((v[0], v[2], v[4], v[6], v[8], v[10], v[12], v[14]))
    odd = _join8((v[1], v[3], v[5], v[7], v[9], v[11], v[13], v[15]))
    return tl.reshape(tl.join(even, odd), (v[0].shape[0], 16))

'''

# Where a coefficient printed from sympy lives, by what it varies with (see ``_ScanGen.coef``).
LEVEL_NAME = {"P": "{}", "J": "{}_n[j]", "K": "{}_t[k]", "JK": "{}_v"}


def _at_j(name: str) -> str:
    """The loop's name for element j of a tuple over the states: h -> hj, h_im -> hj_im."""
    base, im = (name[:-3], "_im") if name.endswith("_im") else (name, "")
    return f"{base}j{im}"


class _ScanGen:
    """Emits the scan kernel. Loop indices in the emitted code: ``j`` walks a lane's states
    (``tl.static_range(NS)``), ``k`` a chunk's steps (``tl.static_range(CHUNK)``).

    One kernel serves every launch (``scan_launcher``): the one-pass scan, its state-split
    variant (``SPLIT``), and passes 1 (``LOCAL``) and 3 (``APPLY``) of the segmented scan; what
    differs between them is constexpr, so each launch compiles only its own branches.
    """

    def __init__(self, plan: KernelPlan, config: dict):
        self.plan, self.cfg = plan, config
        f = self.f = plan.family
        self.N = f.dims.state
        self.chunk = config["chunk"]
        self.cplx = f.A.structure is AStructure.COMPLEX_DIAGONAL
        self.sel = {"dt": f.delta.selective, "A": f.A.selective, "B": f.B.selective,
                    "C": f.C.selective}
        self.parts = codegen.split_parts(plan)
        self.asyms = ("a_re", "a_im") if self.cplx else ("a",)
        self.trap = any(not codegen.is_zero(e) for k, e in self.parts.items()
                        if k.startswith("bbar_prev"))
        # Which coefficients vary with the state index (J) and with time (K).
        self.levels: Dict[str, str] = {}
        for key, e in self.parts.items():
            if codegen.is_zero(e):
                continue
            dep_a = any(codegen.uses(e, s) for s in self.asyms)
            dep_t = (codegen.uses(e, "dt") and self.sel["dt"]) or (dep_a and self.sel["A"])
            self.levels[key] = {(False, False): "P", (True, False): "J",
                                (False, True): "K", (True, True): "JK"}[(dep_a, dep_t)]
        # Streams kept in fp32 (B, C, complex A planes) load 4 steps = 16 bytes at a time.
        self.f32_width = min(self.chunk, 4)
        self.fp32_streams = self.sel["B"] or self.sel["C"] or (self.sel["A"] and self.cplx)
        # B/C tiles of the first PF_BC states carried one chunk ahead (real A only; C is not
        # read by pass 1).
        self.bc_streams = [] if self.cplx else [w for w in ("B", "C") if self.sel[w]]
        # exp(a * dt) with a constant: fold log2(e) into a once per lane.
        self.l2 = (not self.sel["A"]) and any(
            codegen.has_exp_of(self.parts[k], self.asyms[0]) for k in self.levels)
        # A segment's total decay: where Abar = exp(dt a) with a constant, it is Abar at
        # dt = (the segment's sum of dt), one add per step instead of a product per state;
        # otherwise (euler, bilinear, selective or complex A) the running product of Abar.
        self.log_decay = False
        if not (self.cplx or self.sel["A"]) and "abar" in self.parts:
            e = self.parts["abar"]
            syms = {s.name: s for s in e.free_symbols}
            if set(syms) == {"dt", "a"}:
                self.log_decay = sp.simplify(e - sp.exp(syms["dt"] * syms["a"])) == 0
        bbar_lvls = {lvl for key, lvl in self.levels.items()
                     if key.startswith("bbar") and not key.startswith("bbar_prev")}
        # Bbar * x hoisted per step when Bbar does not vary with the state.
        self.hoist_bx = bool(bbar_lvls) and bbar_lvls <= {"P", "K"}
        self.comps = ("", "_im") if self.cplx else ("",)

    # ---- names ------------------------------------------------------------------------------
    @staticmethod
    def nidx() -> str:
        """State j of the lane as an index into the channel's N states (part = 0 unless
        SPLIT > 1)."""
        return "(part * NS + j)"

    def a_names(self) -> Dict[str, str]:
        """A's elements at (j, k): per step where A is selective, else per state."""
        at = "aj{}[k]" if self.sel["A"] else "a{}[j]"
        if self.cplx:
            return {"a_re": at.format(""), "a_im": at.format("_im")}
        return {"a": at.format("")}

    def dt_name(self) -> str:
        return "dt[k]" if self.sel["dt"] else "dt"

    def bc(self, which: str) -> Tuple[Part, Part]:
        """B's or C's (re, im) at (j, k)."""
        w = which.lower()
        at = f"{w}j{{}}[k]" if self.sel[which] else f"{w}{{}}[j]"
        return at.format(""), at.format("_im") if self.cplx else None

    def coef(self, key: str) -> Tuple[Part, Part]:
        """(re, im) names of Abar/Bbar/Bbar_prev at (j, k); None where exactly zero."""
        keys = (key + "_re", key + "_im") if self.cplx else (key,)
        out = [LEVEL_NAME[self.levels[kk]].format(kk) if kk in self.levels else None
               for kk in keys]
        return (out[0], out[1] if self.cplx else None)

    def emit_coefs(self, out: Lines, level: str):
        """The coefficients of ``level``, printed from sympy (with shared subexpressions):
        P and JK as plain assignments, J and K as tuples over the states / the steps."""
        keys = [kk for kk, lvl in self.levels.items() if lvl == level]
        if not keys:
            return
        names = {"dt": self.dt_name(), **self.a_names()}
        l2 = {s: "a_l2[j]" for s in self.asyms[:1]} if self.l2 else {}
        ph = {s: f"SSMC_{s.upper()}" for s in ("dt",) + self.asyms}
        lines, finals = codegen.print_block(
            {kk: self.parts[kk] for kk in keys}, ph, tmp_prefix=f"{level.lower()}tmp",
            log2e_names={s: f"{ph[s]}_l2" for s in l2})
        pattern = re.compile(r"\bSSMC_(DT|A_RE|A_IM|A)(_l2)?\b")

        def rename(text):
            return pattern.sub(lambda m: (l2 if m.group(2) else names)[m.group(1).lower()], text)
        if level in ("P", "JK"):
            out.extend(rename(ln) for ln in lines)
            out.extend(f"{LEVEL_NAME[level].format(kk)} = {rename(finals[kk])}" for kk in keys)
            return
        idx, count, sfx = ("j", "NS", "_n") if level == "J" else ("k", "CHUNK", "_t")
        out(*(f"{kk}{sfx} = ()" for kk in keys), f"for {idx} in tl.static_range({count}):")
        out.indent().extend(rename(ln) for ln in lines)
        out.extend(f"{kk}{sfx} = {kk}{sfx} + ({rename(finals[kk])},)" for kk in keys)
        out.dedent()

    @staticmethod
    def per_state(o: Lines, values: Sequence[Tuple[str, str]], before: Sequence[str] = (),
                  count: str = "NS"):
        """Tuples over the lane's states: ``name = (expr at j=0, expr at j=1, ...)``."""
        o(*(f"{name} = ()" for name, _ in values), f"for j in tl.static_range({count}):")
        o.indent().extend(before)
        o.extend(f"{name} = {name} + ({expr},)" for name, expr in values)
        o.dedent()

    # ---- kernel -----------------------------------------------------------------------------
    def kernel(self, name: str) -> str:
        f, comps = self.f, self.comps
        o = Lines()
        o.jit_def(name, kernel_params(self.plan, self.sel))
        o(f"N: tl.constexpr = {self.N}  # the state size (a kernel is generated per size)",
          "NS: tl.constexpr = N // SPLIT  # states per lane",
          "SEGMENTED: tl.constexpr = LOCAL or APPLY",
          "pid_d = tl.program_id(0)",
          "if SEGMENTED:",
          "    # pass 1 skips the last segment (its end state is nobody's initial state)",
          "    n_programs = n_segments - 1 if LOCAL else n_segments",
          "    seq = tl.program_id(1) // n_programs",
          "    seg = tl.program_id(1) % n_programs",
          "else:",
          "    seq = tl.program_id(1)  # batch index, or sequence index when VARLEN",
          "if VARLEN:",
          "    seq_start = tl.load(cu_ptr + seq).to(tl.int32)",
          "    seq_end = tl.load(cu_ptr + seq + 1).to(tl.int32)",
          "    batch = seq * 0",
          "else:",
          "    seq_start = 0",
          "    seq_end = seqlen",
          "    batch = seq",
          "if SEGMENTED:",
          "    # whole chunks per segment (16-byte aligned loads when the sequence start is);",
          "    # segments never cross a sequence boundary",
          "    seg_len = tl.cdiv(tl.cdiv(seq_end - seq_start, n_segments), CHUNK) * CHUNK",
          "    if VARLEN:",
          "        start = tl.minimum(seq_start + seg * seg_len, seq_end)",
          "    else:",
          "        # Stated, because the compiler cannot infer it through seg_len: without it",
          "        # the time tiles load element by element instead of 16 bytes at a time",
          "        # (measured 1.36x slower on the H100).",
          "        start = tl.multiple_of(seg * seg_len, CHUNK)",
          "    # a segment past the sequence's end (short sequences) is empty, never negative",
          "    end = tl.maximum(tl.minimum(start + seg_len, seq_end), start)",
          "else:",
          "    start = seq_start",
          "    end = seq_end",
          "bat = batch.to(tl.int64)",
          "lane = tl.arange(0, BLOCK_D * SPLIT)",
          "ch = pid_d * BLOCK_D + lane // SPLIT",
          "part = lane % SPLIT  # which of the channel's SPLIT parts of the state",
          "ch_ok = ch < n_channels",
          "# Loads read a valid channel on every lane (the last one past the end), so that no",
          "# load needs a mask; only stores are masked.",
          "chl = tl.minimum(ch, n_channels - 1)",
          "ch64 = chl.to(tl.int64)",
          "zero = tl.zeros([BLOCK_D * SPLIT], dtype=tl.float32)",
          "cols = tl.arange(0, CHUNK)")
        if self.f32_width < self.chunk:
            o(f"cols_f32 = tl.arange(0, {self.f32_width})")
        o("u_rows = u_ptr + bat * stride_u_b + ch64 * stride_u_d")
        if self.sel["dt"]:
            o("dt_rows = delta_ptr + bat * stride_dt_b + ch64 * stride_dt_d")
        if self.sel["A"]:
            o("a_rows = A_ptr + bat * stride_A_b + ch64 * stride_A_d")
        for w in ("B", "C"):
            if self.sel[w]:
                o(f"{w.lower()}_rows = {w}_ptr + bat * stride_{w}_b + "
                  f"(chl // cpg_{w}).to(tl.int64) * stride_{w}_g")
        # ---- per-lane constants
        if f.delta.bias:
            o("if HAS_DT_BIAS:",
              "    dt_bias = tl.load(dt_bias_ptr + chl)",
              "else:",
              "    dt_bias = zero")
        if not self.sel["dt"]:
            o(f"dt = {codegen.delta_expr(self.plan, 'tl.load(delta_ptr + chl)')}")
        if not self.sel["A"]:
            values = self.state_elements("a", "A_ptr", "ch64")
            if self.l2:
                values.append(("a_l2", f"a[j] * {codegen.LOG2E!r}"))
            o("# A of the lane's states" + (", and times log2(e) for exp2" if self.l2 else ""))
            self.per_state(o, values)
        for w in ("B", "C"):
            if not self.sel[w]:
                row = ("ch64" if getattr(f, w).sharing is Sharing.HEAD
                       else f"(chl // cpg_{w}).to(tl.int64)")
                self.per_state(o, self.state_elements(w.lower(), f"{w}_ptr", row))
        if f.D:
            o("if HAS_D:", "    d_skip = tl.load(D_ptr + chl)")
        self.emit_coefs(o, "P")
        self.emit_coefs(o, "J")
        # ---- state
        o("state_rows = (seq.to(tl.int64) * n_channels + ch64) * N",
          "if SEGMENTED:",
          "    seg_rows = ((seq * n_segments + seg).to(tl.int64) * n_channels + ch64) * N",
          "if APPLY:  # the segment's true initial state (pass 2)")
        o.indent()
        self.per_state(o, [(f"h{c}", f"tl.load(seg_state_ptr + {self.addr('seg_rows', c)})")
                           for c in comps])
        o.dedent()("elif HAS_H0:").indent()
        self.per_state(o, [(f"h{c}", f"tl.load(h0_ptr + {self.addr('state_rows', c)})")
                           for c in comps])
        o.dedent()("else:").indent()
        self.per_state(o, [(f"h{c}", "zero") for c in comps])
        o.dedent()
        if self.trap:
            o("# trapezoidal's B_{t-1} x_{t-1}: zero before the sequence's first step",
              "if SEGMENTED:")
            o.indent()
            self.previous_input(o)
            o.dedent()("else:").indent()
            self.per_state(o, [(f"p{c}", "zero") for c in comps])
            o.dedent()
        o("if LOCAL:  # the segment's total decay").indent()
        if self.log_decay:
            o("dtsum = zero")
        else:
            self.per_state(o, [(f"dec{c}", "zero + 1.0" if not c else "zero") for c in comps])
        o.dedent()
        # ---- epilogue rows (whole channels)
        o("if SPLIT > 1:",
          "    ep_ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)",
          "    ep_ok = ep_ch < n_channels",
          "    ep_ch64 = tl.minimum(ep_ch, n_channels - 1).to(tl.int64)",
          "    ep_u_rows = u_ptr + bat * stride_u_b + ep_ch64 * stride_u_d")
        if f.D:
            o("    if HAS_D:", "        ep_d_skip = tl.load(D_ptr + ep_ch64)")
        o("else:", "    ep_ok = ch_ok", "    ep_ch64 = ch64")
        if f.D:
            o("    if HAS_D:", "        ep_d_skip = d_skip")
        if f.gate:
            o("ep_z_rows = z_ptr + bat * stride_z_b + ep_ch64 * stride_z_d")
        o("ep_out_rows = out_ptr + bat * stride_out_b + ep_ch64 * stride_out_d")
        # ---- time loop
        o("n_full = (end - start) // CHUNK")
        streams = self.prefetched()
        if streams or self.bc_streams:
            o("# The next chunk's tiles are loaded one iteration ahead (the last one reloads",
              "# itself), so DRAM latency overlaps the current chunk's arithmetic.",
              "# (masks constant along time keep the 16-byte loads)",
              "pre_lanes = (lane * 0 + n_full)[:, None] > 0")
            if streams:
                o("pre_rows = (ep_ok.to(tl.int32) * 0 + n_full)[:, None] > 0")
            for name, rows, cond in streams:
                mask = "pre_rows" if rows.startswith("ep_") else "pre_lanes"
                load = f"tl.load({rows}[:, None] + (start + cols)[None, :], mask={mask}, other=0.0)"
                o(*([f"if {cond}:", f"    {name}_pre = {load}"] if cond else [f"{name}_pre = {load}"]))
        if self.bc_streams:
            o("# B/C tiles of the first PF_BC states: the loop body reloads them for the next "
              "chunk")
            self.carry_bc(o, "start", ", mask=pre_lanes, other=0.0")
        o("for i in range(0, n_full):")
        o.indent()
        o("t0 = start + i * CHUNK")
        if streams or self.bc_streams:
            o("t_next = start + tl.minimum(i + 1, n_full - 1) * CHUNK")
            for name, rows, cond in streams:
                load = f"tl.load({rows}[:, None] + (t_next + cols)[None, :])"
                body = [f"{name}_cur = {name}_pre", f"{name}_pre = {load}"]
                o(*([f"if {cond}:"] + ["    " + b for b in body] if cond else body))
        self.chunk_body(o, masked=False)
        o.dedent()
        o("# the last CHUNK - 1 steps or fewer: the same body with time masks",
          "t0 = start + n_full * CHUNK", "if t0 < end:")
        o.indent()
        self.chunk_body(o, masked=True)
        o.dedent()
        # ---- final state
        o("if LOCAL:  # the segment's end state from h = 0, and its decay").indent()
        if self.log_decay:
            if not self.sel["dt"]:
                o("dtsum = dt * (end - start).to(tl.float32)")
            decay = codegen.print_one(self.parts["abar"], {"dt": "dtsum", "a": "a[j]"},
                                      {"a": "a_l2[j]"} if self.l2 else None)
            self.per_state(o, [("dec", decay)])
        o("for j in tl.static_range(NS):").indent()
        for c in comps:
            addr = self.addr("seg_rows", c)
            o(f"tl.store(seg_state_ptr + {addr}, h{c}[j], mask=ch_ok)",
              f"tl.store(seg_decay_ptr + {addr}, dec{c}[j], mask=ch_ok)")
        o.dedent().dedent()
        o("elif WRITE_HT:",
          "    ht_ok = ch_ok",
          "    if APPLY:  # the last segment's end state is the sequence's",
          "        ht_ok = ht_ok & (lane * 0 + seg == n_segments - 1)",
          "    for j in tl.static_range(NS):")
        for c in comps:
            o(f"        tl.store(hT_ptr + {self.addr('state_rows', c)}, h{c}[j], mask=ht_ok)")
        return o.text()

    def state_elements(self, name: str, ptr: str, row: str) -> List[Tuple[str, str]]:
        """(tuple name, load at state j) of a constant (rows, N) parameter's row ``row``:
        complex values are interleaved (re, im) pairs."""
        at = f"{row} * N + {self.nidx()}"
        if self.cplx:
            return [(name, f"tl.load({ptr} + ({at}) * 2)"),
                    (f"{name}_im", f"tl.load({ptr} + ({at}) * 2 + 1)")]
        return [(name, f"tl.load({ptr} + {at})")]

    def addr(self, rows: str, comp: str) -> str:
        """Offset of state j (its re or im part for complex A) in a (.., N) state tensor."""
        if not self.cplx:
            return f"{rows} + {self.nidx()}"
        return f"({rows} + {self.nidx()}) * 2 + {1 if comp else 0}"

    def previous_input(self, o: Lines):
        """Trapezoidal's B_{t-1} x_{t-1} at a segment's first step, read from memory (zero at
        the sequence's first step)."""
        o("prev_ok = (lane * 0 + start) > seq_start",
          "t_prev = tl.maximum(start - 1, 0)",
          "x_prev = tl.load(u_rows + t_prev, mask=prev_ok, other=0.0).to(tl.float32)")
        before = []
        b = self.bc("B")
        if self.sel["B"]:
            row = f"b_rows + {self.nidx()} * stride_B_n + t_prev"
            before = [f"bp = tl.load({row}, mask=prev_ok, other=0.0)"]
            if self.cplx:
                before.append(f"bp_im = tl.load({row} + stride_B_plane, mask=prev_ok, other=0.0)")
            b = ("bp", "bp_im" if self.cplx else None)
        px = cmul(b, ("x_prev", None))
        values = [("p", as_text(px[0]))] + ([("p_im", as_text(px[1]))] if self.cplx else [])
        self.per_state(o, values, before)

    def prefetched(self) -> List[Tuple[str, str, str]]:
        """(name, row pointers, constexpr condition) of the tiles loaded one chunk ahead."""
        if not self.cfg.get("prefetch", False):
            return []
        out = [("u", "u_rows", "")]
        if self.sel["dt"]:
            out.append(("dt", "dt_rows", ""))
        if self.f.gate:
            out.append(("z", "ep_z_rows", "HAS_Z and not LOCAL"))
        return out

    def carry_bc(self, o: Lines, t: str, mask: str = ""):
        """Load the B/C tiles of the first PF_BC states for the chunk starting at ``t`` into
        the tuples carried across iterations (``b_pre``: CHUNK / 4 tiles of 4 steps per
        state, state-major)."""
        W = self.f32_width
        cols = "cols_f32" if W < self.chunk else "cols"
        for w in self.bc_streams:
            rows = f"({w.lower()}_rows + {self.nidx()} * stride_{w}_n)[:, None]"
            tiles = [f"tl.load({rows} + ({t} + {s * W} + {cols})[None, :]{mask})"
                     for s in range(self.chunk // W)]
            if w == "C":
                o("if not LOCAL:").indent()
            self.per_state(o, [(f"{w.lower()}_pre", ", ".join(tiles))], count="PF_BC")
            if w == "C":
                o.dedent()

    def load_columns(self, o: Lines, name: str, rows: str, masked: bool, fp32: bool = False,
                     other: float = 0.0, loaded: Optional[str] = None,
                     carried: Optional[str] = None):
        """``name`` = the CHUNK steps of ``rows`` (one pointer per lane) as a tuple of per-step
        vectors. fp32 streams load 4 steps (16 bytes) at a time. ``loaded`` names a tile
        already in registers (prefetched) instead; ``carried`` the tuple of the fp32 tiles the
        previous iteration loaded (those of state j)."""
        if loaded is not None:
            o(f"{name} = _cols{self.chunk}({loaded}.to(tl.float32))")
            return
        width = self.f32_width if (fp32 or carried) else self.chunk
        tiles = self.chunk // width
        for s in range(tiles):
            if carried is not None:
                tile = f"{carried}[{tiles} * j + {s}]" if tiles > 1 else f"{carried}[j]"
            else:
                offs = "offs" if width == self.chunk else f"offs_f{s}"
                m = (f", mask=tmask{'' if width == self.chunk else f'_f{s}'}[None, :], "
                     f"other={other!r}") if masked else ""
                cast = "" if fp32 else ".to(tl.float32)"
                tile = f"tl.load({rows}[:, None] + {offs}[None, :]{m}){cast}"
            o(f"{name} = {name + ' + ' if s else ''}_cols{width}({tile})")

    def chunk_body(self, o: Lines, masked: bool):
        f, CH = self.f, self.chunk
        o("offs = t0 + cols")
        if masked:
            o("tmask = offs < end")
        if self.f32_width < CH and self.fp32_streams:
            for s in range(CH // self.f32_width):
                o(f"offs_f{s} = t0 + {s * self.f32_width} + cols_f32")
                if masked:
                    o(f"tmask_f{s} = offs_f{s} < end")
        pre = {name for name, _, _ in self.prefetched()} if not masked else set()
        o("# the chunk's steps: x[k], dt[k] (tuples of per-lane vectors)")
        self.load_columns(o, "x", "u_rows", masked, loaded="u_cur" if "u" in pre else None)
        if self.sel["dt"]:
            self.load_columns(o, "dr", "dt_rows", masked, loaded="dt_cur" if "dt" in pre else None)
            o("dt = ()", "for k in tl.static_range(CHUNK):",
              f"    dt = dt + ({codegen.delta_expr(self.plan, 'dr[k]')},)")
        if masked:
            o("v = ()", "for k in tl.static_range(CHUNK):", "    v = v + (t0 + k < end,)")
        if self.log_decay and self.sel["dt"]:
            o("if LOCAL:", "    for k in tl.static_range(CHUNK):",
              "        dtsum += tl.where(v[k], dt[k], 0.0)" if masked else "        dtsum += dt[k]")
        self.emit_coefs(o, "K")
        if self.hoist_bx:
            bx = cmul(self.coef("bbar"), ("x[k]", None))
            o("bx = ()", *(["bx_im = ()"] if bx[1] else []), "for k in tl.static_range(CHUNK):",
              f"    bx = bx + ({as_text(bx[0])},)", *([f"    bx_im = bx_im + ({bx[1]},)"]
                                                      if bx[1] else []))
        state = [f"h{c}" for c in self.comps] + ([f"p{c}" for c in self.comps] if self.trap else [])
        decay = [] if self.log_decay else [f"dec{c}" for c in self.comps]
        o(*(f"{s}_next = ()" for s in state + decay))
        o("for j in tl.static_range(NS):")
        o.indent()
        self.load_state(o, masked)
        o(*(f"{_at_j(s)} = {s}[j]" for s in state))
        if decay:
            o("if LOCAL:", *(f"    {_at_j(s)} = {s}[j]" for s in decay))
        o("ys = ()", "for k in tl.static_range(CHUNK):")
        o.indent()
        self.step(o, masked)
        o.dedent()
        o("y = ys", *(f"{s}_next = {s}_next + ({_at_j(s)},)" for s in state))
        if decay:
            o("if LOCAL:", *(f"    {s}_next = {s}_next + ({_at_j(s)},)" for s in decay))
        o.dedent()
        o(*(f"{s} = {s}_next" for s in state))
        if decay:
            o("if LOCAL:", *(f"    {s} = {s}_next" for s in decay))
        if self.bc_streams and not masked:
            o("# the next chunk's B/C tiles of the first states (this chunk's are consumed)")
            self.carry_bc(o, "t_next")
        # ---- outputs of the chunk
        o("if not LOCAL:")
        o.indent()
        o(f"y_tile = _join{CH}(y)")
        if self.cplx:
            o("y_tile = 2.0 * y_tile  # conjugate pairs: y = 2 Re(C h)")
        tmask = ", mask=tmask[None, :], other=0.0" if masked else ""
        o("if SPLIT > 1:", "    y_tile = tl.sum(tl.reshape(y_tile, (BLOCK_D, SPLIT, CHUNK)), axis=1)")
        if f.D:
            o("    if HAS_D:",
              f"        u_ep = tl.load(ep_u_rows[:, None] + offs[None, :]{tmask}).to(tl.float32)",
              "        y_tile += ep_d_skip[:, None] * u_ep",
              "elif HAS_D:", f"    y_tile += ep_d_skip[:, None] * _join{CH}(x)")
        if f.gate:
            z = ("z_cur" if "z" in pre else
                 f"tl.load(ep_z_rows[:, None] + offs[None, :]{tmask})")
            o("if HAS_Z:", f"    z_tile = {z}.to(tl.float32)",
              "    y_tile = y_tile * _silu(z_tile)")
        mask = "ep_ok[:, None] & tmask[None, :]" if masked else "ep_ok[:, None]"
        o("tl.store(ep_out_rows[:, None] + offs[None, :], "
          f"y_tile.to(out_ptr.dtype.element_ty), mask={mask})")
        o.dedent()

    def load_state(self, o: Lines, masked: bool):
        """State j's per-step A/B/C as tuples ``aj``, ``bj``, ``cj`` (``_im`` planes for complex);
        in full chunks, the B/C of the first PF_BC states from the tiles the previous iteration
        loaded."""
        for w, letter in (("A", "a"), ("B", "b"), ("C", "c")):
            if not self.sel[w]:
                continue
            if w == "C":
                o("if not LOCAL:  # pass 1 computes no output").indent()
            fp32 = w != "A" or self.cplx
            carried = w in self.bc_streams and not masked
            # past the end, a = -1 keeps coefficients like expm1(a dt)/a finite
            other = -1.0 if w == "A" else 0.0
            if carried:
                o("if j < PF_BC:").indent()
                self.load_columns(o, f"{letter}j", "", masked, carried=f"{letter}_pre")
                o.dedent()("else:").indent()
            o(f"{letter}_rows_j = {letter}_rows + {self.nidx()} * stride_{w}_n")
            self.load_columns(o, f"{letter}j", f"{letter}_rows_j", masked, fp32, other)
            if self.cplx:
                self.load_columns(o, f"{letter}j_im", f"({letter}_rows_j + stride_{w}_plane)",
                                  masked, fp32)
            if carried:
                o.dedent()
            if w == "C":
                o.dedent()

    def step(self, o: Lines, masked: bool):
        """State j at step k: h = Abar h + Bbar B x (+ Bbar_prev B_prev x_prev); y[k] += C h;
        in pass 1 the segment's decay, times Abar."""
        self.emit_coefs(o, "JK")
        h = ("hj", "hj_im" if self.cplx else None)
        b, c = self.bc("B"), self.bc("C")
        bx = cmul(b, ("x[k]", None))
        if self.hoist_bx:
            bbar_im = self.coef("bbar")[1]
            term = cmul(("bx[k]", "bx_im[k]" if bbar_im else None), b)
        else:
            term = cmul(self.coef("bbar"), bx)
        new = cadd(cmul(self.coef("abar"), h), term)
        if self.trap:
            p = ("pj", "pj_im" if self.cplx else None)
            new = cadd(new, cmul(self.coef("bbar_prev"), p))
        updates = [(h[0], as_text(new[0]))]
        if self.cplx:
            updates.append((h[1], as_text(new[1])))
        if self.trap:
            updates.append(("pj", as_text(bx[0])))
            if self.cplx:
                updates.append(("pj_im", as_text(bx[1])))
        self.assign(o, updates, masked)
        if not self.log_decay:
            dec = cmul(self.coef("abar"), ("decj", "decj_im" if self.cplx else None))
            o("if LOCAL:").indent()
            self.assign(o, [("decj", as_text(dec[0]))]
                        + ([("decj_im", as_text(dec[1]))] if self.cplx else []), masked)
            o.dedent()
        contrib = codegen._sum(("+", codegen._prod(c[0], h[0])), ("-", codegen._prod(c[1], h[1])))
        o("if LOCAL:", "    pass",
          "elif j == 0:", f"    ys = ys + ({contrib},)",
          "else:", f"    ys = ys + (y[k] + {contrib},)")

    @staticmethod
    def assign(o: Lines, updates: Sequence[Tuple[str, str]], masked: bool):
        """dst = value for each (dst, value) at once; past the end (masked) dst keeps its value."""
        if len(updates) == 1 and not masked:
            o(f"{updates[0][0]} = {updates[0][1]}")
            return
        # the new values all read the old ones: compute them first, then assign
        for i, (dst, val) in enumerate(updates):
            o(f"new{i} = {val}")
        for i, (dst, _) in enumerate(updates):
            o(f"{dst} = tl.where(v[k], new{i}, {dst})" if masked else f"{dst} = new{i}")


def generate(plan: KernelPlan, config: dict, notes: Sequence[str] = ()) -> str:
    config = {**SEGMENT_DEFAULTS, **config}
    for cfg in filter(None, (config, few_channels_config(plan, config),
                             segmented_config(plan, config))):
        check_config(plan, cfg)
    f = plan.family
    kname = f"ssmc_scan_{''.join(ch if ch.isalnum() else '_' for ch in f.name)}"
    gen = _ScanGen(plan, config)
    body = TILE_HELPERS + "\n" + gen.kernel(kname)
    body += launcher_source(plan, config, gen.sel, kname)
    if scan_backward.supports_backward(plan) is None:
        body += scan_backward.generate(plan, config, kname)
    return codegen.module_source(plan, config, WHAT, body, notes)
