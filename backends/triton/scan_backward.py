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
sequence and walks it twice in CHUNK-step tiles [BLOCK_D, CHUNK], time across the threads and
the state index n a loop inside each chunk (``_TimeLanesGen``): forward, storing only the state
at each chunk's start (``ckpt``: one state per chunk, the issue's "per-chunk states"); then
backward over the chunks, where each (chunk, n) recomputes its states from the checkpoint by an
associative scan of the (Ā, b) pairs and λ by a reverse scan whose combine reads Ā_{t+1} from
the next element, λ entering from the chunk after. What sums over the states (dx, dΔ, the
output before the gate for dz) is added in registers across the n loop; what sums over the
channels (dB, dC) over the rows a thread holds, then once per program.

Reductions over channels (dB, dC of B/C shared by a group) are written as one partial per
channel block, which the launcher sums in torch (deterministic), or added atomically when a
group has more than ``bwd_max_partials`` blocks. The program's channels share a group (the
launcher picks BLOCK_D dividing the channels per group). Parameters (A, D, Δ's bias, constant
B/C/Δ) are summed per (sequence, channel) and by the launcher over sequences.

The trapezoidal rule's previous-token term B̄₋_t B_{t-1} x_{t-1}: x_{t-1} and B_{t-1} are
loaded shifted back by one step (zero at a sequence's first step) into b_t, and what it feeds
back into x_t and B_t is λ_{t+1} B̄₋_{t+1} = (λ_t - C_t dy_t) (B̄₋/Ā)_{t+1}, the weight printed
from the plan's ``prev_input`` at Δ_{t+1} (a load shifted forward by one step).

Complex-diagonal A keeps the earlier layout, [BLOCK_D, N, CHUNK] tiles with the states across
the threads (``_BackwardGen``, subclassed by ``scan_backward_complex``): its timing is in
bench/NOTES_backward.md with the real kernel's before this layout.
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
BACKWARD_DEFAULTS = {"bwd_block_d": 1, "bwd_chunk": 512, "bwd_num_warps": 4,
                     "bwd_max_partials": 8}
# complex A keeps the [BLOCK_D, N, CHUNK] tiles (scan_backward_complex.py)
COMPLEX_DEFAULTS = {"bwd_block_d": 1, "bwd_chunk": 16, "bwd_num_warps": 1,
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
    """What both layouts read from the plan (coefficients, derivatives, ratios, terms) and the
    kernel's parameters; the base of the complex generator, whose tiles are [BLOCK_D, N, CHUNK]
    (channel, state, step): a
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


RSCAN = '''

@triton.jit
def _ssmc_adjoint(p2, a2, l2, p1, a1, l1):
    # the reverse scan's combine: (p, a, l) of a run of steps t..m is (the product of Abar over
    # t+1..m, Abar_t, lam_t when lam_{m+1} = 0); run 2 follows run 1 in time
    q = p1 * a2
    return q * p2, a1, l1 + q * l2
'''


class _TimeLanesGen:
    """Emits the real-diagonal backward kernel. Tiles: [BLOCK_D, CHUNK] (channel, step), time
    across the threads; the state index n is a loop inside each chunk, so that what sums over
    the states (dx, dΔ, y) is added in registers, and what sums over the channels (dB, dC) over
    the BLOCK_D rows a thread holds. The per-(channel, state) carries between chunks, the
    checkpointed state and λ, are one float per (channel, state) in global memory (ckpt, and
    dh0 which ends as dL/dh_0), re-read by the next chunk after a barrier.

    The scans along the chunk: h_t by (Ā_t, b_t) with the checkpoint folded into b_0; λ_t =
    C_t dy_t + Ā_{t+1} λ_{t+1} by the three-part combine ``_ssmc_adjoint`` over (Ā_t, C_t dy_t),
    which reads Ā_{t+1} from the next element (no shifted Ā, no second exp), with the carry
    Ā_T λ_T folded into the last step. λ_t Ā_t h_{t-1} = λ_t (h_t - b_t) with the plan's
    pole-free ratios (∂Ā/∂·)/Ā; without them h_{t-1} is ``tl.gather``-ed one step back."""

    def __init__(self, plan: KernelPlan):
        base = _BackwardGen(plan)
        self.plan, self.f, self.N, self.sel = plan, base.f, base.N, base.sel
        self.coefs, self.grads, self.trap = base.coefs, base.grads, base.trap
        self.delta_raw, self.ratios, self.bias, self.terms = (base.delta_raw, base.ratios,
                                                              base.bias, base.terms)
        self.base = base
        if self.trap:   # what step t + 1's previous-token term feeds back: (B̄₋/Ā)_{t+1}
            self.prev_ratio = plan.disc.prev_input

    def print_math(self, o, keys, prefix, names=None, rename=None):
        return self.base.print_math(o, keys, prefix, names or {"dt": "dt", "a": "a"}, rename)

    def kernel(self, name: str) -> str:
        sel = self.sel
        o = Lines()
        o.jit_def(name, self.base.params())
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
          "tt = tl.arange(0, CHUNK)",
          "first = tt[None, :] == 0",
          "last = tt[None, :] == CHUNK - 1",
          "zero_d = tl.zeros([BLOCK_D], dtype=tl.float32)",
          "u_rows = u_ptr + bat * stride_u_b + ch64 * stride_u_d",
          "dout_rows = dout_ptr + bat * stride_dout_b + ch64 * stride_dout_d",
          "# du, ddelta and dz are (b, d, l) contiguous",
          "grad_rows = bat * n_channels * seqlen + ch64 * seqlen",
          "# a (channel, state) float of a (.., d, n) tensor is at dn + n",
          "dn = ch64 * N",
          "state_rows = seq64 * n_channels * N + dn  # h0, dhT, dh0, the per-sequence sums")
        if sel["dt"]:
            o("dt_rows = delta_ptr + bat * stride_dt_b + ch64 * stride_dt_d")
        if "z" in self.terms:
            o("z_rows = z_ptr + bat * stride_z_b + ch64 * stride_z_d")
        if sel["A"]:
            o("a_rows = A_ptr + bat * stride_A_b + ch64 * stride_A_d",
              "da_rows = (bat * n_channels + ch64) * N * seqlen")
        for w in ("B", "C"):
            lw = w.lower()
            if sel[w]:
                o(f"# the program's channels share one group of {w}",
                  f"group_{lw} = (pid_d * BLOCK_D) // cpg_{w}",
                  f"{lw}_rows = {w}_ptr + bat * stride_{w}_b + group_{lw}.to(tl.int64) * "
                  f"stride_{w}_g",
                  f"d{lw}_part = 0 if ATOMIC_BC else (pid_d % (cpg_{w} // BLOCK_D)).to(tl.int64)  "
                  f"# which partial d{w} this channel block writes",
                  f"d{lw}_rows = ((d{lw}_part * n_rows + bat) * (n_channels // cpg_{w}) + "
                  f"group_{lw}) * N * seqlen")
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
            o(f"dt = ({codegen.delta_expr(self.plan, 'dr')})[:, None]")
        if "D" in self.terms:
            o("if HAS_D:",
              "    d_skip = tl.load(D_ptr + chl).to(tl.float32)",
              "else:",
              "    d_skip = zero_d")
        # ---- pass 1
        o("", "# pass 1: forward over the chunks, keeping only each chunk's initial state",
          "ckpt_rows = (slot0 + 0).to(tl.int64) * n_channels * N + dn",
          "for n in range(N):")
        o.indent()
        o("if HAS_H0:",
          "    h_in = tl.load(h0_ptr + state_rows + n, mask=ch_ok, other=0.0)",
          "else:",
          "    h_in = zero_d",
          "tl.store(ckpt_ptr + ckpt_rows + n, h_in, mask=ch_ok)")
        o.dedent()
        o("tl.debug_barrier()",
          "for c in range(0, n_chunks - 1):  # the last chunk's final state is not needed")
        o.indent()
        self.load_chunk(o, backward=False)
        o("ckpt_rows = (slot0 + c).to(tl.int64) * n_channels * N + dn",
          "for n in range(N):")
        o.indent()
        self.state_coefficients(o, backward=False)
        o("h_in = tl.load(ckpt_ptr + ckpt_rows + n)",
          "_, hs = tl.associative_scan((abar_m, tl.where(first, bx + abar_m * h_in[:, None], bx)), "
          "1, _ssmc_pair)",
          "h_out = tl.sum(tl.where(last, hs, 0.0), axis=1)",
          "tl.store(ckpt_ptr + ckpt_rows + n_channels * N + n, h_out, mask=ch_ok)")
        o.dedent()
        o("tl.debug_barrier()  # the next chunk reads the states other threads wrote")
        o.dedent()
        # ---- pass 2
        o("", "# pass 2: backward over the chunks. dh0 carries Abar_T lam_T, lam's share in the",
          "# step before the chunk's first (Abar past the sequence's end is 1: the final state's",
          "# gradient enters as is); after the first chunk it is dL/dh_0",
          "for n in range(N):")
        o.indent()
        o("if HAS_DHT:",
          "    lam_in = tl.load(dhT_ptr + state_rows + n, mask=ch_ok, other=0.0)",
          "else:",
          "    lam_in = zero_d",
          "tl.store(dh0_ptr + state_rows + n, lam_in, mask=ch_ok)")
        o.dedent()
        accs = self.accumulators()
        o(*(f"{acc} = {init}" for acc, init, _ in accs))
        o("tl.debug_barrier()",
          "for i in range(0, n_chunks):")
        o.indent()
        o("c = n_chunks - 1 - i",
          "ckpt_rows = (slot0 + c).to(tl.int64) * n_channels * N + dn")
        self.load_chunk(o, backward=True)
        self.chunk_backward(o)
        o.dedent()
        o("# per (sequence, channel block): the launcher sums over sequences")
        for _, _, store in accs:
            o(store)
        return o.text()

    def accumulators(self):
        """(name, initial value, store) of the per-channel gradients summed over time."""
        sel, out = self.sel, []
        row_d = "seq64 * n_channels + ch"
        if not sel["dt"]:
            out.append(("acc_dt", "zero_d", f"tl.store(ddelta_ptr + {row_d}, acc_dt, mask=ch_ok)"))
        if "D" in self.terms:
            out.append(("acc_d", "zero_d", f"tl.store(dD_ptr + {row_d}, acc_d, mask=ch_ok)"))
        if self.bias:
            out.append(("acc_bias", "zero_d",
                        f"tl.store(ddt_bias_ptr + {row_d}, acc_bias, mask=ch_ok)"))
        return out

    def load_chunk(self, o: Lines, backward: bool):
        """The chunk's per-channel inputs as [BLOCK_D, CHUNK] tiles (state-independent)."""
        sel = self.sel
        o("t0 = seq_start + c * CHUNK",
          "if VARLEN:",
          "    offs = t0 + tt",
          "else:  # chunks start at multiples of CHUNK: vector loads",
          "    offs = tl.max_contiguous(tl.multiple_of(t0 + tt, CHUNK), CHUNK)",
          "tm = offs < seq_end",
          "tm2 = ch_ok[:, None] & tm[None, :]",
          "x = tl.load(u_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)")
        if sel["dt"]:
            o("dr = tl.load(dt_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)",
              f"dt = {codegen.delta_expr(self.plan, 'dr')}")
        if self.trap:
            o("# B_{t-1} x_{t-1}, zero at the sequence's first step",
              "offs_p = offs - 1",
              "tm_p = tm & (offs_p >= seq_start)",
              "xp = tl.load(u_rows[:, None] + offs_p[None, :], "
              "mask=ch_ok[:, None] & tm_p[None, :], other=0.0).to(tl.float32)")
            if backward:
                o("# step t + 1, whose previous-token term reads x_t and B_t",
                  "offs_n = offs + 1",
                  "tm_n = offs_n < seq_end")
                if sel["dt"]:
                    o("drn = tl.load(dt_rows[:, None] + offs_n[None, :], "
                      "mask=ch_ok[:, None] & tm_n[None, :], other=0.0).to(tl.float32)",
                      f"dtn = {codegen.delta_expr(self.plan, 'drn')}")
                else:
                    o("dtn = dt")
        if not backward:
            return
        o("g = tl.load(dout_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)")
        if "z" in self.terms:
            o("if HAS_Z:",
              "    zt = tl.load(z_rows[:, None] + offs[None, :], mask=tm2, other=0.0)"
              ".to(tl.float32)",
              "    sig = 1.0 / (1.0 + tl.exp(-zt))",
              "    dy = g * zt * sig",
              "else:",
              "    dy = g")
        else:
            o("dy = g")
        o("y = " + ("d_skip[:, None] * x" if "D" in self.terms else "tl.zeros_like(x)")
          + "  # the output before the gate, summed over the states below",
          "lb = tl.zeros_like(x)  # sum over the states of lam Bbar B",
          "ddt = tl.zeros_like(x)  # dL/dDelta")
        if self.trap:
            o("lbn = tl.zeros_like(x)  # sum over the states of lam_{t+1} Bbar_prev_{t+1} B_t")

    def state_coefficients(self, o: Lines, backward: bool):
        """State n's a, B, C and the coefficients (and in pass 2 their derivatives) printed from
        the plan, masked past the sequence's end to Abar = 1, b = 0."""
        sel = self.sel
        if sel["A"]:
            # past the end a = -1 keeps coefficients like expm1(a dt) / a finite
            o("a = tl.load(a_rows[:, None] + n * stride_A_n + offs[None, :], mask=tm2, "
              "other=-1.0).to(tl.float32)")
        else:
            o("a = tl.load(A_ptr + dn + n).to(tl.float32)[:, None]")
        for w in ("B", "C"):
            if w == "C" and not backward:
                continue
            lw = w.lower()
            if sel[w]:
                o(f"{lw}t = tl.load({lw}_rows + n * stride_{w}_n + offs, mask=tm, other=0.0)"
                  f".to(tl.float32)[None, :]")
            else:
                o(f"{lw}t = tl.load({w}_ptr + dn + n).to(tl.float32)[:, None]")
        if self.trap:
            if sel["B"]:
                o("bp = tl.load(b_rows + n * stride_B_n + offs_p, mask=tm_p, other=0.0)"
                  ".to(tl.float32)[None, :]")
            else:
                o("bp = bt")
        keys = dict(self.coefs)
        if backward:
            keys.update(self.grads)
            keys.update(self.ratios or {})
        self.live = self.print_math(o, keys, "btmp" if backward else "ftmp")
        if backward and self.trap:
            if sel["A"]:
                o("an = tl.load(a_rows[:, None] + n * stride_A_n + offs_n[None, :], "
                  "mask=ch_ok[:, None] & tm_n[None, :], other=-1.0).to(tl.float32)")
            self.print_math(o, {"prev_ratio": self.prev_ratio}, "ntmp",
                            {"dt": "dtn", "a": "an" if sel["A"] else "a"})
            o("# no step t + 1 past the sequence's end: no previous-token term",
              "prev_ratio = tl.where(tm_n[None, :], prev_ratio, 0.0)")
        o("abar_m = tl.where(tm2, abar, 1.0)",
          "bb = bbar * bt  # Bbar B")
        if self.trap:
            o("bx = tl.where(tm2, bb * x + bbar_prev * bp * xp, 0.0)")
        else:
            o("bx = tl.where(tm2, bb * x, 0.0)")

    def chunk_backward(self, o: Lines):
        sel, terms, live = self.sel, self.terms, None
        o("for n in range(N):")
        o.indent()
        self.state_coefficients(o, backward=True)
        live = self.live
        o("h_in = tl.load(ckpt_ptr + ckpt_rows + n)",
          "_, hs = tl.associative_scan((abar_m, tl.where(first, bx + abar_m * h_in[:, None], bx)), "
          "1, _ssmc_pair)  # the chunk's states",
          "y += ct * hs",
          "gc = ct * dy",
          "lam_in = tl.load(dh0_ptr + state_rows + n)",
          "_, _, lam = tl.associative_scan((tl.full(gc.shape, 1.0, tl.float32), abar_m, "
          "tl.where(last, gc + lam_in[:, None], gc)), 1, _ssmc_adjoint, reverse=True)",
          "tl.store(dh0_ptr + state_rows + n, tl.sum(tl.where(first, abar_m * lam, 0.0), axis=1), "
          "mask=ch_ok)",
          "lam = tl.where(tm2, lam, 0.0)")
        if self.ratios:
            o("dabar_h = lam * (hs - bx)  # lam_t Abar_t h_{t-1}")
        else:
            o("h_prev = tl.where(first, h_in[:, None], tl.gather(hs, tl.maximum(tt - 1, 0)"
              "[None, :] + tl.zeros_like(hs).to(tl.int32), 1))",
              "dabar = lam * h_prev")
        o("dbbar = lam * bt * x",
          "lb += lam * bb")
        if self.trap:
            o("# step t + 1's previous-token term: lam_{t+1} Bbar_prev_{t+1} = (lam_t - C_t dy_t)",
              "# (Bbar_prev / Abar)_{t+1}, as lam_t = C_t dy_t + Abar_{t+1} lam_{t+1}",
              "lbpn = (lam - gc) * prev_ratio",
              "dbbarp = lam * bp * xp",
              "lbn += lbpn * bt")

        def chain(var):
            abar_term = (f"dabar_h * ratio_{var}" if f"ratio_{var}" in live else None) \
                if self.ratios else (f"dabar * abar_{var}" if f"abar_{var}" in live else None)
            parts = [abar_term,
                     f"dbbar * bbar_{var}" if f"bbar_{var}" in live else None,
                     f"dbbarp * bbar_prev_{var}" if f"bbar_prev_{var}" in live else None]
            parts = [p for p in parts if p]
            return " + ".join(parts) if parts else None
        ddt, da = chain("dt"), chain("a")
        if ddt:
            o(f"ddt += {ddt}")
        acc_n = "tl.load({ptr} + state_rows + n, mask=ch_ok, other=0.0)"
        if sel["A"]:
            o(f"tl.store(dA_ptr + da_rows[:, None] + n * seqlen + offs[None, :], "
              f"{da if da else 'tl.zeros_like(lam)'}, mask=tm2)")
        elif da:
            o(f"tl.store(dA_ptr + state_rows + n, {acc_n.format(ptr='dA_ptr')} + "
              f"tl.sum({da}, axis=1), mask=ch_ok)")
        else:
            o("tl.store(dA_ptr + state_rows + n, zero_d, mask=ch_ok)")
        b_val = "lam * bbar * x"
        if self.trap:   # selective B_t: from step t + 1; a constant B: each step's own term
            b_val += " + lbpn * x" if sel["B"] else " + lam * bbar_prev * xp"
        for w, val in (("B", b_val), ("C", "hs * dy")):
            lw = w.lower()
            if sel[w]:
                o(f"d{lw}_ptrs = d{w}_ptr + d{lw}_rows + n * seqlen + offs",
                  "if ATOMIC_BC:",
                  f"    tl.atomic_add(d{lw}_ptrs, tl.sum({val}, axis=0), mask=tm, sem='relaxed')",
                  "else:",
                  f"    tl.store(d{lw}_ptrs, tl.sum({val}, axis=0), mask=tm)")
            else:
                o(f"tl.store(d{w}_ptr + state_rows + n, {acc_n.format(ptr=f'd{w}_ptr')} + "
                  f"tl.sum({val}, axis=1), mask=ch_ok)")
        o.dedent()
        o("tl.debug_barrier()  # the carries and sums written above are re-read by other threads")
        # ---- per chunk, after the state loop
        if "z" in terms:
            o("if HAS_Z:",
              "    dzt = g * y * sig * (1.0 + zt * (1.0 - sig))",
              "    tl.store(dz_ptr + grad_rows[:, None] + offs[None, :], "
              "dzt.to(dz_ptr.dtype.element_ty), mask=tm2)")
        dx = "lb" + (" + lbn" if self.trap else "")
        if "D" in terms:
            o(f"dx = {dx} + d_skip[:, None] * dy",
              "if HAS_D:",
              "    acc_d += tl.sum(tl.where(tm2, dy * x, 0.0), axis=1)")
        else:
            o(f"dx = {dx}")
        o("tl.store(du_ptr + grad_rows[:, None] + offs[None, :], dx.to(du_ptr.dtype.element_ty), "
          "mask=tm2)")
        # dL/dDelta and its chain through the Delta map to the raw dt (and its bias)
        draw = codegen.print_one(self.delta_raw, {"dt_raw": "dr", "dt_bias": "dt_bias"})
        if sel["dt"]:
            o(f"ddr = tl.where(tm2, ddt * ({draw}), 0.0)",
              "tl.store(ddelta_ptr + grad_rows[:, None] + offs[None, :], "
              "ddr.to(ddelta_ptr.dtype.element_ty), mask=tm2)")
            if self.bias:
                o("acc_bias += tl.sum(ddr, axis=1)")
        else:
            o(f"ddr = tl.sum(tl.where(tm2, ddt, 0.0), axis=1) * ({draw})", "acc_dt += ddr")
            if self.bias:
                o("acc_bias += ddr")


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
    # the per-sequence sums over time of a constant A, B, C: added into chunk by chunk
    grads["A"] = (EMPTY({a_shape}, device=dev, dtype=f32) if SELECTIVE["A"]
                  else torch.zeros((nseq, d, N{pair}), device=dev, dtype=f32))
    atomic = any(SELECTIVE[w] and k // bd > BWD_CONFIG["bwd_max_partials"]
                 for w, k in (("B", cpg[0]), ("C", cpg[1])))
    for name, t, k in (("B", bc[0], cpg[0]), ("C", bc[1], cpg[1])):
        if SELECTIVE[name]:
            # zeroed where added into, or where packed sequences leave tokens past the last one
            make = torch.zeros if varlen or atomic else EMPTY
            grads[name] = make((1 if atomic else k // bd, batch, t.shape[{g_axis}], N, L{pair}), device=dev,
                               dtype=f32)
        else:
            grads[name] = torch.zeros((nseq, d, N{pair}), device=dev, dtype=f32)
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
    return PAIR_SCAN + (CPAIR_SCAN if cplx else RSCAN) + LAUNCHER.format(
        config=dict(config), name=plan.family.name, kernel=kernel, opt_args="\n".join(opt),
        sum_args="\n".join(sums), cplx=cplx, **slots)


def generate(plan: KernelPlan, config: dict, forward_kernel: str) -> str:
    """The backward kernel and ``backward`` launcher for the scan module (after its forward)."""
    cplx = plan.family.A.structure is AStructure.COMPLEX_DIAGONAL
    defaults = COMPLEX_DEFAULTS if cplx else BACKWARD_DEFAULTS
    cfg = {k: config.get(k, v) for k, v in defaults.items()}
    name = f"{forward_kernel}_backward"
    if cplx:
        from .scan_backward_complex import ComplexBackwardGen
        gen = ComplexBackwardGen(plan)
    else:
        gen = _TimeLanesGen(plan)
    return "\n\n" + gen.kernel(name) + launcher_source(plan, cfg, name)
