"""Render the chunked SSD (Mamba-2) Triton source for one plan.

The generated module holds four kernels (``chunked_kernels``: prep, C B^T, states, output) and
a launcher. The plan's math enters here: log(Abar) and Bbar (and Bbar_prev / Abar for the
trapezoidal previous-input term) are printed from ``plan.disc`` into the prep kernel, as is the
Delta map (bias, softplus, clamp). Only what the plan has is emitted (no z code for a family
without a gate, no D code without a skip); problem-level options (varlen, initial/final states,
whether D/z/dt_bias were passed) are constexpr flags of the kernels.
"""
from __future__ import annotations

import textwrap
from typing import Dict

from ssmc.ir import KernelPlan, Sharing

from . import chunked_backward, chunked_kernels, codegen

SUPPORTED_FLOAT_NAMES = ("float32", "float16", "bfloat16")


def _print(expr, names: Dict[str, str]) -> str:
    # The scan kernels' printer: expm1 through the module helper _expm1 (Kahan's method from
    # tl.exp and tl.log), since zoh's Bbar = (exp(a dt) - 1)/a printed literally loses every
    # digit as a dt -> 0 in fp32; softplus through _softplus.
    return codegen.print_one(expr, names, share_exp=False)


def _print_step_math(plan: KernelPlan, delta: str, a: str) -> Dict[str, str]:
    """log(Abar), Bbar (and Bbar_prev / Abar) as the pass derived them (``plan.disc``)."""
    names = {"dt": delta, "a": a}
    out = {"log_decay": _print(plan.disc.log_decay, names), "coef": _print(plan.disc.bbar, names)}
    if plan.disc.prev_input is not None:
        out["prev_coef"] = _print(plan.disc.prev_input, names)
    return out


def _indent(code: str, n: int) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), " " * n)


def _delta_code(plan: KernelPlan, out: str, a_out: str, mask: str, t: str, n: int) -> str:
    """Load dt (and a selective A) at positions ``t`` and turn it into Delta and the decay."""
    fam = plan.family
    lines = [f"{out} = tl.load(dt_ptr + b * stride_dt_b + {t} * stride_dt_l + h * stride_dt_h, "
             f"mask={mask}, other=0.0).to(tl.float32)"]
    with_bias = codegen.delta_expr(plan, out, "dt_bias_h")
    without = codegen.delta_expr(plan, out, None)
    if with_bias != without:
        # The bias may be None at call time: the map without its term then (no add of 0).
        lines.append(f"if HAS_DT_BIAS:\n    {out} = {with_bias}\nelse:\n    {out} = {without}")
    elif without != out:
        lines.append(f"{out} = {without}")
    if fam.A.selective:
        lines.append(f"{a_out} = tl.load(A_ptr + b * stride_A_b + {t} * stride_A_l + h * stride_A_h, "
                     f"mask={mask}, other=-1.0).to(tl.float32)")
    return _indent("\n".join(lines), n)


def render(plan: KernelPlan, name: str, header: str, config: Dict[str, int]) -> str:
    """The generated module's source text."""
    fam = plan.family
    trap = plan.disc.prev_input is not None
    a_name = "a_t" if fam.A.selective else "a_h"
    math = _print_step_math(plan, "delta", a_name)
    prologue = []
    if fam.delta.bias:
        prologue.append("if HAS_DT_BIAS:\n    dt_bias_h = tl.load(dt_bias_ptr + h).to(tl.float32)")
    if not fam.A.selective:
        prologue.append("a_h = tl.load(A_ptr + h * stride_A_h).to(tl.float32)")
    step_now = _delta_code(plan, "delta", "a_t", "valid", "t", 4)
    if trap:
        math_next = _print_step_math(plan, "delta_next", "a_next" if fam.A.selective else "a_h")
        step_next = _delta_code(plan, "delta_next", "a_next", "valid_next", "(t + 1)", 4)
        prev_coef_code = _indent("""
            valid_next = valid & (t + 1 < seqlen)
            if ROW_LENGTHS:
                valid_next = valid_next & (t + 1 < tl.load(row_len_ptr + b))
            if VARLEN:
                seq_next_t = tl.load(seq_idx_ptr + t + 1, mask=valid_next, other=-1)
                valid_next = valid_next & (seq_next_t == seq_t)
        """, 4) + "\n" + step_next + "\n" + _indent(f"""
            # Weight of B_t x_t in the next step's previous-input term, seen from step t.
            prev_coef = tl.where(valid_next, {math_next['prev_coef']}, 0.0)
            coef_eff = coef + prev_coef
        """, 4)
        store_prev = _indent("tl.store(prev_coef_ptr + scal, prev_coef, mask=stored)", 4)
    else:
        prev_coef_code = _indent("coef_eff = coef", 4)
        store_prev = ""
    prep = chunked_kernels.PREP.format(
        name=name, prologue=_indent("\n".join(prologue), 4), step_now=step_now,
        log_decay=math["log_decay"], coef=math["coef"], prev_coef_code=prev_coef_code,
        store_prev=store_prev)

    output = render_output(plan, name, config, trap)
    body = (prep + chunked_kernels.CB.format(name=name) + chunked_kernels.STATES.format(name=name)
            + output)
    source = header + _PRELUDE + codegen.HELPERS + body + _render_launcher(plan, name, trap, config)
    if chunked_backward.supports_backward(plan) is None:
        source += chunked_backward.render_backward(plan, name, _indent)
    return source


def _program_heads(count: int):
    """(name suffix, head variable) of each head an output program computes."""
    if count == 1:
        return [("", "h")]
    return [(f"_{i}", f"h_{i}") for i in range(count)]


def _each(template: str, heads, n: int, **per_head: str) -> str:
    """``template`` once per head, indented by ``n``; ``per_head`` values may name {j} and {h}."""
    out = []
    for j, h in heads:
        extra = {k: v.format(j=j, h=h) for k, v in per_head.items()}
        out.append(_indent(template.format(j=j, h=h, **extra), n))
    return "\n".join(out)


def heads_per_bc_group(plan: KernelPlan) -> int:
    """Heads that share one B and one C (1 when either is per head)."""
    fam = plan.family
    if fam.B.sharing is not Sharing.GROUP or fam.C.sharing is not Sharing.GROUP:
        return 1
    return fam.dims.heads // max(1, fam.dims.groups)


def render_output(plan: KernelPlan, name: str, config: Dict[str, int], trap: bool) -> str:
    """The output kernel: ``out_heads`` heads per program, unrolled in the generated text.

    The heads of one program share the C rows and each C B^T tile (loaded, or computed from B,
    once); each has its own decays, x, incoming state and accumulator. ``out_early_xz`` issues
    the epilogue's x (for D) and z loads before the column loop; ``out_factor_decay`` splits off
    the column blocks left of the diagonal block, whose decay is a rank-1 product;
    ``out_state_last`` adds the incoming state's term after the column loops, so that its
    shared-memory operands (C rows, S_in) and the loop's buffers are not live at once.
    """
    fam = plan.family
    k = chunked_kernels
    count = int(config.get("out_heads", 1))
    early = bool(config.get("out_early_xz", 0))
    factor = bool(config.get("out_factor_decay", 0))
    state_last = bool(config.get("out_state_last", 0))
    # With C B^T stored, the C rows only serve the incoming state's term: load them there.
    c_rows_late = bool(config.get("out_cb", 1)) and heads_per_bc_group(plan) > 1
    heads = _program_heads(count)
    if count == 1:
        head_code = "h = pid_h"
    else:
        head_code = "\n".join(
            [f"# {count} heads per program share C's rows and the C B^T tiles (the config",
             "# check keeps them inside one group of B and C); a head past the last repeats",
             "# the last one and is not stored.", f"h_0 = pid_h * {count}"]
            + [f"h_{i} = tl.minimum(h_0 + {i}, nheads - 1)" for i in range(1, count)])
    parts = [_indent(k.OUT_SETUP.format(heads=head_code, h_first=heads[0][1]), 4)]
    if not c_rows_late:
        parts.append(_indent(k.OUT_C_ROWS, 4))
    parts.append(_each(k.OUT_HEAD_ROWS, heads, 4))

    x_load = ("x_m{j} = tl.load(\n"
              "    x_ptr + b * stride_x_b + t_m[:, None] * stride_x_l + {h} * stride_x_h\n"
              "    + offs_p[None, :] * stride_x_p, mask=mask_mp, other=0.0)\n")
    d_off = ("{h} * stride_D_h + offs_p * stride_D_p" if fam.D is not None
             and fam.D.sharing is Sharing.HEAD_DIM else "{h} * stride_D_h + offs_p * 0")
    d_load = x_load + ("D_v{j} = tl.load(\n    D_ptr + " + d_off
                       + ", mask=offs_p < headdim, other=0.0).to(tl.float32)\n")
    d_apply = "acc{j} += x_m{j}.to(tl.float32) * D_v{j}[None, :]\n"
    z_load = ("z_m{j} = tl.load(\n"
              "    z_ptr + b * stride_z_b + t_m[:, None] * stride_z_l + {h} * stride_z_h\n"
              "    + offs_p[None, :] * stride_z_p, mask=mask_mp, other=0.0)\n")
    z_apply = ("gate{j} = z_m{j}.to(tl.float32)\n"
               "acc{j} = acc{j} * gate{j} * tl.sigmoid(gate{j})\n")

    def flagged(flag: str, template: str) -> str:
        return _indent(f"if {flag}:", 4) + "\n" + _each(template, heads, 8)

    if early:
        parts.append(_indent("# The epilogue's loads, issued before the column loop.", 4))
        if fam.D is not None:
            parts.append(flagged("HAS_D", d_load))
        if fam.gate is not None:
            parts.append(flagged("HAS_Z", z_load))

    coef_diag = "coef_k{j}[None, :]"
    coef_off = "coef_k{j}"
    head_inputs = k.OUT_HEAD_COLUMN_INPUTS.strip("\n")
    diagonal = k.OUT_HEAD_DIAGONAL.strip("\n")
    if trap:
        head_inputs += "\n" + k.OUT_HEAD_PREV.strip("\n")
        diagonal = k.OUT_HEAD_PREV_TILE.strip("\n") + "\n" + diagonal
        coef_diag = "(coef_k{j}[None, :] + prev_tile{j})"
        coef_off = "(coef_k{j} + prev_k{j})"

    def column_loop(bounds: str, mask: str, head_body: str, coef: str) -> str:
        body = [_indent(k.OUT_COLUMNS, 8), _indent(mask, 8),
                _each(head_inputs + "\n" + head_body.strip("\n"), heads, 8, coef=coef)]
        return _indent(f"for k0 in range({bounds}):", 4) + "\n" + "\n".join(body)

    starts_acc = not factor and not state_last
    state_in = [_indent("# The state entering the chunk, decayed to each row: "
                        "exp(cum_t) C_t S_in.", 4)]
    if c_rows_late:
        state_in.append(_indent(k.OUT_C_ROWS, 4))
    state_in += [_each(k.OUT_HEAD_STATE_IN, heads, 4, assign="=" if starts_acc else "+="),
                 _indent(k.OUT_INIT_LOOP.format(per_head=_each(k.OUT_HEAD_INIT, heads, 12)), 4)]
    if factor:
        parts += [_indent(k.OUT_OFFDIAG_SETUP, 4), _each(k.OUT_HEAD_OFFDIAG_SETUP, heads, 4),
                  column_loop("0, rb * BLOCK_M, BLOCK_K", k.OUT_OFFDIAG_MASK, k.OUT_HEAD_OFFDIAG,
                              coef_off),
                  _each(k.OUT_HEAD_OFFDIAG_ROWS, heads, 4)]
    elif state_last:
        parts.append(_each(k.OUT_HEAD_ZERO, heads, 4))
    if not state_last:
        parts += state_in
    if early and fam.D is not None:
        parts.append(flagged("HAS_D", d_apply))
    if factor:
        parts.append(_indent("# The diagonal block: ((C B^T) o L) X, the decay elementwise.", 4))
        parts.append(column_loop("rb * BLOCK_M, (rb + 1) * BLOCK_M, BLOCK_K", k.OUT_DIAGONAL_MASK,
                                 diagonal, coef_diag))
    else:
        parts.append(_indent("# Inside the chunk: ((C B^T) o L) X over the column blocks up to the "
                             "diagonal.", 4))
        parts.append(column_loop("0, (rb + 1) * BLOCK_M, BLOCK_K", k.OUT_DIAGONAL_MASK,
                                 diagonal, coef_diag))
    if state_last:
        parts += state_in

    parts.append("")
    if fam.D is not None and not early:
        parts.append(flagged("HAS_D", d_load + d_apply))
    if fam.gate is not None:
        parts.append(flagged("HAS_Z", z_apply if early else z_load + z_apply))
    store_masks = ["mask_mp"] + [f"tl.where(h_0 + {i} < nheads, mask_mp, False)"
                                 for i in range(1, count)]
    parts += [_indent(k.OUT_HEAD_STORE.format(j=j, h=h, mask=m), 4)
              for (j, h), m in zip(heads, store_masks)]
    return k.OUTPUT_SIGNATURE.format(name=name) + "\n".join(parts) + "\n"


_PRELUDE = '''
import types

import torch
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST only under TRITON_INTERPRET: its dot multiplies bf16 bit patterns as integers.
    # Operands are already rounded to bf16, so fp32 products reproduce the tensor-core result.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out
'''


def _render_launcher(plan: KernelPlan, name: str, trap: bool, config: Dict[str, int]) -> str:
    fam = plan.family
    opt_d = "problem.D" if fam.D is not None else "None"
    opt_z = "problem.z" if fam.gate is not None else "None"
    opt_bias = "problem.dt_bias" if fam.delta.bias else "None"
    clamp_default = repr(tuple(float(v) for v in fam.delta.clamp)) if fam.delta.clamp else "None"
    clamp_default = clamp_default.replace("inf", 'float("inf")')
    return LAUNCHER.format(name=name, chunk=plan.chunk_size, opt_d=opt_d, opt_z=opt_z,
                           opt_bias=opt_bias, clamp_default=clamp_default, trap=trap,
                           out_heads=int(config.get("out_heads", 1)),
                           out_maxnreg=(f' maxnreg={int(config["out_maxnreg"])},'
                                        if config.get("out_maxnreg") else ""))


LAUNCHER = '''

def _as_blgn(t, batch, seqlen):
    """B/C as (b, l, groups, n): constant (groups, n) ones broadcast with stride 0."""
    if t.dim() == 2:
        return t[None, None].expand(batch, seqlen, t.shape[0], t.shape[1])
    return t


def _cu_seqlens(cu, seq_idx, init, dev):
    """The packed sequences' boundaries, given as cu_seqlens or as seq_idx (then as many
    sequences as initial states, else up to the last index)."""
    if cu is None:
        seq_idx = seq_idx.reshape(-1)
        nseq = init.shape[0] if init is not None else int(seq_idx[-1].item()) + 1
        cu = torch.zeros(nseq + 1, dtype=torch.int64, device=dev)
        cu[1:] = torch.cumsum(torch.bincount(seq_idx.long(), minlength=nseq), 0)
    return cu


def launch(problem, config, y=None, final_states=None, keep=None, output=True, gate=True,
           row_lengths=None):
    """Run the kernels on a bound SSD problem; returns (y, final_states or None).

    The backward recomputes with ``keep`` (a dict: receives the per-step scalars, C B^T and the
    chunk states), ``output=False`` (no y: only what the backward reads) or ``gate=False`` (y
    before silu(z), for dz); ``row_lengths`` (int32 per batch row) treats the steps past each
    row's length as Abar = 1, Bbar = 0 (the backward of packed sequences pads them to rows)."""
    x = problem.x
    batch, seqlen, nheads, headdim = x.shape
    chunk = {chunk}
    nchunks = triton.cdiv(seqlen, chunk)
    dev = x.device
    B = _as_blgn(problem.B, batch, seqlen)
    C = _as_blgn(problem.C, batch, seqlen)
    dstate = B.shape[-1]
    dt = problem.dt if problem.dt.dim() == 3 else problem.dt[None, None].expand(batch, seqlen, nheads)
    A = problem.A if problem.A.dim() == 3 else problem.A[None, None].expand(batch, seqlen, nheads)
    D = {opt_d}
    z = {opt_z} if gate else None
    dt_bias = {opt_bias}
    init = problem.initial_states
    varlen = problem.cu_seqlens is not None or problem.seq_idx is not None
    cu, seq_idx = problem.cu_seqlens, problem.seq_idx
    if varlen:
        seq_idx = seq_idx.reshape(-1).contiguous()
        cu = _cu_seqlens(cu, seq_idx, init, dev).contiguous()
        nseq = cu.numel() - 1
    else:
        nseq = batch
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    store_final = bool(problem.wants_final_state)
    if y is None and output:
        y = torch.empty_like(x)
    if store_final and final_states is None:
        final_states = torch.empty(nseq, nheads, headdim, dstate, dtype=torch.float32, device=dev)
    cfg = config
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # Under TRITON_INTERPRET, bf16 dots are computed on fp32 copies (see _mma).
    upcast = x.dtype == torch.bfloat16 and type({name}_chunk_prep).__name__ == "InterpretedFunction"
    seqp, cup = (seq_idx, cu) if varlen else (dummy, dummy)
    initp = init if init is not None else dummy
    init_strides = init.stride() if init is not None else (0, 0, 0, 0)
    fin = final_states if store_final else dummy
    fin_strides = final_states.stride() if store_final else (0, 0, 0, 0)

    # 1. Per-step scalars: cumulative log2-decay, input coefficient, weight to the chunk end.
    cum = torch.empty(batch, nheads, seqlen, dtype=torch.float32, device=dev)
    coef, weight = torch.empty_like(cum), torch.empty_like(cum)
    prev_coef = torch.empty_like(cum) if {trap} else dummy
    decay = torch.empty(batch, nheads, nchunks, dtype=torch.float32, device=dev)
    block_q = max(16, triton.next_power_of_2(chunk))
    {name}_chunk_prep[(nchunks, batch * nheads)](
        dt, A, dt_bias if dt_bias is not None else dummy, seqp,
        row_lengths if row_lengths is not None else dummy, cum, coef, prev_coef, weight, decay,
        seqlen, nheads, nchunks, *dt.stride(), *A.stride(),
        CHUNK=chunk, BLOCK_Q=block_q, HAS_DT_BIAS=dt_bias is not None, VARLEN=varlen,
        ROW_LENGTHS=row_lengths is not None,
        num_warps=4 if block_q <= 256 else 8,
    )

    # 2. C B^T per chunk and group of heads sharing B and C (skipped when every head has its own).
    bm, bk, bp2 = cfg["out_block_m"], cfg["out_block_k"], cfg["out_block_p"]
    block_n = max(16, triton.next_power_of_2(dstate))
    hp_B, hp_C = nheads // B.shape[2], nheads // C.shape[2]
    heads_per_cb = hp_B if hp_B == hp_C else 1
    cb_pre = bool(cfg["out_cb"]) and heads_per_cb > 1
    if cb_pre:
        n_cb = nheads // heads_per_cb
        cb_dtype = torch.float32 if (x.dtype == torch.float32 or cfg["out_cb_fp32"]) else x.dtype
        cb = torch.empty(batch, nchunks, n_cb, chunk, chunk, dtype=cb_dtype, device=dev)
        cb_grid = (triton.cdiv(chunk, bm) * triton.cdiv(chunk, bk), batch * nchunks, n_cb)
        {name}_chunk_cb[cb_grid](
            B, C, cb, seqlen, nchunks, dstate, heads_per_cb, hp_B, hp_C,
            *B.stride(), *C.stride(), *cb.stride()[:4],
            CHUNK=chunk, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=block_n,
            DOT_PRECISION=precision, DOT_UPCAST=upcast, num_warps=4, num_stages=2,
        )
        cb_strides = cb.stride()[:4]
    else:
        cb, cb_strides = dummy, (0, 0, 0, 0)

    # 3. States entering each chunk (and the final states), walking the chunks in order.
    chunk_states = torch.empty(batch, nchunks, nheads, dstate, headdim, dtype=x.dtype, device=dev)
    bp, bn = cfg["state_block_p"], cfg["state_block_n"]
    bt = min(cfg["state_block_t"], block_q)
    subs = chunk // bt if chunk % bt == 0 else 1
    if subs == 1:
        bt = block_q
    {name}_chunk_states[(triton.cdiv(headdim, bp) * triton.cdiv(dstate, bn), batch * nheads)](
        x, B, initp, seqp, cup, cum, coef, prev_coef, weight, decay, chunk_states, fin,
        seqlen, nheads, headdim, dstate, nchunks, hp_B,
        *x.stride(), *B.stride(), *init_strides, *chunk_states.stride(), *fin_strides,
        CHUNK=chunk, BLOCK_T=bt, SUBS=subs, BLOCK_P=bp, BLOCK_N=bn, VARLEN=varlen,
        HAS_INIT=init is not None, HAS_PREV={trap}, STORE_FINAL=store_final,
        DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=cfg["state_warps"], num_stages=cfg["state_stages"],
    )

    if keep is not None:
        keep.update(cum=cum, coef=coef, prev_coef=prev_coef, decay=decay, chunk_states=chunk_states, cb=cb,
                    cb_strides=cb_strides, heads_per_cb=heads_per_cb, cb_pre=cb_pre, B=B, C=C,
                    dt=dt, A=A, nchunks=nchunks, precision=precision, upcast=upcast)
    if not output:
        return None, (final_states if store_final else None)

    # 4. Outputs, fully parallel over chunks, row blocks, heads ({out_heads} per program), head_dim.
    zp = z if z is not None else x
    Dp = D if D is not None else dummy
    D_strides = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    grid = (triton.cdiv(chunk, bm) * triton.cdiv(headdim, bp2), triton.cdiv(nheads, {out_heads}),
            batch * nchunks)
    {name}_chunk_output[grid](
        x, zp, B, C, Dp, cb, seqp, cup, initp, chunk_states, cum, coef, prev_coef, y,
        seqlen, nheads, headdim, dstate, nchunks, hp_B, hp_C, heads_per_cb,
        *x.stride(), *zp.stride(), *B.stride(), *C.stride(), *D_strides, *cb_strides,
        *init_strides, *chunk_states.stride(), *y.stride(),
        CHUNK=chunk, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=bp2, BLOCK_N=block_n, CB_PRECOMPUTED=cb_pre,
        HAS_D=D is not None, HAS_Z=z is not None, VARLEN=varlen, HAS_INIT=init is not None,
        DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=cfg["out_warps"], num_stages=cfg["out_stages"],{out_maxnreg}
    )
    if store_final and varlen:
        # Empty sequences have no token to write their state: it is their initial state.
        empty = (cu[1:] == cu[:-1]).view(-1, 1, 1, 1)
        start = init if init is not None else torch.zeros_like(final_states)
        final_states = torch.where(empty, start.to(torch.float32), final_states)
    return y, (final_states if store_final else None)


def forward(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            cu_seqlens=None, return_final_states=False, config=None):
    """Standalone entry (already validated tensors, the spec's softplus and dt_limit)."""
    problem = types.SimpleNamespace(
        x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens, wants_final_state=return_final_states,
        dt_limit={clamp_default})
    return launch(problem, config or CONFIG)
'''
