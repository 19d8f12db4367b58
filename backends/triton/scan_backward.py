"""Generator of the selective scan's backward kernel (real diagonal A; complex-diagonal A:
``scan_backward_complex``, the same passes on (re, im) pairs), appended to the scan module as
``backward(...)``.

The adjoint of h_t = Ā_t h_{t-1} + B̄_t B_t x_t (per channel and state element) is the reverse
recurrence λ_t = C_t dy_t + Ā_{t+1} λ_{t+1}, λ_t = ∂L/∂h_t; every input's gradient is a product
of λ_t with a partial derivative of the forward's coefficients (``ssmc.ir.Derivatives``, derived
by sympy from the expressions the forward prints, and printed here the same way):

    dĀ_t = λ_t h_{t-1},  dB̄_t = λ_t B_t x_t
    ∂L/∂Δ_t = Σ_n dĀ_t ∂Ā/∂Δ + dB̄_t ∂B̄/∂Δ,   ∂L/∂a += dĀ_t ∂Ā/∂a + dB̄_t ∂B̄/∂a
    ∂L/∂B_t += λ_t B̄_t x_t,   ∂L/∂C_t += dy_t h_t,   ∂L/∂x_t = Σ_n λ_t B̄_t B_t + D dy_t
    ∂L/∂dt_raw = ∂L/∂Δ · ∂Δ/∂dt_raw (softplus', the clamp's indicator), ∂L/∂h_0 = Ā_1 λ_1

Memory: nothing per token is kept from the forward. One program owns BLOCK_D channels of one
sequence and walks it twice in CHUNK-step tiles [BLOCK_D, N, CHUNK]: forward, storing only the
state at each chunk's start (``ckpt``: one state per chunk, the issue's "per-chunk states");
then backward over the chunks, where each chunk's states are recomputed from its checkpoint by
an associative scan over the chunk's steps (``tl.associative_scan`` of the (Ā, b) pairs) and λ
by the reverse scan of (Ā_{t+1}, C_t dy_t), λ entering from the chunk after. The shifts by one
step (h_{t-1}, Ā_{t+1}) are ``tl.gather`` along the chunk axis.

Reductions over channels (dB, dC of B/C shared by a group) are summed inside the program over
its BLOCK_D channels and written as one partial per channel block, which the launcher sums in
torch: deterministic, no atomics. The program's channels share a group (the launcher picks
BLOCK_D dividing the channels per group). Parameters (A, D, Δ's bias, constant B/C/Δ) are
accumulated over time in registers and written once per (sequence, channel block).

The trapezoidal rule's previous-token term B̄₋_t B_{t-1} x_{t-1}: x_{t-1} and B_{t-1} are
loaded shifted back by one step (zero at a sequence's first step) into b_t, and what it feeds
back into x_t and B_t is λ_{t+1} B̄₋_{t+1}, with λ_{t+1} moved by one step along the chunk
(``tl.gather``; λ entering from the next chunk at the last step) and B̄₋_{t+1} from the same
shifted loads as Ā_{t+1}. Real diagonal families without it generate the same kernel as before.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ssmc.ir import AStructure, KernelPlan

from ssmc.operands import Role

from . import codegen
from .codegen import Lines
from .scan_launcher import optional_term_lines

# BLOCK_D channels x N states x CHUNK steps per tile. bwd_block_d is an upper bound: the launcher
# lowers it to divide the channels per group.
# bwd_max_partials: up to this many channel blocks per group write their own partial dB/dC
# (summed after, deterministic); more add theirs atomically into one (the partials' memory,
# blocks x batch x n x l fp32, would exceed what the training step keeps).
# Timed on the H200 at b8 d4096 l2048 n16 (fwd+bwd ms, bench/gpu_train.py --sweep, one run):
# block_d 4 chunk 32 warps 4: 24.3 (partials); 2/16/2: 14.4; 1/32/1: 14.1; 1/16/1: 12.1;
# 4/16/2: 16.4; 8/8/2: 17.4. Smaller tiles keep more programs resident (bench/NOTES_backward.md).
BACKWARD_DEFAULTS = {"bwd_block_d": 1, "bwd_chunk": 16, "bwd_num_warps": 1,
                     "bwd_max_partials": 8}

PAIR_SCAN = '''

@triton.jit
def _ssmc_pair(a1, b1, a2, b2):
    # two steps h -> a h + b composed in time order: h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2
'''

CPAIR_SCAN = '''

@triton.jit
def _ssmc_cpair(a1, a1_i, b1, b1_i, a2, a2_i, b2, b2_i):
    # _ssmc_pair of complex (re, im) values: h -> a2 (a1 h + b1) + b2
    return (a1 * a2 - a1_i * a2_i, a1 * a2_i + a1_i * a2,
            b1 * a2 - b1_i * a2_i + b2, b1 * a2_i + b1_i * a2 + b2_i)
'''


def supports_backward(plan: KernelPlan) -> Optional[str]:
    """None when the backward kernel is generated for ``plan``, else why not."""
    f = plan.family
    if f.A.structure not in (AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        return (f"the Triton scan's backward is generated for real and complex diagonal A, not "
                f"{f.A.structure.value} A (not yet)")
    if f.gate and f.gate.kind != "silu":
        return f"the Triton scan's backward knows the silu gate, not {f.gate.kind}"
    if plan.disc.derivatives is None:
        return "the plan carries no derivatives of its discretization"
    if f.A.structure is AStructure.COMPLEX_DIAGONAL and plan.disc.derivatives.split is None:
        return "the plan carries no split (re, im) derivatives of its complex discretization"
    return None


class _BackwardGen:
    """Emits the backward kernel. Tiles: [BLOCK_D, N, CHUNK] (channel, state, step); a
    per-token input is [BLOCK_D, CHUNK] (x, Δ, z) or [N, CHUNK] (a group's B, C), a parameter
    [BLOCK_D, N] (A, constant B/C) or [BLOCK_D] (D, Δ's bias, constant Δ); ``*3`` names are
    the same values broadcastable to the 3-D tile."""

    def __init__(self, plan: KernelPlan):
        self.plan, self.f = plan, plan.family
        f = self.f
        self.N = f.dims.state
        self.sel = {"dt": f.delta.selective, "A": f.A.selective, "B": f.B.selective,
                    "C": f.C.selective}
        d = plan.disc
        der = d.derivatives
        self.coefs = {"abar": d.abar, "bbar": d.bbar}
        self.grads = {"abar_dt": der.abar_dt, "abar_a": der.abar_a, "bbar_dt": der.bbar_dt,
                      "bbar_a": der.bbar_a}
        # the trapezoidal rule's previous-token term B̄₋_t B_{t-1} x_{t-1} (zero at a sequence's
        # first token): its inputs are loaded shifted back by one step, and what it feeds
        # back into x_t and B_t comes from step t + 1 (λ_{t+1} B̄₋_{t+1})
        self.trap = not codegen.is_zero(d.bbar_prev)
        if self.trap:
            self.coefs["bbar_prev"] = d.bbar_prev
            self.grads.update(bbar_prev_dt=der.bbar_prev_dt, bbar_prev_a=der.bbar_prev_a)
        self.delta_raw = der.delta_raw
        # (∂Ā/∂·)/Ā without a pole: λ_t h_{t-1} ∂Ā = λ_t (h_t - b_t) ratio, no shifted states
        self.ratios = None
        if der.abar_dt_over_abar is not None and der.abar_a_over_abar is not None:
            self.ratios = {"ratio_dt": der.abar_dt_over_abar, "ratio_a": der.abar_a_over_abar}
        self.bias = f.delta.bias
        self.terms = plan.operands.droppable_terms()   # keys: D, z, dt_bias where present

    # ---- names of the operands as tiles ----------------------------------------------------
    def names(self) -> Dict[str, str]:
        return {"dt": "dt3", "a": "a3"}

    def print_math(self, o: Lines, keys: Dict[str, object], prefix: str,
                   names: Optional[Dict[str, str]] = None, rename: Optional[Dict[str, str]] = None):
        """``name = expr`` for each of ``keys`` (printed from sympy with shared subexpressions,
        Δ and a as ``names`` says; ``rename`` the assigned names); zero expressions are skipped
        (their terms are not emitted)."""
        live = {k: e for k, e in keys.items() if e is not None and not codegen.is_zero(e)}
        lines, finals = codegen.print_block(live, names or self.names(), tmp_prefix=prefix)
        o.extend(lines)
        o.extend(f"{(rename or {}).get(k, k)} = {finals[k]}" for k in live)
        return set(live)

    # ---- kernel ----------------------------------------------------------------------------
    def params(self) -> List[str]:
        sel = self.sel
        p = ["u_ptr", "delta_ptr", "A_ptr", "B_ptr", "C_ptr"]
        p += [f"{k}_ptr" for k in self.terms]
        p += ["h0_ptr", "dout_ptr", "dhT_ptr", "cu_ptr", "ckpt_ptr",
              "du_ptr", "ddelta_ptr", "dA_ptr", "dB_ptr", "dC_ptr"]
        # the terms' gradient buffers: the parameters', then the per-token inputs' (launcher)
        table = self.plan.operands
        by_role = sorted(self.terms, key=lambda k: table[table.keyword.get(k, k)].role
                         is Role.INPUT)
        p += [f"d{k}_ptr" for k in by_role] + ["dh0_ptr"]
        p += ["n_channels", "seqlen", "n_rows", "cpg_B", "cpg_C", "stride_u_b", "stride_u_d",
              "stride_dout_b", "stride_dout_d"]
        if sel["dt"]:
            p += ["stride_dt_b", "stride_dt_d"]
        if sel["A"]:
            p += ["stride_A_b", "stride_A_d", "stride_A_n"]
        for w in ("B", "C"):
            if sel[w]:
                p += [f"stride_{w}_b", f"stride_{w}_g", f"stride_{w}_n"]
        if "z" in self.terms:
            p += ["stride_z_b", "stride_z_d"]
        p += ["BLOCK_D: tl.constexpr", "CHUNK: tl.constexpr", "HAS_H0: tl.constexpr",
              "HAS_DHT: tl.constexpr", "VARLEN: tl.constexpr", "ATOMIC_BC: tl.constexpr"]
        return p + [f"HAS_{k.upper()}: tl.constexpr" for k in self.terms]

    def common_setup(self, o: Lines):
        """The program's sequence, channels and row pointers (every A structure alike)."""
        sel = self.sel
        o(f"N: tl.constexpr = {self.N}",
          "pid_d = tl.program_id(0)",
          "seq = tl.program_id(1)  # batch row, or packed sequence when VARLEN",
          "if VARLEN:",
          "    seq_start = tl.load(cu_ptr + seq).to(tl.int32)",
          "    seq_end = tl.load(cu_ptr + seq + 1).to(tl.int32)",
          "    batch = seq * 0",
          "    # a packed sequence's chunks get slots start // CHUNK + seq + c: distinct for",
          "    # every sequence, fewer than seqlen // CHUNK + sequences + 1 in all",
          "    slot0 = seq_start // CHUNK + seq",
          "else:",
          "    seq_start = 0",
          "    seq_end = seqlen",
          "    batch = seq",
          "    slot0 = seq * tl.cdiv(seqlen, CHUNK)",
          "n_chunks = tl.cdiv(seq_end - seq_start, CHUNK)",
          "bat = batch.to(tl.int64)",
          "seq64 = seq.to(tl.int64)",
          "ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)",
          "ch_ok = ch < n_channels",
          "chl = tl.minimum(ch, n_channels - 1)  # loads read a valid channel; stores are masked",
          "ch64 = chl.to(tl.int64)",
          "nn = tl.arange(0, N)",
          "tt = tl.arange(0, CHUNK)",
          "t3 = tt[None, None, :]",
          "# (channel, state) offsets in a (.., d, n) tensor",
          "dn = ch64[:, None] * N + nn[None, :]",
          "dn_ok = ch_ok[:, None] & (nn[None, :] < N)",
          "zero_d = tl.zeros([BLOCK_D], dtype=tl.float32)",
          "u_rows = u_ptr + bat * stride_u_b + ch64 * stride_u_d",
          "dout_rows = dout_ptr + bat * stride_dout_b + ch64 * stride_dout_d",
          "# du, ddelta and dz are (b, d, l) contiguous",
          "grad_rows = bat * n_channels * seqlen + ch64 * seqlen")
        if not self.ratios:
            o("prev_t = tl.zeros([BLOCK_D, N, CHUNK], dtype=tl.int32) + tl.maximum(t3 - 1, 0)")
        if self.trap:
            o("next_t = tl.zeros([BLOCK_D, N, CHUNK], dtype=tl.int32) + tl.minimum(t3 + 1, "
              "CHUNK - 1)")
        if sel["dt"]:
            o("dt_rows = delta_ptr + bat * stride_dt_b + ch64 * stride_dt_d")
        if "z" in self.terms:
            o("z_rows = z_ptr + bat * stride_z_b + ch64 * stride_z_d")

    def kernel(self, name: str) -> str:
        sel, f = self.sel, self.f
        o = Lines()
        o.jit_def(name, self.params())
        self.common_setup(o)
        if sel["A"]:
            o("a_rows = A_ptr + bat * stride_A_b + ch64[:, None] * stride_A_d "
              "+ nn[None, :] * stride_A_n")
            o("da_rows = (bat * n_channels + ch64[:, None]) * N * seqlen + nn[None, :] * seqlen")
        else:
            o("a = tl.load(A_ptr + dn).to(tl.float32)", "a3 = a[:, :, None]")
        for w in ("B", "C"):
            lw = w.lower()
            if sel[w]:
                o(f"# the program's channels share one group of {w}",
                  f"group_{lw} = (pid_d * BLOCK_D) // cpg_{w}",
                  f"{lw}_rows = {w}_ptr + bat * stride_{w}_b + group_{lw}.to(tl.int64) * "
                  f"stride_{w}_g + nn * stride_{w}_n",
                  f"d{lw}_part = 0 if ATOMIC_BC else (pid_d % (cpg_{w} // BLOCK_D)).to(tl.int64)  "
                  f"# which partial d{w} this channel block writes")
            else:
                o(f"{lw}t = tl.load({w}_ptr + dn).to(tl.float32)", f"{lw}3 = {lw}t[:, :, None]")
        if not sel["dt"]:
            o("dr = tl.load(delta_ptr + chl).to(tl.float32)")
        if self.bias:
            o("if HAS_DT_BIAS:",
              "    dt_bias = tl.load(dt_bias_ptr + chl).to(tl.float32)",
              "else:",
              "    dt_bias = zero_d")
            if sel["dt"]:
                o("dt_bias = dt_bias[:, None]")
        if not sel["dt"]:
            o(f"dt = {codegen.delta_expr(self.plan, 'dr')}", "dt3 = dt[:, None, None]")
        if "D" in self.terms:
            o("if HAS_D:",
              "    d_skip = tl.load(D_ptr + chl).to(tl.float32)",
              "else:",
              "    d_skip = zero_d")
        # ---- pass 1: the state at every chunk's start
        o("", "# pass 1: forward over the chunks, keeping only each chunk's initial state",
          "h = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "if HAS_H0:",
          "    h = tl.load(h0_ptr + seq64 * n_channels * N + dn, mask=dn_ok, other=0.0)",
          "for c in range(0, n_chunks):")
        o.indent()
        o("tl.store(ckpt_ptr + (slot0 + c).to(tl.int64) * n_channels * N + dn, h, mask=dn_ok)")
        self.load_chunk(o, backward=False)
        o("P, H = tl.associative_scan((abar_m, bx), 2, _ssmc_pair)",
          "h = tl.sum(tl.where(t3 == CHUNK - 1, P * h[:, :, None] + H, 0.0), axis=2)")
        o.dedent()
        o("tl.debug_barrier()  # pass 2 reads the checkpoints other threads wrote")
        # ---- pass 2
        o("", "# pass 2: backward over the chunks; lam = dL/dh at the next chunk's first step,",
          "# Abar past the sequence's end is 1: the final state's gradient enters as is",
          "lam = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "if HAS_DHT:",
          "    lam = tl.load(dhT_ptr + seq64 * n_channels * N + dn, mask=dn_ok, other=0.0)")
        accs = self.accumulators()
        o(*(f"{name} = {init}" for name, init, _ in accs))
        o("for i in range(0, n_chunks):")
        o.indent()
        o("c = n_chunks - 1 - i",
          "h0c = tl.load(ckpt_ptr + (slot0 + c).to(tl.int64) * n_channels * N + dn, mask=dn_ok, "
          "other=0.0)")
        self.load_chunk(o, backward=True)
        self.chunk_backward(o)
        o.dedent()
        o("if HAS_H0:").indent()
        self.first_step(o)
        o("tl.store(dh0_ptr + seq64 * n_channels * N + dn, abar0 * lam, mask=dn_ok)").dedent()
        o("# per (sequence, channel block): the launcher sums over sequences")
        for name, _, store in accs:
            o(store)
        return o.text()

    def accumulators(self):
        """(name, initial value, store) of the gradients summed over time in registers."""
        sel, out = self.sel, []
        dn_acc = "tl.zeros([BLOCK_D, N], dtype=tl.float32)"
        row_dn = "seq64 * n_channels * N + dn"
        row_d = "seq64 * n_channels + ch"
        if not sel["A"]:
            out.append(("acc_a", dn_acc, f"tl.store(dA_ptr + {row_dn}, acc_a, mask=dn_ok)"))
        for w in ("B", "C"):
            if not sel[w]:
                out.append((f"acc_{w.lower()}", dn_acc,
                            f"tl.store(d{w}_ptr + {row_dn}, acc_{w.lower()}, mask=dn_ok)"))
        if not sel["dt"]:
            out.append(("acc_dt", "zero_d", f"tl.store(ddelta_ptr + {row_d}, acc_dt, mask=ch_ok)"))
        if "D" in self.terms:
            out.append(("acc_d", "zero_d", f"tl.store(dD_ptr + {row_d}, acc_d, mask=ch_ok)"))
        if self.bias:
            out.append(("acc_bias", "zero_d",
                        f"tl.store(ddt_bias_ptr + {row_d}, acc_bias, mask=ch_ok)"))
        return out

    def first_step(self, o: Lines):
        """``abar0``: Abar at the sequence's first step ([BLOCK_D, N]; 1 for an empty one), for
        dL/dh_0 = Abar_1 lam_1."""
        sel = self.sel
        o("first_ok = ch_ok & ((ch * 0 + seq_end) > seq_start)")
        if sel["dt"]:
            o("dr = tl.load(dt_rows + seq_start, mask=first_ok, other=0.0).to(tl.float32)[:, None]",
              f"dt0 = {codegen.delta_expr(self.plan, 'dr')}  # dt_bias is [BLOCK_D, 1] here")
        else:
            o("dt0 = dt[:, None]")
        if sel["A"]:
            o("a0 = tl.load(a_rows + seq_start, mask=dn_ok & first_ok[:, None], other=-1.0)"
              ".to(tl.float32)")
        else:
            o("a0 = a")
        self.print_math(o, {"abar": self.coefs["abar"]}, "ztmp", {"dt": "dt0", "a": "a0"},
                        {"abar": "abar0"})
        o("abar0 = tl.where(first_ok[:, None], tl.broadcast_to(abar0, (BLOCK_D, N)), 1.0)")

    def next_step(self, o: Lines):
        """``an``: Abar of the step after each of the chunk's steps (1 past the sequence's
        end), from loads shifted by one step (cheaper than moving the tile by one step)."""
        sel = self.sel
        o("offs_n = offs + 1",
          "tm_n = offs_n < seq_end",
          "tm2_n = ch_ok[:, None] & tm_n[None, :]")
        names = {"dt": "dt3", "a": "a3"}
        if sel["dt"]:
            o("drn = tl.load(dt_rows[:, None] + offs_n[None, :], mask=tm2_n, other=0.0)"
              ".to(tl.float32)",
              f"dtn3 = ({codegen.delta_expr(self.plan, 'drn')})[:, None, :]")
            names["dt"] = "dtn3"
        if sel["A"]:
            o("an3 = tl.load(a_rows[:, :, None] + offs_n[None, None, :], "
              "mask=tm_n[None, None, :] & dn_ok[:, :, None], other=-1.0).to(tl.float32)")
            names["a"] = "an3"
        keys, rename = {"abar": self.coefs["abar"]}, {"abar": "an"}
        if self.trap:
            keys["bbar_prev"], rename["bbar_prev"] = self.coefs["bbar_prev"], "bpn"
        self.print_math(o, keys, "ntmp", names, rename)
        o("an = tl.where(tm_n[None, None, :], tl.broadcast_to(an, (BLOCK_D, N, CHUNK)), 1.0)")
        if self.trap:   # no step t + 1 past the sequence's end: no previous-token term
            o("bpn = tl.where(tm_n[None, None, :], tl.broadcast_to(bpn, (BLOCK_D, N, CHUNK)), "
              "0.0)")

    def load_chunk(self, o: Lines, backward: bool):
        """The chunk's inputs as tiles, its coefficients (and in pass 2 their derivatives),
        masked past the sequence's end to Abar = 1, b = 0."""
        sel = self.sel
        o("t0 = seq_start + c * CHUNK",
          "offs = t0 + tt",
          "tm = offs < seq_end",
          "tm2 = ch_ok[:, None] & tm[None, :]",
          "tm3 = tm[None, None, :]",
          "x = tl.load(u_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)",
          "x3 = x[:, None, :]")
        if sel["dt"]:
            o("dr = tl.load(dt_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)",
              f"dt = {codegen.delta_expr(self.plan, 'dr')}",
              "dt3 = dt[:, None, :]")
        if sel["A"]:
            # past the end a = -1 keeps coefficients like expm1(a dt) / a finite
            o("a3 = tl.load(a_rows[:, :, None] + offs[None, None, :], mask=tm3 & dn_ok[:, :, None], "
              "other=-1.0).to(tl.float32)")
        for w in ("B", "C"):
            if w == "C" and not backward:
                continue
            lw = w.lower()
            if sel[w]:
                o(f"{lw}t = tl.load({lw}_rows[:, None] + offs[None, :], mask=tm[None, :], "
                  f"other=0.0).to(tl.float32)", f"{lw}3 = {lw}t[None, :, :]")
        if self.trap:
            o("# B_{t-1} x_{t-1}, zero at the sequence's first step",
              "offs_p = offs - 1",
              "tm_p = tm & (offs_p >= seq_start)",
              "xp = tl.load(u_rows[:, None] + offs_p[None, :], "
              "mask=ch_ok[:, None] & tm_p[None, :], other=0.0).to(tl.float32)",
              "xp3 = xp[:, None, :]")
            if sel["B"]:
                o("bp3 = tl.load(b_rows[:, None] + offs_p[None, :], mask=tm_p[None, :], other=0.0)"
                  ".to(tl.float32)[None, :, :]")
            else:
                o("bp3 = b3")
        keys = dict(self.coefs)
        if backward:
            keys.update(self.grads)
            keys.update(self.ratios or {})
        self.live = self.print_math(o, keys, "btmp" if backward else "ftmp")
        # coefficients that vary with fewer axes (constant Δ, constant B) at the full tile
        o("abar_m = tl.where(tm3, tl.broadcast_to(abar, (BLOCK_D, N, CHUNK)), 1.0)",
          "bb = tl.broadcast_to(bbar * b3, (BLOCK_D, N, CHUNK))  # Bbar B per (channel, state, step)")
        if self.trap:
            o("bx = tl.where(tm3, bb * x3 + bbar_prev * bp3 * xp3, 0.0)")
        else:
            o("bx = tl.where(tm3, bb * x3, 0.0)")

    def dabar_lines(self) -> List[str]:
        """dL/dAbar_t = lam_t h_{t-1}: as lam_t Abar_t h_{t-1} = lam_t (h_t - b_t) where the
        plan's ratios (∂Ā/∂·)/Ā exist, else with the states shifted by one step."""
        if self.ratios:
            return ["dabar_h = lam3 * (hs - bx)  # lam_t Abar_t h_{t-1}"]
        return ["h_prev = tl.where(t3 == 0, h0c[:, :, None], tl.gather(hs, prev_t, 2))",
                "dabar = lam3 * h_prev"]

    def chunk_backward(self, o: Lines):
        sel, terms = self.sel, self.terms
        o("P, H = tl.associative_scan((abar_m, bx), 2, _ssmc_pair)",
          "hs = P * h0c[:, :, None] + H  # the chunk's states",
          "g = tl.load(dout_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)")
        if "z" in terms:
            o("if HAS_Z:",
              "    zt = tl.load(z_rows[:, None] + offs[None, :], mask=tm2, other=0.0)"
              ".to(tl.float32)",
              "    sig = 1.0 / (1.0 + tl.exp(-zt))",
              "    y = tl.sum(c3 * hs, axis=1)" + (" + d_skip[:, None] * x" if "D" in terms else ""),
              "    dzt = g * y * sig * (1.0 + zt * (1.0 - sig))",
              "    tl.store(dz_ptr + grad_rows[:, None] + offs[None, :], "
              "dzt.to(dz_ptr.dtype.element_ty), mask=tm2)",
              "    dy = g * zt * sig",
              "else:",
              "    dy = g")
        else:
            o("dy = g")
        o("dy3 = dy[:, None, :]")
        if "D" in terms:
            o("dx = d_skip[:, None] * dy",
              "if HAS_D:",
              "    acc_d += tl.sum(dy * x, axis=1)")
        else:
            o("dx = tl.zeros_like(dy)")
        self.next_step(o)
        o("# lam_t = C_t dy_t + Abar_{t+1} lam_{t+1}, lam entering from the next chunk",
          "Q, R = tl.associative_scan((an, c3 * dy3), 2, _ssmc_pair, reverse=True)",
          "lam3 = R + Q * lam[:, :, None]",
          *(["lam_in = lam  # lam at the next chunk's first step"] if self.trap else []),
          "lam = tl.sum(tl.where(t3 == 0, lam3, 0.0), axis=2)",
          "lam3 = tl.where(tm3, lam3, 0.0)",
          *self.dabar_lines(),
          "dbbar = lam3 * b3 * x3",
          "dx += tl.sum(lam3 * bb, axis=1)",
          *(["# step t + 1's previous-token term: lam_{t+1} Bbar_prev_{t+1} (B_t x_t)",
             "lam_n3 = tl.where(t3 == CHUNK - 1, lam_in[:, :, None], tl.gather(lam3, next_t, 2))",
             "lbpn = lam_n3 * bpn",
             "dbbarp = lam3 * bp3 * xp3",
             "dx += tl.sum(lbpn * b3, axis=1)"] if self.trap else []),
          "tl.store(du_ptr + grad_rows[:, None] + offs[None, :], dx.to(du_ptr.dtype.element_ty), "
          "mask=tm2)")
        live = self.live

        def chain(var):
            abar_term = (f"dabar_h * ratio_{var}" if f"ratio_{var}" in live else None) \
                if self.ratios else (f"dabar * abar_{var}" if f"abar_{var}" in live else None)
            parts = [abar_term,
                     f"dbbar * bbar_{var}" if f"bbar_{var}" in live else None,
                     f"dbbarp * bbar_prev_{var}" if f"bbar_prev_{var}" in live else None]
            parts = [p for p in parts if p]
            return " + ".join(parts) if parts else None
        ddt, da = chain("dt"), chain("a")
        # dL/dDelta and its chain through the Delta map to the raw dt (and its bias)
        o(f"ddt = tl.sum({ddt}, axis=1)" if ddt else "ddt = tl.zeros_like(dy)")
        draw = codegen.print_one(self.delta_raw, {"dt_raw": "dr", "dt_bias": "dt_bias"})
        if sel["dt"]:
            o(f"ddr = tl.where(tm2, ddt * ({draw}), 0.0)",
              "tl.store(ddelta_ptr + grad_rows[:, None] + offs[None, :], "
              "ddr.to(ddelta_ptr.dtype.element_ty), mask=tm2)")
            if self.bias:
                o("acc_bias += tl.sum(ddr, axis=1)")
        else:
            o(f"ddr = tl.sum(ddt, axis=1) * ({draw})", "acc_dt += ddr")
            if self.bias:
                o("acc_bias += ddr")
        if da:
            if sel["A"]:
                o(f"tl.store(dA_ptr + da_rows[:, :, None] + offs[None, None, :], {da}, "
                  "mask=tm3 & dn_ok[:, :, None])")
            else:
                o(f"acc_a += tl.sum({da}, axis=2)")
        elif sel["A"]:
            o("tl.store(dA_ptr + da_rows[:, :, None] + offs[None, None, :], tl.zeros_like(lam3), "
              "mask=tm3 & dn_ok[:, :, None])")
        b_val = "lam3 * tl.broadcast_to(bbar, (BLOCK_D, N, CHUNK)) * x3"
        if self.trap:   # selective B_t: from step t + 1; a constant B: each step's own term
            b_val += (" + lbpn * x3" if sel["B"] else
                      " + lam3 * tl.broadcast_to(bbar_prev, (BLOCK_D, N, CHUNK)) * xp3")
        for w, val in (("B", b_val), ("C", "hs * dy3")):
            lw = w.lower()
            if sel[w]:
                o(f"d{lw}_ptrs = d{w}_ptr + (((d{lw}_part * n_rows + bat) * "
                  f"(n_channels // cpg_{w}) + group_{lw}) * N + nn[:, None]) * seqlen + "
                  "offs[None, :]",
                  "if ATOMIC_BC:",
                  f"    tl.atomic_add(d{lw}_ptrs, tl.sum({val}, axis=0), mask=tm[None, :], "
                  "sem='relaxed')",
                  "else:",
                  f"    tl.store(d{lw}_ptrs, tl.sum({val}, axis=0), mask=tm[None, :])")
            else:
                o(f"acc_{lw} += tl.sum(tl.where(tm3, {val}, 0.0), axis=2)")


LAUNCHER = '''

BWD_CONFIG = {config!r}
# How backward allocates what it returns (a test fills them with NaN to catch unwritten elements).
EMPTY = torch.empty


def _pow2_divisor(n):
    return n & -n if n > 0 else 1


def backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
             cu_seqlens=None, **_):
    """Gradients of {name}'s (out, last_state) given dout and dlast (None: zero), as a dict
    keyed by argument name (float32 for the parameters, the input's dtype per token). Only
    per-chunk states are kept: see the kernel's comment."""
    batch, d, L = u.shape
    dev = u.device
    varlen = cu_seqlens is not None
    nseq = cu_seqlens.numel() - 1 if varlen else batch
    f32 = torch.float32
    u = _time_contiguous(u)
    dout = _time_contiguous(dout)
    strides = []
    if SELECTIVE["dt"]:
        delta = _time_contiguous(delta)
        strides += [delta.stride(0), delta.stride(1)]
    else:
        delta = delta.contiguous()
{planes}    if SELECTIVE["A"]:
{a_tokens}
    else:
        A = _param(A, {cplx})
    bd = BWD_CONFIG["bwd_block_d"]
    bc, cpg = [], []
    for name, t in (("B", B), ("C", C)):
        if SELECTIVE[name]:
{bc_tokens}
            bd = min(bd, _pow2_divisor(d // groups))  # a channel block within one group
        else:
            t = _param(t, {cplx})
            groups = d
        bc.append(t)
        cpg.append(max(d // groups, 1))
    chunk = BWD_CONFIG["bwd_chunk"]
    n_slots = L // chunk + nseq + 1 if varlen else batch * triton.cdiv(L, chunk)
    ckpt = EMPTY((max(n_slots, 1), d, N{pair}), device=dev, dtype=f32)
    blocks = triton.cdiv(d, bd)
    grads = {{"u": EMPTY(u.shape, device=dev, dtype=u.dtype)}}
    grads["delta"] = (EMPTY((batch, d, L), device=dev, dtype=delta.dtype) if SELECTIVE["dt"]
                      else EMPTY((nseq, d), device=dev, dtype=f32))
    grads["A"] = (EMPTY({a_shape}, device=dev, dtype=f32) if SELECTIVE["A"]
                  else EMPTY((nseq, d, N{pair}), device=dev, dtype=f32))
    atomic = any(SELECTIVE[w] and k // bd > BWD_CONFIG["bwd_max_partials"]
                 for w, k in (("B", cpg[0]), ("C", cpg[1])))
    for name, t, k in (("B", bc[0], cpg[0]), ("C", bc[1], cpg[1])):
        if SELECTIVE[name]:
            # zeroed where added into, or where packed sequences leave tokens past the last one
            make = torch.zeros if varlen or atomic else EMPTY
            grads[name] = make((1 if atomic else k // bd, batch, t.shape[{g_axis}], N, L{pair}), device=dev,
                               dtype=f32)
        else:
            grads[name] = EMPTY((nseq, d, N{pair}), device=dev, dtype=f32)
    opt, flags = [], {{}}
{opt_args}
    grads["initial_state"] = EMPTY((nseq, d, N{pair}), device=dev, dtype=f32)
    dlast = {dlast} if dlast is not None else None
    h0 = _param(initial_state, {cplx}) if initial_state is not None else ckpt
    cu = cu_seqlens if varlen else ckpt
    args = (u, delta, A, bc[0], bc[1], *opt, h0, dout, dlast if dlast is not None else ckpt, cu,
            ckpt, grads["u"], grads["delta"], grads["A"], grads["B"], grads["C"], *opt_grads,
            grads["initial_state"], d, L, batch, cpg[0], cpg[1], u.stride(0), u.stride(1),
            dout.stride(0), dout.stride(1), *strides, *z_strides{plane_args})
    if L > 0 and d > 0 and nseq > 0:
        {kernel}[(blocks, nseq)](*args, BLOCK_D=bd, CHUNK=chunk, HAS_H0=initial_state is not None,
                             HAS_DHT=dlast is not None, VARLEN=varlen, ATOMIC_BC=atomic,
                             num_warps=BWD_CONFIG["bwd_num_warps"], **flags)
    else:
        grads["initial_state"] = (dlast if dlast is not None else
                                  torch.zeros((nseq, d, N{pair}), device=dev, dtype=f32))
        for key in grads:
            if key not in ("u", "initial_state"):
                grads[key].zero_()
        grads["u"].zero_()
    # the per-program partials summed here (deterministic: no atomics)
    if not SELECTIVE["dt"]:
        grads["delta"] = grads["delta"].sum(0)
    if not SELECTIVE["A"]:
        grads["A"] = grads["A"].sum(0)
    for name in ("B", "C"):
        grads[name] = grads[name].sum(0)
{sum_args}
{to_complex}    if initial_state is None:
        grads.pop("initial_state")
    return grads
'''


def launcher_source(plan: KernelPlan, config: dict, kernel: str) -> str:
    """``backward(...)``: allocations, the launch, and the sums of the partials. The optional
    terms are converted and flagged as the forward's launcher does (``optional_term_lines``);
    each gets its gradient buffer by its role: a per-token input's is shaped like it, a
    parameter's is one partial per sequence, summed after the launch."""
    table = plan.operands
    opt, flags = optional_term_lines(plan, "opt", "ckpt", "_time_contiguous({name})")
    opt += [f"    flags['{flag}'] = {name} is not None" for flag, name in flags]
    sums, params, inputs = [], [], []
    for _, name in flags:
        if table[name].role is Role.INPUT:
            inputs.append(name)
            opt += [f"    if {name} is not None:",
                    f"        grads['{name}'] = EMPTY({name}.shape, device=dev, dtype={name}.dtype)"]
        else:
            params.append(name)
            opt.append(f"    grads['{name}'] = EMPTY((nseq, d), device=dev, dtype=f32)")
            sums += [f"    grads['{name}'] = grads['{name}'].sum(0)",
                     f"    if {name} is None:", f"        grads.pop('{name}')"]
    # the kernel takes the parameters' gradient buffers after dC, then the inputs'
    opt.append("    opt_grads = [grads.get(n, ckpt) for n in " + repr(params + inputs) + "]")
    opt.append("    z_strides = " + next(
        (f"({name}.stride(0), {name}.stride(1)) if {name} is not None else (0, 0)"
         for name in inputs), "()"))
    cplx = plan.family.A.structure is AStructure.COMPLEX_DIAGONAL
    if cplx:
        # complex: per-token A, B, C as (2, ...) re/im planes (the forward's _tokens), the
        # parameters, states and every complex gradient as (..., 2) pairs
        slots = dict(
            planes="    planes = []  # the re/im plane strides of the per-token A, B, C\n",
            a_tokens="        A, s = _tokens(A, True)\n        strides += s[:3]\n"
                     "        planes.append(s[3])",
            bc_tokens="            t, s = _tokens(t.unsqueeze(1) if t.dim() == 3 else t, True)\n"
                      "            strides += s[:3]\n            planes.append(s[3])\n"
                      "            groups = t.shape[2]",
            a_shape="(*A.shape[1:], 2)", g_axis=2, pair=", 2",
            dlast="_param(dlast, True)", plane_args=", *planes",
            to_complex="    for key in ('A', 'B', 'C', 'initial_state'):\n"
                       "        grads[key] = torch.view_as_complex(grads[key])\n")
    else:
        slots = dict(
            planes="", a_tokens="        A = _time_contiguous(A)\n"
                                "        strides += list(A.stride()[:3])",
            bc_tokens="            t = _time_contiguous(t.unsqueeze(1) if t.dim() == 3 else t)\n"
                      "            strides += list(t.stride()[:3])\n            groups = t.shape[1]",
            a_shape="A.shape", g_axis=1, pair="", dlast="dlast.to(f32).contiguous()",
            plane_args="", to_complex="")
    return PAIR_SCAN + (CPAIR_SCAN if cplx else "") + LAUNCHER.format(
        config=dict(config), name=plan.family.name, kernel=kernel, opt_args="\n".join(opt),
        sum_args="\n".join(sums), cplx=cplx, **slots)


def generate(plan: KernelPlan, config: dict, forward_kernel: str) -> str:
    """The backward kernel and ``backward`` launcher for the scan module (after its forward)."""
    cfg = {k: config.get(k, v) for k, v in BACKWARD_DEFAULTS.items()}
    name = f"{forward_kernel}_backward"
    if plan.family.A.structure is AStructure.COMPLEX_DIAGONAL:
        from .scan_backward_complex import ComplexBackwardGen
        gen = ComplexBackwardGen(plan)
    else:
        gen = _BackwardGen(plan)
    return "\n\n" + gen.kernel(name) + launcher_source(plan, cfg, name)
