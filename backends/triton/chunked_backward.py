"""The chunked SSD (Mamba-2) backward on Triton: templates and their rendering from the plan.

Appended to the forward's module as ``backward(problem, dout, dfinal)``. Per head, with the
chunk-relative cumulative log-decay ``cum`` and the input coefficient ``coef`` (the forward's
prep kernel, recomputed), L_ts = exp(cum_t - cum_s) for s <= t inside a chunk, S_c the state
entering chunk c and dS_c the gradient of the loss with respect to it:

1. ``recompute``: the forward's prep, C B^T and states kernels (and, with a gate, y before
   silu(z)): nothing per step is kept by the forward.
2. ``gate`` (with z): dy before the gate, and dz.
3. ``dstates`` walks the chunks backward: dS_c = decay_c dS_{c+1} + sum_t exp(cum_t) C_t^T dy_t,
   from the final state's gradient; stores dS_{c+1} per chunk, <dS_{c+1}, S_{c+1}> (the decay
   gradient's share from beyond the chunk) and dS_0 (the initial states' gradient).
4. ``dx``: dX_s = sum_{t>=s} L_ts (C_t.B_s) dy_t + exp(cum_end - cum_s) dS_{c+1}^T B_s; then
   dx = coef dX + D dy and dcoef = x.dX.
5. ``dB`` and ``dC`` (per group of heads that share them, heads summed in the program):
   dB_s = coef_s [sum_{t>=s} L_ts (dy_t.x_s) C_t + exp(cum_end - cum_s) dS_{c+1} x_s],
   dC_t = sum_{s<=t} L_ts coef_s (dy_t.x_s) B_s + exp(cum_t) S_c dy_t,
   and per head r_t = C_t.dC_t - B_t.dB_t: the gradient of the loss with respect to the
   cumulative log-decay at t (every output after it carries +cum, every input before it -cum).
6. ``ddt``: dlog(Abar)_t = sum_{t'>=t in the chunk} r_t' + <dS_{c+1}, S_{c+1}>; then dDelta, da
   and ddt through the plan's derivatives (``plan.disc.derivatives``: (dAbar/dDelta)/Abar, dBbar/d,
   the Delta map's), dA and ddt_bias summed per chunk.

The trapezoidal rule's previous input B_{s-1} x_{s-1} is seen from step s-1 with the weight
p = Bbar_prev/Abar of step s (the forward's prev_coef): an input s counts with coef_s on the
diagonal and coef_s + p_s at every later step; dp_s goes to step s+1's Delta and a through the
pass's d(Bbar_prev/Abar).

Packed sequences (cu_seqlens / seq_idx) go to one batch row each, padded past their length,
where the prep and ddt kernels take Abar = 1, Bbar = 0 (``row_lengths``): the row's last state
is the sequence's, and nothing crosses from one sequence to the next.

Placeholders ``{name}`` etc. are filled by ``str.format``; the kernels contain no other braces.
"""
from __future__ import annotations

from typing import Dict, Optional

from ssmc.ir import KernelPlan, Sharing

from . import codegen

MAX_HEAD_DIM = 256   # dB, dC and dx keep a whole row of head_dim in one tile


def supports_backward(plan: KernelPlan) -> Optional[str]:
    """None when the chunked backward is generated for ``plan``, else why not."""
    d = plan.disc
    der = d.derivatives
    if der.abar_dt_over_abar is None or der.abar_a_over_abar is None:
        return (f"(dAbar/dDelta)/Abar of {plan.family.method.value} has a pole: the chunked "
                "backward differentiates log(Abar)")
    if plan.family.gate is not None and der.gate_dz is None:
        return f"the pass derives no derivative of the {plan.family.gate.kind} gate"
    if plan.family.dims.head_dim > MAX_HEAD_DIM:
        return f"head_dim {plan.family.dims.head_dim} > {MAX_HEAD_DIM}: a row no longer fits one tile"
    return None


GATE = '''
@triton.jit
def {name}_bwd_gate(
    dout_ptr, z_ptr, ypre_ptr, dy_ptr, dz_ptr, seqlen, nheads, headdim,
    stride_do_b, stride_do_l, stride_do_h, stride_do_p,
    stride_z_b, stride_z_l, stride_z_h, stride_z_p,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # y = y_pre gate(z): dy_pre = dout gate(z), dz = dout y_pre gate'(z), both printed from the
    # pass (Derivatives.gate, gate_dz). y_pre, dy_pre and dz are (b, l, h, p) contiguous.
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    mask = (t[:, None] < seqlen) & (offs_p[None, :] < headdim)
    g = tl.load(dout_ptr + b * stride_do_b + t[:, None] * stride_do_l + h * stride_do_h
                + offs_p[None, :] * stride_do_p, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(z_ptr + b * stride_z_b + t[:, None] * stride_z_l + h * stride_z_h
                 + offs_p[None, :] * stride_z_p, mask=mask, other=0.0).to(tl.float32)
    dense = ((b * seqlen + t[:, None]) * nheads + h) * headdim + offs_p[None, :]
    y_pre = tl.load(ypre_ptr + dense, mask=mask, other=0.0).to(tl.float32)
{gate_math}
    tl.store(dy_ptr + dense, (g * gate).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + dense, (g * y_pre * gate_dz).to(dz_ptr.dtype.element_ty), mask=mask)
'''

DSTATES = '''
@triton.jit
def {name}_bwd_dstates(
    dy_ptr, C_ptr, cum_ptr, decay_ptr, chunk_states_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
    through_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_C,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_st_b, stride_st_c, stride_st_h, stride_st_n, stride_st_p,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, SUBS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_p = pid_pn % n_pblocks
    pid_n = pid_pn // n_pblocks
    b = pid_bh // nheads
    h = pid_bh % nheads
    g_C = h // heads_per_group_C
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_pn = (offs_n[:, None] < dstate) & (offs_p[None, :] < headdim)
    in_dtype = dy_ptr.dtype.element_ty
    scal_base = (b * nheads + h) * seqlen
    st_tile = offs_n[:, None] * stride_st_n + offs_p[None, :] * stride_st_p
    # the final states' gradient and the initial states': (b, h, p, n) contiguous
    fin_tile = ((b * nheads + h) * headdim + offs_p[None, :]) * dstate + offs_n[:, None]

    # dS (n, p) in fp32 across chunks, from the final state's gradient
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + fin_tile, mask=mask_pn, other=0.0)
    else:
        dS = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(dstates_ptr + b * stride_st_b + c * stride_st_c + h * stride_st_h + st_tile,
                 dS.to(dstates_ptr.dtype.element_ty), mask=mask_pn)
        # paths through the whole chunk: exp(cum_end) <dS[c+1], S_c>
        s_in = tl.load(chunk_states_ptr + b * stride_st_b + c * stride_st_c + h * stride_st_h
                       + st_tile, mask=mask_pn, other=0.0).to(tl.float32)
        decay_c = tl.load(decay_ptr + (b * nheads + h) * nchunks + c)
        tl.store(through_ptr + ((b * nheads + h) * nchunks + c) * tl.num_programs(0) + pid_pn,
                 decay_c * tl.sum(tl.sum(dS * s_in, axis=1), axis=0))
        local = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        for j in range(SUBS):
            t = c * CHUNK + j * BLOCK_T + offs_t
            valid = (j * BLOCK_T + offs_t < CHUNK) & (t < seqlen)
            cum = tl.load(cum_ptr + scal_base + t, mask=valid, other=0.0)
            dy_blk = tl.load(dy_ptr + b * stride_dy_b + t[:, None] * stride_dy_l + h * stride_dy_h
                             + offs_p[None, :] * stride_dy_p,
                             mask=valid[:, None] & (offs_p[None, :] < headdim), other=0.0)
            C_blk = tl.load(C_ptr + b * stride_C_b + t[:, None] * stride_C_l + g_C * stride_C_g
                            + offs_n[None, :] * stride_C_n,
                            mask=valid[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
            dyw = (dy_blk.to(tl.float32) * tl.exp2(cum)[:, None]).to(in_dtype)
            local += _mma(tl.trans(C_blk), dyw, DOT_PRECISION, DOT_UPCAST)
        dS = dS * decay_c + local
    if HAS_INIT:
        tl.store(dinit_ptr + fin_tile, dS, mask=mask_pn)
'''

# The skip's share of dx and dD (emitted only for a family with D).
DX_SKIP = """\
    if HAS_D:
        dy_m = tl.load(dy_ptr + b * stride_dy_b + t_m[:, None] * stride_dy_l + h * stride_dy_h
                       + offs_p[None, :] * stride_dy_p, mask=mask_mp, other=0.0).to(tl.float32)
        D_v = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=offs_p < headdim,
                      other=0.0).to(tl.float32)
        dx += dy_m * D_v[None, :]
        # per (row block, batch x chunk, head): the launcher sums
        tl.store(dD_ptr + ((pid_bc * tl.num_programs(0) + rb) * nheads + h) * headdim + offs_p,
                 tl.sum(dy_m * x_m, axis=0), mask=offs_p < headdim)
"""

DX = '''
@triton.jit
def {name}_bwd_dx(
    x_ptr, dy_ptr, B_ptr, C_ptr, D_ptr, cb_ptr, cum_ptr, coef_ptr, prev_coef_ptr, dstates_ptr,
    dx_ptr, dcoef_ptr, dprev_ptr, dD_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_B, heads_per_group_C, heads_per_cb,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    stride_st_b, stride_st_c, stride_st_h, stride_st_n, stride_st_p,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, CB_PRECOMPUTED: tl.constexpr, HAS_D: tl.constexpr,
    HAS_PREV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rb = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    b = pid_bc // nchunks
    c = pid_bc % nchunks
    g_B = h // heads_per_group_B
    g_C = h // heads_per_group_C
    in_dtype = x_ptr.dtype.element_ty
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)      # the rows s: inputs
    t_m = c * CHUNK + offs_m
    mask_m = (offs_m < CHUNK) & (t_m < seqlen)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_mp = mask_m[:, None] & (offs_p[None, :] < headdim)
    scal_base = (b * nheads + h) * seqlen
    cum_m = tl.load(cum_ptr + scal_base + t_m, mask=mask_m, other=0.0)
    cum_end = tl.load(cum_ptr + scal_base + tl.minimum(c * CHUNK + CHUNK, seqlen) - 1)
    B_m = tl.load(B_ptr + b * stride_B_b + t_m[:, None] * stride_B_l + g_B * stride_B_g
                  + offs_n[None, :] * stride_B_n,
                  mask=mask_m[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
    # from beyond the chunk: exp(cum_end - cum_s) B_s dS[c+1]
    dS = tl.load(dstates_ptr + b * stride_st_b + c * stride_st_c + h * stride_st_h
                 + offs_n[:, None] * stride_st_n + offs_p[None, :] * stride_st_p,
                 mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim), other=0.0)
    acc = _mma(B_m, dS.to(in_dtype), DOT_PRECISION, DOT_UPCAST)
    acc = acc * tl.exp2(tl.minimum(cum_end - cum_m, 0.0))[:, None]
    # inside the chunk: the outputs t >= s, ((C B^T) o L)^T dy
    for k0 in range(rb * BLOCK_M, CHUNK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        t_k = c * CHUNK + offs_k
        mask_k = (offs_k < CHUNK) & (t_k < seqlen)
        cum_k = tl.load(cum_ptr + scal_base + t_k, mask=mask_k, other=0.0)
        if CB_PRECOMPUTED:
            # C B^T [t, s]; blocks above the diagonal were never written: tl.where drops them
            cbT = tl.load(cb_ptr + b * stride_cb_b + c * stride_cb_c + (h // heads_per_cb) * stride_cb_g
                          + offs_k[:, None] * stride_cb_i + offs_m[None, :],
                          mask=(offs_k[:, None] < CHUNK) & (offs_m[None, :] < CHUNK), other=0.0)
            cbT = cbT.to(tl.float32)
        else:
            C_k = tl.load(C_ptr + b * stride_C_b + t_k[:, None] * stride_C_l + g_C * stride_C_g
                          + offs_n[None, :] * stride_C_n,
                          mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
            cbT = _mma(C_k, tl.trans(B_m), DOT_PRECISION, DOT_UPCAST)
        if HAS_PREV:
            # the diagonal apart: its input enters with Bbar only, later steps also with the
            # next step's previous-input weight
            keep = (offs_k[:, None] > offs_m[None, :]) & mask_k[:, None]
        else:
            keep = (offs_k[:, None] >= offs_m[None, :]) & mask_k[:, None]
        w = tl.where(keep, cbT * tl.exp2(tl.minimum(cum_k[:, None] - cum_m[None, :], 0.0)), 0.0)
        dy_k = tl.load(dy_ptr + b * stride_dy_b + t_k[:, None] * stride_dy_l + h * stride_dy_h
                       + offs_p[None, :] * stride_dy_p,
                       mask=mask_k[:, None] & (offs_p[None, :] < headdim), other=0.0)
        acc += _mma(tl.trans(w).to(in_dtype), dy_k, DOT_PRECISION, DOT_UPCAST)
    x_m = tl.load(x_ptr + b * stride_x_b + t_m[:, None] * stride_x_l + h * stride_x_h
                  + offs_p[None, :] * stride_x_p, mask=mask_mp, other=0.0).to(tl.float32)
    coef_m = tl.load(coef_ptr + scal_base + t_m, mask=mask_m, other=0.0)
    if HAS_PREV:
        C_m = tl.load(C_ptr + b * stride_C_b + t_m[:, None] * stride_C_l + g_C * stride_C_g
                      + offs_n[None, :] * stride_C_n,
                      mask=mask_m[:, None] & (offs_n[None, :] < dstate), other=0.0)
        dy_s = tl.load(dy_ptr + b * stride_dy_b + t_m[:, None] * stride_dy_l + h * stride_dy_h
                       + offs_p[None, :] * stride_dy_p, mask=mask_mp, other=0.0).to(tl.float32)
        diag = tl.sum(C_m.to(tl.float32) * B_m.to(tl.float32), axis=1)[:, None] * dy_s
        prev_m = tl.load(prev_coef_ptr + scal_base + t_m, mask=mask_m, other=0.0)
        tl.store(dprev_ptr + scal_base + t_m, tl.sum(x_m * acc, axis=1), mask=mask_m)
        tl.store(dcoef_ptr + scal_base + t_m, tl.sum(x_m * (acc + diag), axis=1), mask=mask_m)
        dx = acc * (coef_m + prev_m)[:, None] + diag * coef_m[:, None]
    else:
        tl.store(dcoef_ptr + scal_base + t_m, tl.sum(x_m * acc, axis=1), mask=mask_m)
        dx = acc * coef_m[:, None]
{skip}    tl.store(dx_ptr + b * stride_x_b + t_m[:, None] * stride_x_l + h * stride_x_h
             + offs_p[None, :] * stride_x_p, dx.to(dx_ptr.dtype.element_ty), mask=mask_mp)
'''

# dB and dC in two steps. ``dcb`` sums over the heads that share B and C the in-chunk weights
# dCB_ts = sum_h L_ts coef_s (dy_t.x_s) (s <= t), so that dC_t = sum_s dCB_ts B_s and
# dB_s = sum_t dCB_ts C_t are one matmul per group (``dB`` / ``dC``), not one per head; those add
# each head's state term (dy_t S_c decayed from the chunk's start; x_s dS[c+1] decayed to its end).
#
# The decay gradient dlog(Abar_tau) is the sum over the paths through step tau, each counted
# once: the in-chunk pairs s < tau <= t (M_ts = dCB^h_ts (C_t.B_s) per head: ``dcb`` adds the
# pairs inside each (t, s) block and stores each row's block sums, ``ddt`` adds the blocks left
# of tau's), the incoming state's term of each output t >= tau (r_after), the outgoing state's
# term of each input s < tau (r_before) and the paths through the whole chunk (``dstates``).
# The shorter r_t = C_t.dC_t - B_t.dB_t summed over t' >= tau is the same in exact arithmetic,
# but with strong decays its terms cancel to a small difference, in rounding.
DCB = """
@triton.jit
def {name}_bwd_dcb(
    x_ptr, dy_ptr, B_ptr, C_ptr, cb_ptr, cum_ptr, coef_ptr, prev_coef_ptr, dcb_ptr, r_pairs_ptr,
    row_sums_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_B, heads_per_group_C, heads_per_cb,
    heads_per_program,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    stride_dcb_s, stride_dcb_b, stride_dcb_c, stride_dcb_g, stride_dcb_i,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, CB_PRECOMPUTED: tl.constexpr, HAS_PREV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_mk = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    n_kblocks = tl.cdiv(CHUNK, BLOCK_K)
    rb = pid_mk // n_kblocks
    kb = pid_mk % n_kblocks
    if kb * BLOCK_K > rb * BLOCK_M + BLOCK_M - 1:
        return  # above the diagonal: no pair s <= t
    b = pid_bc // nchunks
    c = pid_bc % nchunks
    n_splits = tl.cdiv(heads_per_cb, heads_per_program)
    gcb = pid_gs // n_splits
    split = pid_gs % n_splits
    in_dtype = x_ptr.dtype.element_ty
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)      # outputs t
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)      # inputs s
    t_m = c * CHUNK + offs_m
    t_k = c * CHUNK + offs_k
    mask_m = (offs_m < CHUNK) & (t_m < seqlen)
    mask_k = (offs_k < CHUNK) & (t_k < seqlen)
    offs_p = tl.arange(0, BLOCK_P)
    h_first = gcb * heads_per_cb + split * heads_per_program
    h_last = tl.minimum(h_first + heads_per_program, (gcb + 1) * heads_per_cb)
    # C B^T [t, s] of the heads' B and C (tl.where below drops what was never written above the
    # diagonal)
    if CB_PRECOMPUTED:
        cb = tl.load(cb_ptr + b * stride_cb_b + c * stride_cb_c + gcb * stride_cb_g
                     + offs_m[:, None] * stride_cb_i + offs_k[None, :],
                     mask=(offs_m[:, None] < CHUNK) & (offs_k[None, :] < CHUNK), other=0.0)
        cb = cb.to(tl.float32)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        C_m = tl.load(C_ptr + b * stride_C_b + t_m[:, None] * stride_C_l
                      + (h_first // heads_per_group_C) * stride_C_g + offs_n[None, :] * stride_C_n,
                      mask=mask_m[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
        B_k = tl.load(B_ptr + b * stride_B_b + t_k[:, None] * stride_B_l
                      + (h_first // heads_per_group_B) * stride_B_g + offs_n[None, :] * stride_B_n,
                      mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
        cb = _mma(C_m, tl.trans(B_k), DOT_PRECISION, DOT_UPCAST)
    keep = (offs_m[:, None] >= offs_k[None, :]) & mask_k[None, :]
    strict = offs_m[:, None] > offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for h in range(h_first, h_last):
        scal_base = (b * nheads + h) * seqlen
        cum_m = tl.load(cum_ptr + scal_base + t_m, mask=mask_m, other=0.0)
        cum_k = tl.load(cum_ptr + scal_base + t_k, mask=mask_k, other=0.0)
        coef_k = tl.load(coef_ptr + scal_base + t_k, mask=mask_k, other=0.0)
        if HAS_PREV:
            # an input seen from a later step also carries the next step's previous-input weight
            prev_k = tl.load(prev_coef_ptr + scal_base + t_k, mask=mask_k, other=0.0)
            coef_ts = tl.where(strict, coef_k[None, :] + prev_k[None, :], coef_k[None, :])
        else:
            coef_ts = coef_k[None, :]
        dy_m = tl.load(dy_ptr + b * stride_dy_b + t_m[:, None] * stride_dy_l + h * stride_dy_h
                       + offs_p[None, :] * stride_dy_p,
                       mask=mask_m[:, None] & (offs_p[None, :] < headdim), other=0.0)
        x_k = tl.load(x_ptr + b * stride_x_b + t_k[:, None] * stride_x_l + h * stride_x_h
                      + offs_p[None, :] * stride_x_p,
                      mask=mask_k[:, None] & (offs_p[None, :] < headdim), other=0.0)
        pair = _mma(dy_m.to(in_dtype), tl.trans(x_k.to(in_dtype)), DOT_PRECISION, DOT_UPCAST)
        w = tl.where(keep, pair * (tl.exp2(tl.minimum(cum_m[:, None] - cum_k[None, :], 0.0))
                                   * coef_ts), 0.0)
        acc += w
        # this head's pairs s < tau <= t inside the block; the row sums serve the blocks right
        # of this one
        m_ts = tl.where(strict, w * cb, 0.0)
        before = tl.cumsum(m_ts, axis=1) - m_ts
        tl.atomic_add(r_pairs_ptr + scal_base + t_k,
                      tl.sum(tl.where(offs_m[:, None] >= offs_k[None, :], before, 0.0), axis=0),
                      mask=mask_k, sem="relaxed")
        tl.store(row_sums_ptr + (scal_base + t_m) * n_kblocks + kb, tl.sum(m_ts, axis=1),
                 mask=mask_m)
    tl.store(dcb_ptr + split * stride_dcb_s + b * stride_dcb_b + c * stride_dcb_c + gcb * stride_dcb_g
             + offs_m[:, None] * stride_dcb_i + offs_k[None, :], acc,
             mask=(offs_m[:, None] < CHUNK) & (offs_k[None, :] < CHUNK))
"""

# dB and dC from dCB and the state terms: one template, (rows, columns) swapped. For dC the rows
# are outputs t and the sum runs over inputs s <= t: dCB [t, s] B_s; for dB the rows are inputs s
# and the sum over outputs t >= s: dCB[t, s]^T C_t.
BC = """
@triton.jit
def {name}_bwd_d{W}(
    x_ptr, dy_ptr, B_ptr, C_ptr, cum_ptr, coef_ptr, prev_coef_ptr, states_ptr, dcb_ptr, dW_ptr,
    r_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_B, heads_per_group_C, heads_per_cb,
    heads_per_program, dcb_splits,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_st_b, stride_st_c, stride_st_h, stride_st_n, stride_st_p,
    stride_dcb_s, stride_dcb_b, stride_dcb_c, stride_dcb_g, stride_dcb_i,
    stride_dW_s, stride_dW_b, stride_dW_l, stride_dW_g,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_PREV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    n_nblocks = tl.cdiv(dstate, BLOCK_N)
    rb = pid_mn // n_nblocks
    nb = pid_mn % n_nblocks
    b = pid_bc // nchunks
    c = pid_bc % nchunks
    heads_per_group = heads_per_group_{W}
    n_splits = tl.cdiv(heads_per_group, heads_per_program)
    g = pid_gs // n_splits
    split = pid_gs % n_splits
    in_dtype = x_ptr.dtype.element_ty
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_m = c * CHUNK + offs_m
    mask_m = (offs_m < CHUNK) & (t_m < seqlen)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_mp = mask_m[:, None] & (offs_p[None, :] < headdim)
    mask_mn = mask_m[:, None] & (offs_n[None, :] < dstate)
    W_m = tl.load({W}_ptr + b * stride_{W}_b + t_m[:, None] * stride_{W}_l + g * stride_{W}_g
                  + offs_n[None, :] * stride_{W}_n, mask=mask_mn, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    h_first = g * heads_per_group + split * heads_per_program
    h_last = tl.minimum(h_first + heads_per_program, (g + 1) * heads_per_group)
    # each head's state term, and its share of the decay gradient
    for h in range(h_first, h_last):
        scal_base = (b * nheads + h) * seqlen
        cum_m = tl.load(cum_ptr + scal_base + t_m, mask=mask_m, other=0.0)
        rows_m = tl.load({rows}_ptr + b * stride_{rows}_b + t_m[:, None] * stride_{rows}_l
                         + h * stride_{rows}_h + offs_p[None, :] * stride_{rows}_p,
                         mask=mask_mp, other=0.0)
        # (p, n) tiles of the (n, p) chunk tensor
        S_t = tl.load(states_ptr + b * stride_st_b + c * stride_st_c + h * stride_st_h
                      + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n,
                      mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate), other=0.0)
        from_state = _mma(rows_m.to(in_dtype), S_t.to(in_dtype), DOT_PRECISION, DOT_UPCAST)
{state_scale}
        tl.atomic_add(r_ptr + scal_base + t_m, tl.sum(W_m * from_state, axis=1), mask=mask_m,
                      sem="relaxed")
        total += from_state
    # the in-chunk pairs: once per group, by the programs of the first head split
    if split == 0:
        for gcb in range(g * heads_per_group // heads_per_cb, (g + 1) * heads_per_group // heads_per_cb):
            g_other = (gcb * heads_per_cb) // heads_per_group_{V}
            for k0 in range({loop}, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                t_k = c * CHUNK + offs_k
                mask_k = (offs_k < CHUNK) & (t_k < seqlen)
                dcb = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                for sp in range(dcb_splits):
                    dcb += tl.load(dcb_ptr + sp * stride_dcb_s + b * stride_dcb_b + c * stride_dcb_c
                                   + gcb * stride_dcb_g + {dcb_tile},
                                   mask={dcb_keep}, other=0.0)
                V_k = tl.load({V}_ptr + b * stride_{V}_b + t_k[:, None] * stride_{V}_l
                              + g_other * stride_{V}_g + offs_n[None, :] * stride_{V}_n,
                              mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
                total += _mma(dcb.to(in_dtype), V_k, DOT_PRECISION, DOT_UPCAST)
    tl.store(dW_ptr + split * stride_dW_s + b * stride_dW_b + t_m[:, None] * stride_dW_l
             + g * stride_dW_g + offs_n[None, :], total, mask=mask_mn)
"""

# dC: rows are outputs t (dy_t, their state term dy_t S_c decayed from the chunk's start); the
# columns are inputs s <= t, dCB[t, s] read as is.
DC_PARTS = dict(
    W="C", V="B", rows="dy", loop="0, (rb + 1) * BLOCK_M",
    state_scale="        from_state = from_state * tl.exp2(tl.minimum(cum_m, 0.0))[:, None]",
    dcb_tile="offs_m[:, None] * stride_dcb_i + offs_k[None, :]",
    dcb_keep="(offs_m[:, None] >= offs_k[None, :]) & (offs_k[None, :] < CHUNK) & (offs_m[:, None] < CHUNK)",
)
# dB: rows are inputs s (x_s, their state term coef_s x_s dS[c+1] decayed to the chunk's end);
# the columns are outputs t >= s, dCB[t, s] read transposed.
DB_PARTS = dict(
    W="B", V="C", rows="x", loop="rb * BLOCK_M, CHUNK",
    state_scale=(
        "        coef_m = tl.load(coef_ptr + scal_base + t_m, mask=mask_m, other=0.0)\n"
        "        if HAS_PREV:\n"
        "            coef_m += tl.load(prev_coef_ptr + scal_base + t_m, mask=mask_m, other=0.0)\n"
        "        cum_end = tl.load(cum_ptr + scal_base + tl.minimum(c * CHUNK + CHUNK, seqlen) - 1)\n"
        "        from_state = from_state * (tl.exp2(tl.minimum(cum_end - cum_m, 0.0)) * coef_m)[:, None]"),
    dcb_tile="offs_k[None, :] * stride_dcb_i + offs_m[:, None]",
    dcb_keep="(offs_k[None, :] >= offs_m[:, None]) & (offs_k[None, :] < CHUNK) & (offs_m[:, None] < CHUNK)",
)

DDT = '''
@triton.jit
def {name}_bwd_ddt(
    dt_ptr, A_ptr, dt_bias_ptr, r_pairs_ptr, row_sums_ptr, r_after_ptr, r_before_ptr, dcoef_ptr,
    dprev_ptr,
    through_ptr, ddt_ptr, dA_ptr, dbias_ptr, row_len_ptr, seqlen, nheads, nchunks, n_through,
    n_kblocks,
    stride_dt_b, stride_dt_l, stride_dt_h, stride_A_b, stride_A_l, stride_A_h,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
    PAIR_BLOCK: tl.constexpr, HAS_DT_BIAS: tl.constexpr, ROW_LENGTHS: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = tl.arange(0, BLOCK_Q)
    t = c * CHUNK + offs
    valid = (offs < CHUNK) & (t < seqlen)
    if ROW_LENGTHS:
        valid = valid & (t < tl.load(row_len_ptr + b))   # padded steps have no Delta or A
    scal = (b * nheads + h) * seqlen + t
    bhc = (b * nheads + h) * nchunks + c
{prologue}
{step}
    # d/dlog(Abar_t): the paths through step t, from before it to after it (none cancel)
    r_pairs = tl.load(r_pairs_ptr + scal, mask=valid, other=0.0)
    # the pairs whose input lies in a block left of t's: each row's block sums, over the blocks
    # left of t's, over the rows t' >= t
    offs_j = tl.arange(0, BLOCK_J)
    sums = tl.load(row_sums_ptr + scal[:, None] * n_kblocks + offs_j[None, :],
                   mask=valid[:, None] & (offs_j[None, :] < n_kblocks), other=0.0)
    left = tl.cumsum(sums, axis=1) - sums
    from_later = tl.cumsum(left, axis=0, reverse=True)
    r_pairs += tl.sum(tl.where(offs_j[None, :] == (offs // PAIR_BLOCK)[:, None], from_later, 0.0),
                      axis=1)
    r_after = tl.load(r_after_ptr + scal, mask=valid, other=0.0)
    r_before = tl.load(r_before_ptr + scal, mask=valid, other=0.0)
    offs_s = tl.arange(0, BLOCK_S)
    through = tl.sum(tl.load(through_ptr + bhc * n_through + offs_s, mask=offs_s < n_through,
                             other=0.0), axis=0)
    dlog = (r_pairs + tl.cumsum(r_after, axis=0, reverse=True) + tl.cumsum(r_before, axis=0)
            - r_before + through)
    dcoef = tl.load(dcoef_ptr + scal, mask=valid, other=0.0)
{math}
    ddelta = dlog * ratio_dt + dcoef * bbar_dt
    da = dlog * ratio_a + dcoef * bbar_a
    if HAS_PREV:
        # step t's Delta and a also set the previous input's weight, applied at step t - 1
        dprev = tl.load(dprev_ptr + scal - 1, mask=valid & (t > 0), other=0.0)
        ddelta += dprev * prev_dt
        da += dprev * prev_a
    da = tl.where(valid, da, 0.0)
    ddr = tl.where(valid, ddelta * ({draw}), 0.0)
    tl.store(ddt_ptr + scal, ddr, mask=valid)
{store_da}
    if HAS_DT_BIAS:
        tl.store(dbias_ptr + bhc, tl.sum(ddr, axis=0))
'''


def _print_block(exprs: Dict[str, object], names: Dict[str, str], prefix: str) -> str:
    """``key = expr`` lines printed from sympy (shared subexpressions), zero ones as 0.0."""
    live = {k: e for k, e in exprs.items() if not codegen.is_zero(e)}
    lines, finals = codegen.print_block(live, names, tmp_prefix=prefix)
    lines += [f"{k} = {finals[k]}" for k in live]
    lines += [f"{k} = 0.0" for k in exprs if k not in live]
    return "\n".join(lines)


def render_backward(plan: KernelPlan, name: str, indent) -> str:
    """The backward's kernels (the module's prelude and _mma come from the forward)."""
    fam = plan.family
    der = plan.disc.derivatives
    a_name = "a_t" if fam.A.selective else "a_h"
    prologue = []
    if fam.delta.bias:
        prologue.append("if HAS_DT_BIAS:\n    dt_bias_h = tl.load(dt_bias_ptr + h).to(tl.float32)\n"
                        "else:\n    dt_bias_h = 0.0")
    if not fam.A.selective:
        prologue.append("a_h = tl.load(A_ptr + h * stride_A_h).to(tl.float32)")
    step = ["dr = tl.load(dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, "
            "mask=valid, other=0.0).to(tl.float32)",
            f"delta = {codegen.delta_expr(plan, 'dr', 'dt_bias_h' if fam.delta.bias else None)}"]
    if fam.A.selective:
        step.append("a_t = tl.load(A_ptr + b * stride_A_b + t * stride_A_l + h * stride_A_h, "
                    "mask=valid, other=-1.0).to(tl.float32)")
    exprs = {"ratio_dt": der.abar_dt_over_abar, "ratio_a": der.abar_a_over_abar,
             "bbar_dt": der.bbar_dt, "bbar_a": der.bbar_a}
    trap = plan.disc.prev_input is not None
    if trap:
        exprs.update(prev_dt=der.prev_input_dt, prev_a=der.prev_input_a)
    math = _print_block(exprs, {"dt": "delta", "a": a_name}, "dtmp")
    draw = codegen.print_one(der.delta_raw, {"dt_raw": "dr",
                                             "dt_bias": "dt_bias_h" if fam.delta.bias else "0.0"})
    store_da = ("tl.store(dA_ptr + scal, da, mask=valid)" if fam.A.selective
                else "tl.store(dA_ptr + bhc, tl.sum(da, axis=0))")
    ddt = DDT.format(name=name, prologue=indent("\n".join(prologue), 4),
                     step=indent("\n".join(step), 4), math=indent(math, 4), draw=draw,
                     store_da=indent(store_da, 4))
    gate = ""
    if fam.gate is not None:
        gate_math = _print_block({"gate": der.gate, "gate_dz": der.gate_dz},
                                 {der.gate_z.name: "zt"}, "gtmp")
        gate = GATE.format(name=name, gate_math=indent(gate_math, 4))
    return (gate + DSTATES.format(name=name)
            + DX.format(name=name, skip=DX_SKIP if fam.D is not None else "")
            + DCB.format(name=name) + BC.format(name=name, **DB_PARTS)
            + BC.format(name=name, **DC_PARTS) + ddt
            + BACKWARD_LAUNCHER.format(
                name=name, chunk=plan.chunk_size, trap=trap,
                opt_z="problem.z" if fam.gate is not None else "None",
                opt_d="problem.D" if fam.D is not None else "None",
                opt_bias="problem.dt_bias" if fam.delta.bias else "None",
                # D per head_dim keeps the per-column sums; per head sums them too
                d_reduce="dD" if fam.D is not None and fam.D.sharing is Sharing.HEAD_DIM
                else "dD.sum(1)"))


BACKWARD_LAUNCHER = '''

# How backward allocates what it returns (a test fills them with NaN to catch unwritten elements).
EMPTY = torch.empty


def backward(problem, dout, dfinal, config=None):
    """Gradients of every differentiable input given dout (like y) and dfinal (like the final
    states, one per sequence, or None): {{argument name: gradient}}, shaped like the arguments."""
    cfg = config or CONFIG
    if problem.cu_seqlens is None and problem.seq_idx is None:
        return _backward_rows(problem, dout, dfinal, cfg, None)
    # Packed sequences: each to a batch row of its own, padded past its length (where the
    # kernels take Abar = 1, Bbar = 0, so the row's last state is the sequence's), then the
    # gradients back to their packed places. The padding costs (sequences x longest - total)
    # steps.
    x = problem.x
    total, dev = x.shape[1], x.device
    cu = _cu_seqlens(problem.cu_seqlens, problem.seq_idx, problem.initial_states, dev)
    cu = cu.to(device=dev, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    nseq = lengths.numel()
    width = max(1, int(lengths.max().item()))
    row = torch.repeat_interleave(torch.arange(nseq, device=dev), lengths, output_size=total)
    pos = torch.arange(total, device=dev) - cu[:-1][row]

    def per_token(t):
        return t is not None and t.dim() >= 3 and tuple(t.shape[:2]) == (1, total)

    def to_rows(t):
        out = t.new_zeros((nseq, width) + tuple(t.shape[2:]))
        out[row, pos] = t[0]
        return out

    fields = {{n: getattr(problem, n) for n in ("x", "dt", "A", "B", "C", "z")}}
    rows = types.SimpleNamespace(
        **{{n: to_rows(t) if per_token(t) else t for n, t in fields.items()}}, D=problem.D,
        dt_bias=problem.dt_bias, initial_states=problem.initial_states, cu_seqlens=None,
        seq_idx=None)
    grads = _backward_rows(rows, to_rows(dout), dfinal, cfg, lengths.to(torch.int32))
    return {{n: g[row, pos][None] if per_token(fields.get(n)) else g for n, g in grads.items()}}


def _backward_rows(problem, dout, dfinal, cfg, row_lengths):
    """The backward of batched sequences (``row_lengths``: each row's length, or None)."""
    x = problem.x
    batch, seqlen, nheads, headdim = x.shape
    chunk = {chunk}
    dev = x.device
    z = {opt_z}
    keep = {{}}
    recompute = types.SimpleNamespace(
        x=x, dt=problem.dt, A=problem.A, B=problem.B, C=problem.C, D=problem.D, z=z,
        dt_bias=problem.dt_bias, initial_states=problem.initial_states, seq_idx=None,
        cu_seqlens=None, wants_final_state=False)
    y_pre, _ = launch(recompute, cfg, keep=keep, output=z is not None, gate=False,
                      row_lengths=row_lengths)
    B, C, nchunks = keep["B"], keep["C"], keep["nchunks"]
    dstate = B.shape[-1]
    cum, coef, decay, chunk_states = keep["cum"], keep["coef"], keep["decay"], keep["chunk_states"]
    prev_coef = keep["prev_coef"]     # the previous-input weight per step (trapezoidal)
    precision, upcast = keep["precision"], keep["upcast"]
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    block_p = max(16, triton.next_power_of_2(headdim))
    block_n = max(16, triton.next_power_of_2(dstate))
    grads = {{}}

    # dy before the gate
    if z is not None:
        dy = EMPTY(x.shape, dtype=x.dtype, device=dev)
        dz = EMPTY(z.shape, dtype=z.dtype, device=dev)
        block_l = max(1, 4096 // block_p)
        {name}_bwd_gate[(triton.cdiv(seqlen, block_l), batch * nheads)](
            dout, z, y_pre, dy, dz, seqlen, nheads, headdim, *dout.stride(), *z.stride(),
            BLOCK_L=block_l, BLOCK_P=block_p, num_warps=4)
        grads["z"] = dz
    else:
        dy = dout

    # dS per chunk, backward over the chunks
    dstates = torch.empty_like(chunk_states)
    bp, bn = cfg["state_block_p"], cfg["state_block_n"]
    bt = min(cfg["state_block_t"], max(16, triton.next_power_of_2(chunk)))
    subs = triton.cdiv(chunk, bt)
    n_pn = triton.cdiv(headdim, bp) * triton.cdiv(dstate, bn)
    through = torch.empty(batch, nheads, nchunks, n_pn, dtype=torch.float32, device=dev)
    init = problem.initial_states
    dinit = EMPTY((batch, nheads, headdim, dstate), dtype=torch.float32, device=dev) if init is not None else dummy
    dfin = dfinal.to(torch.float32).contiguous() if dfinal is not None else dummy
    {name}_bwd_dstates[(n_pn, batch * nheads)](
        dy, C, cum, decay, chunk_states, dfin, dstates, dinit, through,
        seqlen, nheads, headdim, dstate, nchunks, nheads // C.shape[2],
        *dy.stride(), *C.stride(), *chunk_states.stride(),
        CHUNK=chunk, BLOCK_T=bt, SUBS=subs, BLOCK_P=bp, BLOCK_N=bn,
        HAS_DFINAL=dfinal is not None, HAS_INIT=init is not None,
        DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=cfg["state_warps"], num_stages=cfg["state_stages"])
    if init is not None:
        grads["initial_states"] = dinit

    # dx, dD and dcoef
    bm, bk = cfg["bwd_block_m"], cfg["bwd_block_k"]
    n_rows = triton.cdiv(chunk, bm)
    D = {opt_d}
    dx = EMPTY(x.shape, dtype=x.dtype, device=dev)
    dcoef = torch.empty_like(cum)
    dprev = torch.empty_like(cum) if {trap} else dummy
    dD = torch.empty(batch * nchunks * n_rows, nheads, headdim, dtype=torch.float32, device=dev) \\
        if D is not None else dummy
    D_strides = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    cb, cb_strides = keep["cb"], keep["cb_strides"]
    {name}_bwd_dx[(n_rows, batch * nchunks, nheads)](
        x, dy, B, C, D if D is not None else dummy, cb, cum, coef, prev_coef, dstates, dx, dcoef,
        dprev, dD,
        seqlen, nheads, headdim, dstate, nchunks, nheads // B.shape[2], nheads // C.shape[2],
        keep["heads_per_cb"],
        *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *D_strides, *cb_strides,
        *dstates.stride(),
        CHUNK=chunk, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=block_p, BLOCK_N=block_n,
        CB_PRECOMPUTED=keep["cb_pre"], HAS_D=D is not None, HAS_PREV={trap},
        DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    grads["x"] = dx
    if D is not None:
        dD = dD.sum(0)
        grads["D"] = {d_reduce}

    # dCB per group of heads sharing B and C, then dB and dC; the decay gradient's shares
    r_after, r_before, r_pairs = (torch.zeros_like(cum) for _ in range(3))
    n_kb = triton.cdiv(chunk, bk)
    row_sums = torch.zeros(batch, nheads, seqlen, n_kb, dtype=torch.float32, device=dev)
    per_program = cfg["bwd_bc_heads"]
    hp_cb = keep["heads_per_cb"]
    dcb_splits = triton.cdiv(hp_cb, per_program)
    dcb = torch.empty(dcb_splits, batch, nchunks, nheads // hp_cb, chunk, chunk,
                      dtype=torch.float32, device=dev)
    {name}_bwd_dcb[(n_rows * n_kb, batch * nchunks, (nheads // hp_cb) * dcb_splits)](
        x, dy, B, C, cb, cum, coef, prev_coef, dcb, r_pairs, row_sums,
        seqlen, nheads, headdim, dstate, nchunks, nheads // B.shape[2], nheads // C.shape[2],
        hp_cb, per_program,
        *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *cb_strides, *dcb.stride()[:5],
        CHUNK=chunk, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=block_p, BLOCK_N=block_n,
        CB_PRECOMPUTED=keep["cb_pre"], HAS_PREV={trap}, DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    bbn = min(cfg["bwd_block_n"], block_n)
    for W, kernel, states, r in (("B", {name}_bwd_dB, dstates, r_before),
                                 ("C", {name}_bwd_dC, chunk_states, r_after)):
        src = B if W == "B" else C
        groups = src.shape[2]
        splits = triton.cdiv(nheads // groups, per_program)
        dW = torch.empty(splits, batch, seqlen, groups, dstate, dtype=torch.float32, device=dev)
        kernel[(n_rows * triton.cdiv(dstate, bbn), batch * nchunks, groups * splits)](
            x, dy, B, C, cum, coef, prev_coef, states, dcb, dW, r,
            seqlen, nheads, headdim, dstate, nchunks, nheads // B.shape[2], nheads // C.shape[2],
            hp_cb, per_program, dcb_splits,
            *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *states.stride(),
            *dcb.stride()[:5], *dW.stride()[:4],
            CHUNK=chunk, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=block_p, BLOCK_N=bbn, HAS_PREV={trap},
            DOT_PRECISION=precision, DOT_UPCAST=upcast,
            num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
        dW = dW.sum(0) if splits > 1 else dW[0]
        given = getattr(problem, W)
        grads[W] = dW if given.dim() == 4 else dW.sum((0, 1))

    # ddt, dA, ddt_bias
    dt_bias = {opt_bias}
    dt, A = keep["dt"], keep["A"]
    ddt = torch.empty_like(cum)
    dA = torch.empty_like(cum) if problem.A.dim() == 3 else \\
        torch.empty(batch, nheads, nchunks, dtype=torch.float32, device=dev)
    dbias = torch.empty(batch, nheads, nchunks, dtype=torch.float32, device=dev) \\
        if dt_bias is not None else dummy
    {name}_bwd_ddt[(nchunks, batch * nheads)](
        dt, A, dt_bias if dt_bias is not None else dummy, r_pairs, row_sums, r_after, r_before,
        dcoef, dprev, through, ddt, dA, dbias, row_lengths if row_lengths is not None else dummy,
        seqlen, nheads, nchunks, n_pn, n_kb, *dt.stride(), *A.stride(),
        CHUNK=chunk, BLOCK_Q=max(16, triton.next_power_of_2(chunk)),
        BLOCK_S=max(2, triton.next_power_of_2(n_pn)), BLOCK_J=max(2, triton.next_power_of_2(n_kb)),
        PAIR_BLOCK=bk, HAS_DT_BIAS=dt_bias is not None, ROW_LENGTHS=row_lengths is not None,
        HAS_PREV={trap},
        num_warps=4)
    ddt = ddt.transpose(1, 2)
    grads["dt"] = ddt.to(problem.dt.dtype) if problem.dt.dim() == 3 else ddt.sum((0, 1))
    grads["A"] = dA.transpose(1, 2) if problem.A.dim() == 3 else dA.sum((0, 2))
    if dt_bias is not None:
        grads["dt_bias"] = dbias.sum((0, 2))
    return grads
'''
