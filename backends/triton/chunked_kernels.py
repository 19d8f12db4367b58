"""Templates of the four chunked SSD kernels; ``chunked_source`` fills in the plan's math.

1. ``prep``   (chunk, b*h): Delta, log-decay (in log2 units, so later kernels use exp2), its
   in-chunk cumulative sum, the input coefficient, each step's weight to the chunk end (a
   suffix sum, exact at the chunk end) and the chunk's total decay.
2. ``cb``     (row x col block, b*chunk, group): C B^T once per chunk and group of heads that
   share B and C; the output kernel reads its tiles instead of recomputing them per head.
3. ``states`` (p x n block, b*h): walks the chunks in order, state (n, p) fp32 in registers.
   Everything it loads is independent of the state, so the chain from one chunk to the next is
   one multiply-add: S <- decay_c S + B_c^T (w_c x_c). Stores the state entering each chunk (in
   the input dtype: it is the output kernel's matmul operand) and the final states.
4. ``output`` (row block x p block, group of ``out_heads`` heads, b*chunk), fully parallel:
   y = exp(cum) C S_in + ((C B^T) o L) X + D x, times silu(z). Assembled from pieces (below) by
   ``chunked_source.render_output``, with the per-head pieces repeated for each head.

Placeholders ``{name}`` etc. are filled by ``str.format``; the kernels contain no other braces.
"""
from __future__ import annotations

PREP = '''
@triton.jit
def {name}_chunk_prep(
    dt_ptr, A_ptr, dt_bias_ptr, seq_idx_ptr, row_len_ptr, cum_ptr, coef_ptr, prev_coef_ptr,
    weight_ptr, decay_ptr, seqlen, nheads, nchunks,
    stride_dt_b, stride_dt_l, stride_dt_h, stride_A_b, stride_A_l, stride_A_h,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_DT_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    ROW_LENGTHS: tl.constexpr,
):
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = tl.arange(0, BLOCK_Q)
    t = c * CHUNK + offs
    valid = (offs < CHUNK) & (t < seqlen)
    stored = valid
    if ROW_LENGTHS:
        # rows padded past their length (the backward of packed sequences): Abar = 1, Bbar = 0
        valid = valid & (t < tl.load(row_len_ptr + b))
{prologue}
    if VARLEN:
        seq_t = tl.load(seq_idx_ptr + t, mask=valid, other=-1)
{step_now}
    # log-space decay (log2 units): a cumulative sum cannot underflow the way a product of
    # decays does over long sequences.
    log_decay = tl.where(valid, {log_decay}, 0.0) * 1.4426950408889634
    coef = tl.where(valid, {coef}, 0.0)
{prev_coef_code}
    cum = tl.cumsum(log_decay, axis=0)
    # Decay from each step to the chunk end as a suffix sum: exact at the end, and its rounding
    # scales with the suffix of recent steps rather than with the whole chunk's sum.
    suffix = tl.cumsum(log_decay, axis=0, reverse=True) - log_decay
    scal = (b * nheads + h) * seqlen + t
    tl.store(cum_ptr + scal, cum, mask=stored)
    tl.store(coef_ptr + scal, coef, mask=stored)
    tl.store(weight_ptr + scal, tl.exp2(suffix) * coef_eff, mask=stored)
{store_prev}
    tl.store(decay_ptr + (b * nheads + h) * nchunks + c, tl.exp2(tl.sum(log_decay, axis=0)))
'''

CB = '''
@triton.jit
def {name}_chunk_cb(
    B_ptr, C_ptr, cb_ptr,
    seqlen, nchunks, dstate, heads_per_cb, heads_per_group_B, heads_per_group_C,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_mk = tl.program_id(0)
    pid_bc = tl.program_id(1)
    gcb = tl.program_id(2)
    n_kblocks = tl.cdiv(CHUNK, BLOCK_K)
    rb = pid_mk // n_kblocks
    kb = pid_mk % n_kblocks
    if kb * BLOCK_K > rb * BLOCK_M + BLOCK_M - 1:
        return  # above the diagonal: never read
    b = pid_bc // nchunks
    c = pid_bc % nchunks
    g_B = (gcb * heads_per_cb) // heads_per_group_B
    g_C = (gcb * heads_per_cb) // heads_per_group_C
    in_dtype = C_ptr.dtype.element_ty
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    t_m = c * CHUNK + offs_m
    t_k = c * CHUNK + offs_k
    mask_m = (offs_m < CHUNK) & (t_m < seqlen)
    mask_k = (offs_k < CHUNK) & (t_k < seqlen)
    C_m = tl.load(C_ptr + b * stride_C_b + t_m[:, None] * stride_C_l + g_C * stride_C_g
                  + offs_n[None, :] * stride_C_n,
                  mask=mask_m[:, None] & (offs_n[None, :] < dstate), other=0.0)
    B_k = tl.load(B_ptr + b * stride_B_b + t_k[:, None] * stride_B_l + g_B * stride_B_g
                  + offs_n[None, :] * stride_B_n,
                  mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
    cb = _mma(C_m, tl.trans(B_k), DOT_PRECISION, DOT_UPCAST)
    tl.store(cb_ptr + b * stride_cb_b + c * stride_cb_c + gcb * stride_cb_g
             + offs_m[:, None] * stride_cb_i + offs_k[None, :],
             cb.to(cb_ptr.dtype.element_ty), mask=(offs_m[:, None] < CHUNK) & (offs_k[None, :] < CHUNK))
'''

STATES = '''
@triton.jit
def {name}_chunk_states(
    x_ptr, B_ptr, init_ptr, seq_idx_ptr, cu_seqlens_ptr, cum_ptr, coef_ptr, prev_coef_ptr,
    weight_ptr, decay_ptr, chunk_states_ptr, final_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_B,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_init_b, stride_init_h, stride_init_p, stride_init_n,
    stride_st_b, stride_st_c, stride_st_h, stride_st_n, stride_st_p,
    stride_fin_b, stride_fin_h, stride_fin_p, stride_fin_n,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, SUBS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_PREV: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_p = pid_pn % n_pblocks
    pid_n = pid_pn // n_pblocks
    b = pid_bh // nheads
    h = pid_bh % nheads
    g_B = h // heads_per_group_B
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_pn = (offs_n[:, None] < dstate) & (offs_p[None, :] < headdim)
    in_dtype = x_ptr.dtype.element_ty
    scal_base = (b * nheads + h) * seqlen
    st_tile = offs_n[:, None] * stride_st_n + offs_p[None, :] * stride_st_p
    fin_tile = offs_p[None, :] * stride_fin_p + offs_n[:, None] * stride_fin_n
    init_tile = offs_p[None, :] * stride_init_p + offs_n[:, None] * stride_init_n + h * stride_init_h

    # The state (n, p) in fp32, held in registers across chunks.
    if HAS_INIT:
        if VARLEN:
            first_seq = tl.load(seq_idx_ptr)
            state = tl.load(init_ptr + first_seq * stride_init_b + init_tile, mask=mask_pn, other=0.0).to(tl.float32)
        else:
            state = tl.load(init_ptr + b * stride_init_b + init_tile, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)

    # Blocks of BLOCK_T rows, SUBS per chunk (a K-split of the chunk's matmul).
    for it in range(nchunks * SUBS):
        c = it // SUBS
        j = it % SUBS
        chunk_start = c * CHUNK
        blk_start = chunk_start + j * BLOCK_T
        t = blk_start + offs_t
        valid = (j * BLOCK_T + offs_t < CHUNK) & (t < seqlen)
        # The state entering the chunk (for the sequence of its first token).
        tl.store(chunk_states_ptr + b * stride_st_b + c * stride_st_c + h * stride_st_h + st_tile,
                 state.to(chunk_states_ptr.dtype.element_ty), mask=tl.where(j == 0, mask_pn, False))
        x_blk = tl.load(x_ptr + b * stride_x_b + t[:, None] * stride_x_l + h * stride_x_h
                        + offs_p[None, :] * stride_x_p,
                        mask=valid[:, None] & (offs_p[None, :] < headdim), other=0.0)
        B_blk = tl.load(B_ptr + b * stride_B_b + t[:, None] * stride_B_l + g_B * stride_B_g
                        + offs_n[None, :] * stride_B_n,
                        mask=valid[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
        if not VARLEN:
            w = tl.load(weight_ptr + scal_base + t, mask=valid, other=0.0)
            xw = (x_blk.to(tl.float32) * w[:, None]).to(in_dtype)
            part = _mma(tl.trans(B_blk), xw, DOT_PRECISION, DOT_UPCAST)
            decay_c = tl.load(decay_ptr + (b * nheads + h) * nchunks + c)
            if SUBS == 1:
                state = state * decay_c + part
            else:
                acc = tl.where(j == 0, part, acc + part)
                state = tl.where(j == SUBS - 1, state * decay_c + acc, state)
        else:
            cum = tl.load(cum_ptr + scal_base + t, mask=valid, other=0.0)
            coef_eff = tl.load(coef_ptr + scal_base + t, mask=valid, other=0.0)
            if HAS_PREV:
                coef_eff += tl.load(prev_coef_ptr + scal_base + t, mask=valid, other=0.0)
            blk_end = tl.minimum(blk_start + BLOCK_T, chunk_start + CHUNK)
            last_t = tl.minimum(blk_end, seqlen) - 1
            # cum (chunk-relative) just before the block; 0 at a chunk start.
            base_blk = tl.load(cum_ptr + scal_base + blk_start - 1, mask=(j > 0) & (blk_start < seqlen), other=0.0)
            seq_first = tl.load(seq_idx_ptr + tl.minimum(blk_start, seqlen - 1))
            seq_last = tl.load(seq_idx_ptr + last_t)
            carried = state
            # Every sequence that overlaps this block: its state at min(its end, block end).
            for s in range(seq_first, seq_last + 1):
                t0 = tl.load(cu_seqlens_ptr + s).to(tl.int32)
                t1 = tl.load(cu_seqlens_ptr + s + 1).to(tl.int32)
                e = tl.minimum(t1, last_t + 1) - 1
                in_s = valid & (t >= t0) & (t <= e)
                cum_e = tl.sum(tl.where(t == e, cum, 0.0), axis=0)
                base = tl.load(cum_ptr + scal_base + t0 - 1, mask=t0 > blk_start, other=0.0)
                base = tl.where(t0 > blk_start, base, base_blk)
                w = tl.where(in_s, tl.exp2(cum_e - cum) * coef_eff, 0.0)
                xw = (x_blk.to(tl.float32) * w[:, None]).to(in_dtype)
                local = _mma(tl.trans(B_blk), xw, DOT_PRECISION, DOT_UPCAST)
                if HAS_INIT:
                    fresh = tl.load(init_ptr + s * stride_init_b + init_tile,
                                    mask=tl.where(s != seq_first, mask_pn, False), other=0.0).to(tl.float32)
                else:
                    fresh = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
                start_state = tl.where(s == seq_first, state, fresh)
                state_s = start_state * tl.exp2(cum_e - base) + local
                if STORE_FINAL:
                    tl.store(final_ptr + s * stride_fin_b + h * stride_fin_h + fin_tile, state_s,
                             mask=tl.where((t1 - 1 <= last_t) & (t0 <= last_t), mask_pn, False))
                carried = tl.where(s == seq_last, state_s, carried)
            seq_next = tl.load(seq_idx_ptr + blk_end, mask=blk_end < seqlen, other=0)
            seq_next = tl.where(blk_end < seqlen, seq_next, seq_last)
            if HAS_INIT:
                fresh = tl.load(init_ptr + seq_next * stride_init_b + init_tile,
                                mask=tl.where(seq_next != seq_last, mask_pn, False), other=0.0).to(tl.float32)
            else:
                fresh = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
            state = tl.where(seq_next == seq_last, carried, fresh)

    if STORE_FINAL:
        if not VARLEN:
            tl.store(final_ptr + b * stride_fin_b + h * stride_fin_h + fin_tile, state, mask=mask_pn)
'''

# The output kernel is assembled by ``chunked_source.render_output`` from the pieces below:
# shared pieces once per program, per-head pieces once per head of the program with ``{j}`` the
# head's name suffix ("" for one head, "_0", "_1", ... otherwise) and ``{h}`` its head index.
OUTPUT_SIGNATURE = '''
@triton.jit
def {name}_chunk_output(
    x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, cb_ptr, seq_idx_ptr, cu_seqlens_ptr, init_ptr,
    chunk_states_ptr, cum_ptr, coef_ptr, prev_coef_ptr, y_ptr,
    seqlen, nheads, headdim, dstate, nchunks, heads_per_group_B, heads_per_group_C, heads_per_cb,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_z_b, stride_z_l, stride_z_h, stride_z_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    stride_init_b, stride_init_h, stride_init_p, stride_init_n,
    stride_st_b, stride_st_c, stride_st_h, stride_st_n, stride_st_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, CB_PRECOMPUTED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
'''

OUT_SETUP = '''
pid_mp = tl.program_id(0)
pid_h = tl.program_id(1)
pid_bc = tl.program_id(2)
n_pblocks = tl.cdiv(headdim, BLOCK_P)
n_mblocks = tl.cdiv(CHUNK, BLOCK_M)
# Row blocks near the end of a chunk have the most work: launch them first.
rb = n_mblocks - 1 - pid_mp // n_pblocks
pid_p = pid_mp % n_pblocks
b = pid_bc // nchunks
c = pid_bc % nchunks
chunk_start = c * CHUNK
if chunk_start + rb * BLOCK_M >= seqlen:
    return
{heads}
g_B = {h_first} // heads_per_group_B
g_C = {h_first} // heads_per_group_C
in_dtype = x_ptr.dtype.element_ty
offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
t_m = chunk_start + offs_m
mask_m = (offs_m < CHUNK) & (t_m < seqlen)
offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
offs_n = tl.arange(0, BLOCK_N)
mask_mp = mask_m[:, None] & (offs_p[None, :] < headdim)
mask_np = (offs_n[:, None] < dstate) & (offs_p[None, :] < headdim)
cb_base = cb_ptr + b * stride_cb_b + c * stride_cb_c + ({h_first} // heads_per_cb) * stride_cb_g
if VARLEN:
    seq_m = tl.load(seq_idx_ptr + t_m, mask=mask_m, other=-1)
    seq_first = tl.load(seq_idx_ptr + chunk_start)
'''

OUT_C_ROWS = '''
C_m = tl.load(C_ptr + b * stride_C_b + t_m[:, None] * stride_C_l + g_C * stride_C_g
              + offs_n[None, :] * stride_C_n,
              mask=mask_m[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
'''

OUT_HEAD_ZERO = '''
acc{j} = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
'''

OUT_HEAD_ROWS = '''
scal_base{j} = (b * nheads + {h}) * seqlen
cum_m{j} = tl.load(cum_ptr + scal_base{j} + t_m, mask=mask_m, other=0.0)
'''

# The state entering the chunk, decayed to each row: exp(cum_t) C_t S_in. ``{assign}`` is "="
# when this starts the accumulator, "+=" when the columns before the row block came first.
OUT_HEAD_STATE_IN = '''
S_in{j} = tl.load(
    chunk_states_ptr + b * stride_st_b + c * stride_st_c + {h} * stride_st_h
    + offs_n[:, None] * stride_st_n + offs_p[None, :] * stride_st_p,
    mask=mask_np, other=0.0).to(in_dtype)
carry_scale{j} = tl.exp2(cum_m{j})
if VARLEN:
    carry_scale{j} = tl.where(seq_m == seq_first, carry_scale{j}, 0.0)
acc{j} {assign} _mma(C_m, S_in{j}, DOT_PRECISION, DOT_UPCAST) * carry_scale{j}[:, None]
'''

OUT_INIT_LOOP = '''
if VARLEN:
    if HAS_INIT:
        # Sequences that begin inside this chunk start from their own initial state.
        seq_hi = tl.max(tl.where(mask_m, seq_m, seq_first), axis=0)
        for s in range(seq_first + 1, seq_hi + 1):
            t0 = tl.load(cu_seqlens_ptr + s).to(tl.int32)
{per_head}
'''

OUT_HEAD_INIT = '''
base{j} = tl.load(cum_ptr + scal_base{j} + t0 - 1)
init{j} = tl.load(
    init_ptr + s * stride_init_b + {h} * stride_init_h
    + offs_n[:, None] * stride_init_n + offs_p[None, :] * stride_init_p,
    mask=mask_np, other=0.0).to(in_dtype)
decay_s{j} = tl.where(seq_m == s, tl.exp2(cum_m{j} - base{j}), 0.0)
acc{j} += _mma(C_m, init{j}, DOT_PRECISION, DOT_UPCAST) * decay_s{j}[:, None]
'''

# One column block: the C B^T tile (stored once per group, or computed here from B) and the
# columns' positions; shared by the heads of the program.
OUT_COLUMNS = '''
offs_k = k0 + tl.arange(0, BLOCK_K)
t_k = chunk_start + offs_k
mask_k = (offs_k < CHUNK) & (t_k < seqlen)
if CB_PRECOMPUTED:
    cb = tl.load(cb_base + offs_m[:, None] * stride_cb_i + offs_k[None, :],
                 mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
else:
    B_k = tl.load(B_ptr + b * stride_B_b + t_k[:, None] * stride_B_l + g_B * stride_B_g
                  + offs_n[None, :] * stride_B_n,
                  mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0).to(in_dtype)
    cb = _mma(C_m, tl.trans(B_k), DOT_PRECISION, DOT_UPCAST)
'''

OUT_HEAD_COLUMN_INPUTS = '''
x_k{j} = tl.load(
    x_ptr + b * stride_x_b + t_k[:, None] * stride_x_l + {h} * stride_x_h
    + offs_p[None, :] * stride_x_p,
    mask=mask_k[:, None] & (offs_p[None, :] < headdim), other=0.0)
cum_k{j} = tl.load(cum_ptr + scal_base{j} + t_k, mask=mask_k, other=0.0)
coef_k{j} = tl.load(coef_ptr + scal_base{j} + t_k, mask=mask_k, other=0.0)
'''

OUT_HEAD_PREV = '''
prev_k{j} = tl.load(prev_coef_ptr + scal_base{j} + t_k, mask=mask_k, other=0.0)
'''

# Trapezoidal: B_u x_u enters again, with prev_k, at step u + 1 <= t.
OUT_HEAD_PREV_TILE = '''
prev_tile{j} = tl.where(offs_k[None, :] < offs_m[:, None], prev_k{j}[None, :], 0.0)
'''

OUT_DIAGONAL_MASK = '''
# The decay tile exp2(cum_t - cum_u), masked in the exponent so that exp2 never sees the
# (positive) upper triangle.
keep = (offs_k[None, :] <= offs_m[:, None]) & mask_k[None, :] & mask_m[:, None]
if VARLEN:
    seq_k = tl.load(seq_idx_ptr + t_k, mask=mask_k, other=-2)
    keep = keep & (seq_k[None, :] == seq_m[:, None])
'''

# ``{coef}``: the input coefficient of column u seen from row t (a row of the tile).
OUT_HEAD_DIAGONAL = '''
decay{j} = tl.exp2(tl.where(keep, cum_m{j}[:, None] - cum_k{j}[None, :], float("-inf")))
decay{j} = decay{j} * {coef}
acc{j} += _mma((cb * decay{j}).to(in_dtype), x_k{j}.to(in_dtype), DOT_PRECISION, DOT_UPCAST)
'''

# Columns left of the row block's diagonal block (``out_factor_decay``): every such column u
# precedes every row t of the block, so the decay factors through c0, the step just before it.
# Both factors lie between the whole decay and 1 while log(Abar) keeps one sign, so neither
# overflows where the product does not.
OUT_OFFDIAG_SETUP = '''
# Columns before this row block, c0 the step just before it: the decay factors as
# exp2(cum_t - cum_u) = exp2(cum_t - cum_c0) * exp2(cum_c0 - cum_u), so the columns are weighted
# here (BLOCK_K exps per head, not BLOCK_M x BLOCK_K) and the rows scaled once after the loop.
# Varlen: only the rows of c0's sequence have such columns, and only its columns count.
c0_t = chunk_start + rb * BLOCK_M - 1
if VARLEN:
    seq_c0 = tl.load(seq_idx_ptr + c0_t, mask=rb > 0, other=-1)
'''

OUT_HEAD_OFFDIAG_SETUP = '''
cum_c0{j} = tl.load(cum_ptr + scal_base{j} + c0_t, mask=rb > 0, other=0.0)
acc{j} = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
'''

OUT_OFFDIAG_MASK = '''
col_ok = mask_k
if VARLEN:
    seq_k = tl.load(seq_idx_ptr + t_k, mask=mask_k, other=-2)
    col_ok = col_ok & (seq_k == seq_c0)
'''

# ``{coef}``: the input coefficient of column u (every row is later than u here).
OUT_HEAD_OFFDIAG = '''
w{j} = tl.where(col_ok, tl.exp2(cum_c0{j} - cum_k{j}) * {coef}, 0.0)
cb_w{j} = (cb * w{j}[None, :]).to(in_dtype)
acc{j} += _mma(cb_w{j}, x_k{j}.to(in_dtype), DOT_PRECISION, DOT_UPCAST)
'''

OUT_HEAD_OFFDIAG_ROWS = '''
row_scale{j} = tl.where(mask_m & (rb > 0), tl.exp2(cum_m{j} - cum_c0{j}), 0.0)
if VARLEN:
    row_scale{j} = tl.where(seq_m == seq_c0, row_scale{j}, 0.0)
acc{j} = acc{j} * row_scale{j}[:, None]
'''

OUT_HEAD_STORE = '''
tl.store(y_ptr + b * stride_y_b + t_m[:, None] * stride_y_l + {h} * stride_y_h
         + offs_p[None, :] * stride_y_p, acc{j}.to(y_ptr.dtype.element_ty),
         mask={mask})
'''
