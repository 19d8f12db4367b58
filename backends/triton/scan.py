"""Generator of the selective-scan kernel (selective_scan_fn convention, diagonal / complex A).

One program owns BLOCK_D channels of one sequence and walks it once, the state on chip. Layout
choices, all for the Mamba-1 shape (b8 d4096 l2048 n16, bf16), where the cost is one exp per
(channel, state, step):

- Every tensor in the kernel is a 1-D vector over the program's lanes (one lane = one channel,
  or one of SPLIT parts of a channel's state). The state index n is unrolled in the generated
  source (h0, h1, ...), so each thread keeps its channel's states in registers and C·h is a
  sum of registers, with no cross-thread reduction.
- Time is loaded CHUNK steps at a time as [lanes, CHUNK] tiles (16 bytes per thread for 16-bit
  inputs at CHUNK=8) and split into per-step vectors in registers (``codegen.split_tree``); the
  outputs are joined back and stored 16 bytes wide. B_t and C_t of a group are loaded the same
  way (every lane of a group reads the same 16 bytes, which the L1 broadcasts).
- Within a chunk the code walks n-major (all steps of h0, then of h1...), so only one state's
  B/C tiles are live at a time.
- exp(dt * a) is exp2(dt * a_l2) with a_l2 = a * log2(e) precomputed per lane (codegen).
- SPLIT > 1 gives each channel SPLIT threads (N/SPLIT states each) and reduces y across them
  once per chunk: more parallelism when b * d is small (long single sequences).

Full chunks run without time masks; the last partial chunk runs a masked copy of the body.

Latency: u/dt/z tiles are loaded one chunk ahead (``prefetch``); ``prefetch_bc`` = P carries
the B/C tiles of the first P states across the loop too (loaded after the chunk's last state,
used by the next chunk's first ones), real A with selective B/C only (complex A ignores it);
``bc_ahead`` = R loads state j's tiles before state j - R computes (any family).

The segmented scan for few channel blocks (``mode`` local / apply) and the configs: see
``scan_launcher``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import sympy as sp

from ssmc.ir import AStructure, KernelPlan, Sharing

from . import codegen
from .codegen import Lines, Part, as_text, cadd, cmul
# supports, default_config, candidates: the backend interface, kept importable from here
from .scan_launcher import (SEGMENT_DEFAULTS, candidates, check_config,  # noqa: F401
                            default_config, few_channels_config, kernel_params,
                            launcher_source, segmented_config, supports)

WHAT = "selective scan"
MODES = ("full", "local", "apply")


class _ScanGen:
    def __init__(self, plan: KernelPlan, config: dict, mode: str = "full"):
        check_config(plan, config)
        assert mode in MODES, mode
        self.plan, self.cfg, self.mode = plan, config, mode
        self.local = mode == "local"
        f = self.f = plan.family
        self.N = f.dims.state
        self.split = config["split"]
        self.NS = self.N // self.split
        self.chunk = config["chunk"]
        self.cplx = f.A.structure is AStructure.COMPLEX_DIAGONAL
        self.sel = {"dt": f.delta.selective, "A": f.A.selective, "B": f.B.selective,
                    "C": f.C.selective}
        self.parts = codegen.split_parts(plan)
        self.asyms = ("a_re", "a_im") if self.cplx else ("a",)
        self.trap = any(not codegen.is_zero(e) for k, e in self.parts.items()
                        if k.startswith("bbar_prev"))
        # Which coefficients vary with the state index n (j) and with time (k).
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
        # B/C tiles of the first prefetch_bc states carried one chunk ahead (real A only);
        # within a chunk, state j's A/B/C tiles are loaded before state j - bc_ahead computes.
        self.bc_streams = [] if self.cplx else [
            w for w in ("B", "C") if self.sel[w] and not (w == "C" and self.local)]
        self.pf_bc = min(config.get("prefetch_bc", 0), self.NS) if self.bc_streams else 0
        self.bc_ahead = config.get("bc_ahead", 0)
        # exp(a * dt) with a constant: fold log2(e) into a once per lane.
        self._printed: Dict[str, tuple] = {}
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

    # ---- names ------------------------------------------------------------------------------
    def nidx(self, j: int) -> str:
        return f"(part * {self.NS} + {j})" if self.split > 1 else str(j)

    def a_names(self, j: int, k: Optional[int]) -> Dict[str, str]:
        suffix = f"{j}_{k}" if self.sel["A"] else f"{j}"
        if self.cplx:
            return {"a_re": f"a{suffix}_re", "a_im": f"a{suffix}_im"}
        return {"a": f"a{suffix}"}

    def dt_name(self, k: Optional[int]) -> str:
        return f"dt{k}" if self.sel["dt"] else "dt"

    def bc(self, which: str, j: int, k: int) -> Tuple[Part, Part]:
        base = f"{which.lower()}{j}_{k}" if self.sel[which] else f"{which.lower()}{j}"
        return (base, f"{base}_im" if self.cplx else None)

    def coef(self, key: str, j: int, k: Optional[int]) -> Tuple[Part, Part]:
        """(re, im) variable names of Abar/Bbar/Bbar_prev at (j, k); None where exactly zero."""
        keys = (key + "_re", key + "_im") if self.cplx else (key,)
        out = []
        for kk in keys:
            lvl = self.levels.get(kk)
            if lvl is None:
                out.append(None)
            elif lvl == "P":
                out.append(kk)
            elif lvl == "J":
                out.append(f"{kk}{j}")
            elif lvl == "K":
                out.append(f"{kk}_t{k}")
            else:
                out.append(f"{kk}_v")
        if not self.cplx:
            out.append(None)
        return out[0], out[1]

    def emit_coefs(self, out: Lines, level: str, j: Optional[int], k: Optional[int]):
        keys = [kk for kk, lvl in self.levels.items() if lvl == level]
        if not keys:
            return
        names = {"dt": self.dt_name(k)}
        names.update(self.a_names(j if j is not None else 0, k))
        target = {"P": lambda kk: kk, "J": lambda kk: f"{kk}{j}", "K": lambda kk: f"{kk}_t{k}",
                  "JK": lambda kk: f"{kk}_v"}[level]
        # Print once per level with placeholder names (sympy's cse is the slow part), then
        # rename per (j, k).
        if level not in self._printed:
            ph = {s: f"SSMC_{s.upper()}" for s in ("dt",) + self.asyms}
            ph_l2 = {s: f"{ph[s]}_l2" for s in self.asyms[:1]} if self.l2 else None
            self._printed[level] = codegen.print_block(
                {kk: self.parts[kk] for kk in keys}, ph, tmp_prefix="tmp", log2e_names=ph_l2)
        lines, finals = self._printed[level]
        pattern = re.compile(r"\bSSMC_(DT|A_RE|A_IM|A)(_l2)?\b")

        def rename(text):
            return pattern.sub(lambda m: names[m.group(1).lower()] + (m.group(2) or ""), text)
        out.extend(rename(ln) for ln in lines)
        for kk in keys:
            out(f"{target(kk)} = {rename(finals[kk])}")

    # ---- kernel -----------------------------------------------------------------------------
    def kernel(self, name: str) -> str:
        f, N, NS = self.f, self.N, self.NS
        o = Lines()
        o.jit_def(name, kernel_params(self.plan, self.sel, self.mode))
        o("pid_d = tl.program_id(0)")
        if self.mode == "full":
            o("seq = tl.program_id(1)  # batch index, or sequence index when VARLEN")
        else:
            # pass 1 skips the last segment (its end state is nobody's initial state)
            nprog = "(n_segments - 1)" if self.local else "n_segments"
            o("pid_s = tl.program_id(1)",
              f"seq = pid_s // {nprog}",
              f"seg = pid_s % {nprog}")
        o("if VARLEN:",
          "    seq_start = tl.load(cu_ptr + seq).to(tl.int32)",
          "    seq_end = tl.load(cu_ptr + seq + 1).to(tl.int32)",
          "    batch = seq * 0",
          "else:",
          "    seq_start = 0",
          "    seq_end = seqlen",
          "    batch = seq")
        if self.mode == "full":
            o("start = seq_start", "end = seq_end")
        else:
            # whole chunks per segment (16-byte aligned loads when the sequence start is);
            # segments never cross a sequence boundary
            o("seg_len = tl.cdiv(tl.cdiv(seq_end - seq_start, n_segments), CHUNK) * CHUNK",
              "if VARLEN:",
              "    start = tl.minimum(seq_start + seg * seg_len, seq_end)",
              "else:",
              "    # Stated, because the compiler cannot infer it through seg_len: without it the",
              "    # time tiles load element by element instead of 16 bytes at a time (measured",
              "    # 1.36x slower on the H100).",
              "    start = tl.multiple_of(seg * seg_len, CHUNK)",
              "# a segment past the sequence's end (short sequences) is empty, never negative",
              "end = tl.maximum(tl.minimum(start + seg_len, seq_end), start)")
        o("bat = batch.to(tl.int64)",
          "lane = tl.arange(0, BLOCK_D * SPLIT)")
        if self.split > 1:
            o("ch = pid_d * BLOCK_D + lane // SPLIT", "part = lane % SPLIT")
        else:
            o("ch = pid_d * BLOCK_D + lane")
        o("ch_ok = ch < n_channels",
          "# Loads read a valid channel on every lane (the last one past the end), so that no",
          "# load needs a mask; only stores are masked.",
          "chl = tl.minimum(ch, n_channels - 1)",
          "ch64 = chl.to(tl.int64)",
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
              "    dt_bias = tl.zeros([BLOCK_D * SPLIT], dtype=tl.float32)")
        if not self.sel["dt"]:
            o(f"dt = {codegen.delta_expr(self.plan, 'tl.load(delta_ptr + chl)')}")
        if not self.sel["A"]:
            for j in range(NS):
                nm = self.a_names(j, None)
                self.load_state_element(o, [nm[s] for s in self.asyms], "A_ptr", "ch64", j)
                if self.l2:
                    s = self.asyms[0]
                    o(f"{nm[s]}_l2 = {nm[s]} * {codegen.LOG2E!r}")
        for w in ("B", "C"):
            if self.sel[w]:
                continue
            sharing = getattr(f, w).sharing
            row = "ch64" if sharing is Sharing.HEAD else f"(chl // cpg_{w}).to(tl.int64)"
            for j in range(NS):
                re, im = self.bc(w, j, 0)
                self.load_state_element(o, [re, im] if self.cplx else [re], f"{w}_ptr", row, j)
        if f.D:
            o("if HAS_D:", "    d_skip = tl.load(D_ptr + chl)")
        self.emit_coefs(o, "P", None, None)
        for j in range(NS):
            self.emit_coefs(o, "J", j, None)
        # ---- state
        o(f"state_rows = (seq.to(tl.int64) * n_channels + ch64) * {N}")
        if self.mode != "full":
            o(f"seg_rows = ((seq * n_segments + seg).to(tl.int64) * n_channels + ch64) * {N}")
        comps = (("", 0), ("_im", 1)) if self.cplx else (("", None),)
        zeros = "tl.zeros([BLOCK_D * SPLIT], dtype=tl.float32)"
        for j in range(NS):
            for sfx, part in comps:
                if self.mode == "local":
                    o(f"h{j}{sfx} = {zeros}")
                elif self.mode == "apply":
                    o(f"h{j}{sfx} = tl.load(seg_state_ptr + {self.addr('seg_rows', j, part)})")
                else:
                    o("if HAS_H0:",
                      f"    h{j}{sfx} = tl.load(h0_ptr + {self.addr('state_rows', j, part)})",
                      "else:",
                      f"    h{j}{sfx} = {zeros}")
                if self.trap and self.mode == "full":
                    o(f"p{j}{sfx} = {zeros}")
        if self.trap and self.mode != "full":
            self.previous_input(o)
        if self.local:
            if self.log_decay:
                o("dtsum = tl.zeros([BLOCK_D * SPLIT], dtype=tl.float32)")
            else:
                for j in range(NS):
                    o(f"dec{j} = tl.full([BLOCK_D * SPLIT], 1.0, dtype=tl.float32)")
                    if self.cplx:
                        o(f"dec{j}_im = {zeros}")
        # ---- epilogue rows (whole channels)
        if self.local:
            pass
        elif self.split > 1:
            o("ep_ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)", "ep_ok = ep_ch < n_channels",
              "ep_ch64 = tl.minimum(ep_ch, n_channels - 1).to(tl.int64)",
              "ep_u_rows = u_ptr + bat * stride_u_b + ep_ch64 * stride_u_d")
            if f.D:
                o("if HAS_D:", "    ep_d_skip = tl.load(D_ptr + ep_ch64)")
        else:
            o("ep_ok = ch_ok", "ep_ch64 = ch64")
            if f.D:
                o("if HAS_D:", "    ep_d_skip = d_skip")
        if f.gate and not self.local:
            o("ep_z_rows = z_ptr + bat * stride_z_b + ep_ch64 * stride_z_d")
        if not self.local:
            o("ep_out_rows = out_ptr + bat * stride_out_b + ep_ch64 * stride_out_d")
        # ---- time loop
        o("n_full = (end - start) // CHUNK")
        streams = self.prefetched()
        if streams or self.pf_bc:
            o("# The next chunk's tiles are loaded one iteration ahead (the last one reloads",
              "# itself), so DRAM latency overlaps the current chunk's arithmetic.",
              "# (masks constant along time keep the 16-byte loads)",
              "pre_lanes = (lane * 0 + n_full)[:, None] > 0")
            if streams and not self.local:
                o("pre_rows = (ep_ok.to(tl.int32) * 0 + n_full)[:, None] > 0")
            for name, rows, cond in streams:
                mask = "pre_rows" if rows.startswith("ep_") else "pre_lanes"
                load = f"tl.load({rows}[:, None] + (start + cols)[None, :], mask={mask}, other=0.0)"
                o(*([f"if {cond}:", f"    {name}_pre = {load}"] if cond else [f"{name}_pre = {load}"]))
        if self.pf_bc:
            o("# B/C tiles of the first states: the loop body reloads them for the next chunk")
            self.carry_bc(o, range(self.pf_bc), "start", ", mask=pre_lanes, other=0.0")
        o("for i in range(0, n_full):")
        o.indent()
        o("t0 = start + i * CHUNK")
        if streams or self.pf_bc:
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
        if self.local:
            if self.log_decay:
                if not self.sel["dt"]:
                    o("dtsum = dt * (end - start).to(tl.float32)")
                for j in range(NS):
                    a = self.a_names(j, None)["a"]
                    o(f"dec{j} = " + codegen.print_one(
                        self.parts["abar"], {"dt": "dtsum", "a": a},
                        {"a": f"{a}_l2"} if self.l2 else None))
            for j in range(NS):
                for sfx, part in comps:
                    addr = self.addr("seg_rows", j, part)
                    o(f"tl.store(seg_state_ptr + {addr}, h{j}{sfx}, mask=ch_ok)",
                      f"tl.store(seg_decay_ptr + {addr}, dec{j}{sfx}, mask=ch_ok)")
            return o.text()
        o("if WRITE_HT:" if self.mode == "full" else "if WRITE_HT and seg == n_segments - 1:")
        o.indent()
        for j in range(NS):
            for sfx, part in comps:
                o(f"tl.store(hT_ptr + {self.addr('state_rows', j, part)}, h{j}{sfx}, mask=ch_ok)")
        o.dedent()
        return o.text()

    def load_state_element(self, o: Lines, names: List[str], ptr: str, row: str, j: int):
        """Load element j of row ``row`` of a constant (rows, N) parameter into ``names``
        (re, im of the interleaved pair for complex A)."""
        if self.cplx:
            o(f"{names[0]} = tl.load({ptr} + ({row} * {self.N} + {self.nidx(j)}) * 2)",
              f"{names[1]} = tl.load({ptr} + ({row} * {self.N} + {self.nidx(j)}) * 2 + 1)")
        else:
            o(f"{names[0]} = tl.load({ptr} + {row} * {self.N} + {self.nidx(j)})")

    def addr(self, rows: str, j: int, part: Optional[int]) -> str:
        """Offset of state element j (re/im ``part`` of complex pairs) of the lane's channel."""
        if part is None:
            return f"{rows} + {self.nidx(j)}"
        return f"({rows} + {self.nidx(j)}) * 2 + {part}"

    def previous_input(self, o: Lines):
        """Trapezoidal's B_{t-1} x_{t-1} at a segment's first step, read from memory (zero at
        the sequence's first step)."""
        o("prev_ok = (lane * 0 + start) > seq_start",
          "t_prev = tl.maximum(start - 1, 0)",
          "x_prev = tl.load(u_rows + t_prev, mask=prev_ok, other=0.0).to(tl.float32)")
        for j in range(self.NS):
            if self.sel["B"]:
                row = f"b_rows + {self.nidx(j)} * stride_B_n + t_prev"
                o(f"bp{j} = tl.load({row}, mask=prev_ok, other=0.0)")
                b = (f"bp{j}", None)
                if self.cplx:
                    o(f"bp{j}_im = tl.load({row} + stride_B_plane, mask=prev_ok, other=0.0)")
                    b = (f"bp{j}", f"bp{j}_im")
            else:
                b = self.bc("B", j, 0)
            px = cmul(b, ("x_prev", None))
            o(f"p{j} = {as_text(px[0])}")
            if self.cplx:
                o(f"p{j}_im = {as_text(px[1])}")

    def prefetched(self) -> List[Tuple[str, str, str]]:
        """(name, row pointers, constexpr condition) of the tiles loaded one chunk ahead."""
        if not self.cfg.get("prefetch", False):
            return []
        out = [("u", "u_rows", "")]
        if self.sel["dt"]:
            out.append(("dt", "dt_rows", ""))
        if self.f.gate and not self.local:
            out.append(("z", "ep_z_rows", "HAS_Z"))
        return out

    def carried_tile(self, w: str, j: int, s: int) -> str:
        return f"{w.lower()}{j}_pre{s}"

    def carry_bc(self, o: Lines, states, t: str, mask: str = ""):
        """Load the B/C tiles of ``states`` for the chunk starting at ``t`` into the carried
        variables (fp32 streams: CHUNK / 4 tiles of 4 steps per state and stream)."""
        W = self.f32_width
        cols = "cols_f32" if W < self.chunk else "cols"
        for j in states:
            for w in self.bc_streams:
                rows = f"({w.lower()}_rows + {self.nidx(j)} * stride_{w}_n)[:, None]"
                for s in range(self.chunk // W):
                    o(f"{self.carried_tile(w, j, s)} = tl.load({rows} + "
                      f"({t} + {s * W} + {cols})[None, :]{mask})")

    def load_columns(self, o: Lines, rows: str, masked: bool, prefix: str, suffix: str = "",
                     fp32: bool = False, other: float = 0.0,
                     loaded: Optional[str] = None,
                     carried: Optional[List[str]] = None) -> List[str]:
        """Load CHUNK steps of ``rows`` (one pointer per lane) and split them into per-step
        vectors named ``{prefix}{k}{suffix}``. fp32 streams load 4 steps (16 bytes) at a time.
        ``loaded`` names a tile already in registers (prefetched) instead; ``carried`` the
        fp32 tiles of a stream carried from the previous iteration."""
        if carried is not None:
            return [name for s, tile in enumerate(carried) for name in codegen.split_tree(
                o, tile, "BLOCK_D * SPLIT", self.f32_width, prefix, suffix, s * self.f32_width)]
        if loaded is not None:
            o(f"{prefix}tile0{suffix} = {loaded}.to(tl.float32)")
            return codegen.split_tree(o, f"{prefix}tile0{suffix}", "BLOCK_D * SPLIT",
                                      self.chunk, prefix, suffix)
        rows = rows if rows.isidentifier() else f"({rows})"
        width = self.f32_width if fp32 else self.chunk
        names: List[str] = []
        R = "BLOCK_D * SPLIT"
        for s in range(self.chunk // width):
            offs = "offs" if width == self.chunk else f"offs_f{s}"
            mask = (f", mask=tmask{'' if width == self.chunk else f'_f{s}'}[None, :], "
                    f"other={other!r}") if masked else ""
            tile = f"{prefix}tile{s}{suffix}"
            cast = "" if fp32 else ".to(tl.float32)"
            o(f"{tile} = tl.load({rows}[:, None] + {offs}[None, :]{mask}){cast}")
            part = codegen.split_tree(o, tile, R, width, prefix, suffix, offset=s * width)
            names += part
        return names

    def chunk_body(self, o: Lines, masked: bool):
        f, NS, CH = self.f, self.NS, self.chunk
        R = "BLOCK_D * SPLIT"
        o("offs = t0 + cols")
        if masked:
            o("tmask = offs < end")
        if self.f32_width < CH and self.fp32_streams:
            for s in range(CH // self.f32_width):
                o(f"offs_f{s} = t0 + {s * self.f32_width} + cols_f32")
                if masked:
                    o(f"tmask_f{s} = offs_f{s} < end")
        pre = {name for name, _, _ in self.prefetched()} if not masked else set()
        xs = self.load_columns(o, "u_rows", masked, "x", loaded="u_cur" if "u" in pre else None)
        if self.sel["dt"]:
            raws = self.load_columns(o, "dt_rows", masked, "dr",
                                     loaded="dt_cur" if "dt" in pre else None)
            o.extend(f"dt{k} = {codegen.delta_expr(self.plan, raws[k])}" for k in range(CH))
        if masked:
            for k in range(CH):
                o(f"v{k} = t0 + {k} < end")
        if self.local and self.log_decay and self.sel["dt"]:
            o.extend(f"dtsum += tl.where(v{k}, dt{k}, 0.0)" if masked else f"dtsum += dt{k}"
                     for k in range(CH))
        for k in range(CH):
            self.emit_coefs(o, "K", None, k)
        # Bbar * x hoisted per step when Bbar does not vary with n.
        bbar_lvls = {lvl for key, lvl in self.levels.items()
                     if key.startswith("bbar") and not key.startswith("bbar_prev")}
        hoist_bx = bool(bbar_lvls) and bbar_lvls <= {"P", "K"}
        if hoist_bx:
            for k in range(CH):
                bx = cmul(self.coef("bbar", 0, k), (xs[k], None))
                o(f"bx{k} = {as_text(bx[0])}")
                if bx[1] is not None:
                    o(f"bx{k}_im = {bx[1]}")
        # state j's tiles are loaded before state max(0, j - bc_ahead) computes (only the
        # source order: ptxas schedules within the loop body as it likes)
        first_use = [max(0, j - self.bc_ahead) for j in range(NS)]
        carried = 0 if masked else self.pf_bc
        for j in range(NS):
            o(f"# state n = {self.nidx(j)}")
            for jj in range(NS):
                if first_use[jj] == j:
                    self.load_state(o, jj, masked, carried=jj < carried)
            for k in range(CH):
                self.step(o, j, k, xs[k], hoist_bx, masked)
        if carried:
            o("# the next chunk's B/C tiles of the first states (this chunk's are consumed)")
            self.carry_bc(o, range(carried), "t_next")
        if self.local:
            return
        # ---- outputs of the chunk
        codegen.join_tree(o, [f"y{k}" for k in range(CH)], R, "y_tile")
        if self.cplx:
            o("y_tile = 2.0 * y_tile  # conjugate pairs: y = 2 Re(C h)")
        if self.split > 1:
            o("y_tile = tl.sum(tl.reshape(y_tile, (BLOCK_D, SPLIT, CHUNK)), axis=1)")
        tmask = ", mask=tmask[None, :], other=0.0" if masked else ""
        if f.D:
            if self.split > 1:
                o("if HAS_D:",
                  f"    u_ep = tl.load(ep_u_rows[:, None] + offs[None, :]{tmask}).to(tl.float32)",
                  "    y_tile += ep_d_skip[:, None] * u_ep")
            else:
                codegen.join_tree(o, xs, R, "u_tile")
                o("if HAS_D:", "    y_tile += ep_d_skip[:, None] * u_tile")
        if f.gate:
            z = ("z_cur" if "z" in pre else
                 f"tl.load(ep_z_rows[:, None] + offs[None, :]{tmask})")
            o("if HAS_Z:", f"    z_tile = {z}.to(tl.float32)",
              "    y_tile = y_tile * _silu(z_tile)")
        mask = "ep_ok[:, None] & tmask[None, :]" if masked else "ep_ok[:, None]"
        o("tl.store(ep_out_rows[:, None] + offs[None, :], "
          f"y_tile.to(out_ptr.dtype.element_ty), mask={mask})")

    def load_state(self, o: Lines, j: int, masked: bool, carried: bool):
        """State j's per-step A/B/C tiles split into vectors; ``carried``: B/C from the
        tiles loaded by the previous iteration."""
        for w, letter in (("A", "a"), ("B", "b"), ("C", "c")):
            if not self.sel[w] or (w == "C" and self.local):
                continue
            if carried and w in self.bc_streams:
                self.load_columns(o, "", masked, f"{letter}{j}_", carried=[
                    self.carried_tile(w, j, s) for s in range(self.chunk // self.f32_width)])
                continue
            fp32 = w != "A" or self.cplx
            o(f"{letter}_rows_j = {letter}_rows + {self.nidx(j)} * stride_{w}_n")
            # past the end, a = -1 keeps coefficients like expm1(a dt)/a finite
            self.load_columns(o, f"{letter}_rows_j", masked, f"{letter}{j}_",
                              "_re" if (self.cplx and w == "A") else "", fp32,
                              -1.0 if w == "A" else 0.0)
            if self.cplx:
                self.load_columns(o, f"{letter}_rows_j + stride_{w}_plane", masked,
                                  f"{letter}{j}_", "_im", fp32)

    def step(self, o: Lines, j: int, k: int, x: str, hoist_bx: bool, masked: bool):
        """One state element at one step: h = Abar h + Bbar B x (+ Bbar_prev B_prev x_prev)."""
        self.emit_coefs(o, "JK", j, k)
        h = (f"h{j}", f"h{j}_im" if self.cplx else None)
        b, c = self.bc("B", j, k), self.bc("C", j, k)
        bx = cmul(b, (x, None))
        if hoist_bx:
            bbar_im = self.coef("bbar", j, k)[1]
            term = cmul((f"bx{k}", f"bx{k}_im" if bbar_im else None), b)
        else:
            term = cmul(self.coef("bbar", j, k), bx)
        new = cadd(cmul(self.coef("abar", j, k), h), term)
        if self.trap:
            p = (f"p{j}", f"p{j}_im" if self.cplx else None)
            new = cadd(new, cmul(self.coef("bbar_prev", j, k), p))
        updates = [(h[0], as_text(new[0]))]
        if self.cplx:
            updates.append((h[1], as_text(new[1])))
        if self.trap:
            updates.append((f"p{j}", as_text(bx[0])))
            if self.cplx:
                updates.append((f"p{j}_im", as_text(bx[1])))
        if self.local and not self.log_decay:
            dec = cmul(self.coef("abar", j, k), (f"dec{j}", f"dec{j}_im" if self.cplx else None))
            updates.append((f"dec{j}", as_text(dec[0])))
            if self.cplx:
                updates.append((f"dec{j}_im", as_text(dec[1])))
        if len(updates) > 1 or masked:
            # the new values all read the old ones: compute them first, then assign
            for i, (dst, val) in enumerate(updates):
                o(f"new{i} = {val}")
            for i, (dst, _) in enumerate(updates):
                o(f"{dst} = tl.where(v{k}, new{i}, {dst})" if masked else f"{dst} = new{i}")
        else:
            o(f"{updates[0][0]} = {updates[0][1]}")
        if self.local:
            return
        contrib = codegen._sum(("+", codegen._prod(c[0], h[0])), ("-", codegen._prod(c[1], h[1])))
        o(f"y{k} = {contrib}" if j == 0 else f"y{k} += {contrib}")


def generate(plan: KernelPlan, config: dict, notes: Sequence[str] = ()) -> str:
    config = {**SEGMENT_DEFAULTS, **config}
    gen = _ScanGen(plan, config)
    f = plan.family
    kname = f"ssmc_scan_{''.join(ch if ch.isalnum() else '_' for ch in f.name)}"
    body = gen.kernel(kname)
    few = few_channels_config(plan, config)
    few_name = "None"
    if few is not None:
        few_name = f"{kname}_split{few['split']}"
        body += "\n\n" + _ScanGen(plan, few).kernel(few_name)
    seg_cfg = segmented_config(plan, config)
    for mode in ("local", "apply"):
        body += "\n\n" + _ScanGen(plan, seg_cfg, mode).kernel(f"{kname}_seg_{mode}")
    body += launcher_source(plan, config, gen.sel, kname, few, few_name)
    return codegen.module_source(plan, config, WHAT, body, notes)
