"""Configs and the host side of the generated selective-scan module (``scan.py`` generates
the kernels).

Configs: ``supports``, ``default_config``, ``candidates``, ``check_config`` (the backend
interface; ``scan`` re-exports them).

What a call runs is decided per call, from the problem's size and the device's SM count, all
with the one generated kernel: the one pass; its state-split variant (``SPLIT``) when there are
fewer programs than SMs (``few_channels_config``); or, when few channel blocks x sequences (b1
d4096: 32 programs) leave SMs idle and the rest latency-bound, a segmented scan over time
(``segmented_config``): pass 1 (``LOCAL``) each (channel block, time segment) runs from h = 0
and stores its end state and total decay; pass 2 (``_ssmc_scan_combine`` below) walks the
segments per state element to get each one's true initial state; pass 3 (``APPLY``) re-runs each
segment from it and writes y. The segment count is chosen per call from the SM count
(bench/NOTES_scan.md). ``launcher_source`` renders the combine kernel and ``forward``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ssmc.ir import AStructure, KernelPlan
from ssmc.operands import Role

from . import codegen

# When and how the launcher splits sequences into segments (decided per call: see the
# launcher's _n_segments). segments: 0 = decide by size, k = always k segments per sequence.
# Timed on the H100 at b1 d4096 l16384 (bench/NOTES_scan.md): 32 segments (8 programs per SM)
# with B/C tiles of 4 states carried across chunks in passes 1 and 3: 1.24 ms; 16 segments
# without: 1.50 ms; 64 segments: 1.53 ms (the combine's sequential walk grows). On the H200
# with the exact softplus (bench/gpu_scan.py --sweep, 2026-12-02, one run): 16 segments
# (4 programs per SM) 1.215 ms, 32: 1.268, 64: 1.371.
SEGMENT_DEFAULTS = {"segments": 0, "seg_below": 1.0, "seg_programs": 4, "seg_min_len": 256,
                    "seg_prefetch_bc": 4}


def supports(plan: KernelPlan) -> Optional[str]:
    st = plan.family.A.structure
    if st not in (AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        return (f"the Triton scan handles diagonal and complex-diagonal A, not {st.value} "
                "(scalar A: use the chunked algorithm; DPLR/dense: use conv)")
    if plan.family.dims.state > 256:
        return f"state size {plan.family.dims.state} > 256 is not unrolled by the Triton scan"
    return None


def _pow2(x) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def default_config(plan: KernelPlan) -> dict:
    f = plan.family
    n = f.dims.state
    cplx = f.A.structure is AStructure.COMPLEX_DIAGONAL
    sixteen_bit = any(t.value in ("fp16", "bf16") for t in f.dtypes.inputs)
    # 8 steps of a 16-bit input = one 16-byte load per lane; complex A (twice the state, and
    # sin/cos per element) gets 4 to keep registers and code size in bounds.
    chunk = 8 if sixteen_bit and not cplx else 4
    # Registers a lane keeps per state element (h, a, a*log2e; constant B, C; trapezoid's
    # previous B x), doubled for complex: keep ~96 of them per lane, split the rest over lanes.
    per_state = 3 + (not f.B.selective) + (not f.C.selective)
    per_state += 1 if any(not codegen.is_zero(e) for k, e in codegen.split_parts(plan).items()
                          if k.startswith("bbar_prev")) else 0
    per_state *= 2 if cplx else 1
    per_lane = 1 << max(1, (96 // per_state).bit_length() - 1)
    split = 1
    while n // split > per_lane and n % (2 * split) == 0:
        split *= 2
    # prefetch_bc: B/C tiles of 8 states carried across chunks (scan.py). Timed on the H100 at
    # b8 d4096 l2048 (kernel ms): 0 -> 0.731, 1 -> 0.757, 2 -> 0.750, 4 -> 0.730, 8 -> 0.696.
    return {"block_d": max(1, 128 // split), "split": split, "chunk": chunk, "num_warps": 4,
            "prefetch": True, "prefetch_bc": 8,
            "few_split": min(n, max(4, 2 * split)), **SEGMENT_DEFAULTS}


def candidates(plan: KernelPlan) -> List[dict]:
    base = default_config(plan)
    n = plan.family.dims.state
    out = [base]
    for split in (1, 2, 4, 8):
        if n % split or n // split > 64 or n // split < 2:
            continue
        for lanes, warps in ((64, 2), (128, 4), (256, 8)):
            for chunk in (4, 8, 16):
                cfg = dict(base, block_d=lanes // split, split=split, chunk=chunk,
                           num_warps=warps)
                if cfg != base:
                    out.append(cfg)
    f = plan.family
    if f.A.structure is AStructure.DIAGONAL and (f.B.selective or f.C.selective):
        out += [dict(base, prefetch_bc=p) for p in (0, 4)]  # B/C carried across chunks
    return out


def check_config(plan: KernelPlan, config: dict):
    n = plan.family.dims.state
    bd, split, chunk = config["block_d"], config["split"], config["chunk"]
    if not (_pow2(bd) and _pow2(split) and _pow2(chunk)):
        raise ValueError(f"scan config needs powers of two: {config}")
    if n % split:
        raise ValueError(f"split {split} does not divide the state size {n}")
    for key in ("prefetch_bc",):
        value = config.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"scan config {key} must be an int >= 0: {config}")


def optional_inputs(plan: KernelPlan) -> List[Tuple[str, str]]:
    """(pointer, constexpr saying whether the call passed it) of each term the operand table
    says the family has and a kernel may run without, in the table's order."""
    return [(f"{key}_ptr", f"HAS_{key.upper()}") for key in plan.operands.droppable_terms()]


def optional_term_lines(plan: KernelPlan, args: str, fallback: str,
                        token_fix: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Launcher lines appending each optional term the operand table says the family has to the
    list ``args`` (``fallback`` where the call omitted it), converted as its role says: a
    parameter to fp32 contiguous, a per-token input by ``token_fix`` (a format of its name);
    and (constexpr flag, argument name) of each, in the kernel's parameter order."""
    table = plan.operands
    lines, flags = [], []
    for (_, flag), key in zip(optional_inputs(plan), table.droppable_terms()):
        name = table.keyword.get(key, key)
        if table[name].role is Role.PARAMETER:
            lines.append(f"    {args}.append(_param({name}, False) if {name} is not None "
                         f"else {fallback})")
        else:
            lines += [f"    if {name} is not None:",
                      f"        {name} = {token_fix.format(name=name)}",
                      f"    {args}.append({name} if {name} is not None else {fallback})"]
        flags.append((flag, name))
    return lines, flags


def kernel_params(plan: KernelPlan, sel: Dict[str, bool]) -> List[str]:
    """The scan kernel's parameters (``forward`` below passes its arguments in this order)."""
    f = plan.family
    optional = optional_inputs(plan)
    # the convention's required inputs and parameters in its order, then the optional terms
    required = [f"{op.name}_ptr" for op in plan.operands.tensors()
                if op.role in (Role.INPUT, Role.PARAMETER) and not op.nullable]
    p = required + [ptr for ptr, _ in optional]
    p += ["h0_ptr", "out_ptr", "hT_ptr", "cu_ptr", "n_channels", "seqlen", "cpg_B", "cpg_C",
          "stride_u_b", "stride_u_d"]
    if sel["dt"]:
        p += ["stride_dt_b", "stride_dt_d"]
    if sel["A"]:
        p += ["stride_A_b", "stride_A_d", "stride_A_n", "stride_A_plane"]
    for w in ("B", "C"):
        if sel[w]:
            p += [f"stride_{w}_b", f"stride_{w}_g", f"stride_{w}_n", f"stride_{w}_plane"]
    if f.gate:
        p += ["stride_z_b", "stride_z_d"]
    # (nseq, n_segments, d, n) fp32 of the segmented scan: local end states / decays (pass 1),
    # then each segment's true initial state (after the combine); unused by the one pass
    p += ["stride_out_b", "stride_out_d", "seg_state_ptr", "seg_decay_ptr", "n_segments"]
    p += ["BLOCK_D: tl.constexpr", "SPLIT: tl.constexpr", "CHUNK: tl.constexpr",
          "PF_BC: tl.constexpr", "LOCAL: tl.constexpr", "APPLY: tl.constexpr",
          "HAS_H0: tl.constexpr", "WRITE_HT: tl.constexpr", "VARLEN: tl.constexpr"]
    return p + [f"{flag}: tl.constexpr" for _, flag in optional]


def few_channels_config(plan: KernelPlan, config: dict) -> Optional[dict]:
    """The state-split variant used when there are fewer programs than SMs, or None."""
    split = config.get("few_split", 4)
    n = plan.family.dims.state
    if split <= config["split"] or n % split or n // split < 2:
        return None
    lanes = config["block_d"] * config["split"]
    return {**config, "split": split, "block_d": max(1, lanes // split)}


def segmented_config(plan: KernelPlan, config: dict) -> dict:
    """The tile config of the segmented scan's passes 1 and 3 (``seg_*`` keys of ``config``)."""
    split = config.get("seg_split", config["split"])
    lanes = config["block_d"] * config["split"]
    return {**config, "split": split,
            "prefetch_bc": config.get("seg_prefetch_bc", config.get("prefetch_bc", 0)),
            "block_d": config.get("seg_block_d", max(1, lanes // split)),
            "num_warps": config.get("seg_num_warps", config["num_warps"])}


COMBINE = '''

@triton.jit
def _ssmc_scan_combine(seg_state_ptr, seg_decay_ptr, h0_ptr, n_elems, n_segments,
                       HAS_H0: tl.constexpr, CPLX: tl.constexpr, BLOCK: tl.constexpr):
    # Pass 2 of the segmented scan, per (sequence, state element): walk the segments in order;
    # segment s's true initial state is h, then h = decay_s h + local_s. The initial states
    # overwrite the local end states in place.
    seq = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n_elems
    W: tl.constexpr = 2 if CPLX else 1
    h = tl.zeros([BLOCK], dtype=tl.float32)
    h_im = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + (seq.to(tl.int64) * n_elems + idx) * W, mask=ok, other=0.0)
        if CPLX:
            h_im = tl.load(h0_ptr + (seq.to(tl.int64) * n_elems + idx) * W + 1, mask=ok,
                           other=0.0)
    for s in range(0, n_segments):
        off = ((seq * n_segments + s).to(tl.int64) * n_elems + idx) * W
        more = ok & (idx * 0 + s < n_segments - 1)  # pass 1 left the last segment's slots unwritten
        loc = tl.load(seg_state_ptr + off, mask=more, other=0.0)
        dec = tl.load(seg_decay_ptr + off, mask=more, other=0.0)
        tl.store(seg_state_ptr + off, h, mask=ok)
        if CPLX:
            loc_im = tl.load(seg_state_ptr + off + 1, mask=more, other=0.0)
            dec_im = tl.load(seg_decay_ptr + off + 1, mask=more, other=0.0)
            tl.store(seg_state_ptr + off + 1, h_im, mask=ok)
            h, h_im = dec * h - dec_im * h_im + loc, dec * h_im + dec_im * h + loc_im
        else:
            h = dec * h + loc
'''

LAUNCHER = '''
N = {N}
COMPLEX = {cplx}
SELECTIVE = {sel!r}
CONFIG = {config!r}
# Few channels x sequences (one long sequence): split each channel's state over lanes so that
# there are programs for every SM (None: this module has only the kernel above).
FEW_CONFIG = {few_config!r}
# Few channels x sequences and long sequences: the segmented scan (pass 1 local end states,
# pass 2 combine, pass 3 the recurrence again from each segment's true initial state).
SEG_CONFIG = {seg_config!r}


def _n_segments(nseq, d, L, sms):
    """Segments per sequence: CONFIG["segments"] when set, else enough for
    ``seg_programs`` programs per SM when the one-pass kernel has fewer than
    ``seg_below`` x SMs programs (``sms``: the device's SM count, 0 on the CPU), each segment
    at least ``seg_min_len`` steps."""
    if CONFIG["segments"]:
        return CONFIG["segments"]
    if not sms or nseq * triton.cdiv(d, CONFIG["block_d"]) >= CONFIG["seg_below"] * sms:
        return 1
    per_seq = max(1, int(CONFIG["seg_programs"] * sms) // (nseq * triton.cdiv(d, SEG_CONFIG["block_d"])))
    count = max(1, min(per_seq, (L // nseq) // CONFIG["seg_min_len"]))
    return 1 << (count.bit_length() - 1)  # a power of two: equal whole-chunk segments


def _launch(cfg, grid, args, extra, **flags):
    """{kernel} with config ``cfg``; ``flags``: LOCAL / APPLY (segmented passes 1 and 3)."""
    {kernel}[grid](*args, BLOCK_D=cfg["block_d"], SPLIT=cfg["split"], CHUNK=cfg["chunk"],
                 PF_BC=min(cfg["prefetch_bc"], N // cfg["split"]), num_warps=cfg["num_warps"],
                 **({{"maxnreg": cfg["maxnreg"]}} if cfg.get("maxnreg") else {{}}), **flags, **extra)


def forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
            cu_seqlens=None, return_last_state=False, out=None, state_out=None, **_):
    """{name}: selective scan of u (b, d, l); returns (out, last_state or None).

    ``out`` (b, d, l) and ``state_out`` (nseq, d, n) may be given to be written into.
    """
    batch, d, L = u.shape
    dev = u.device
    varlen = cu_seqlens is not None
    nseq = cu_seqlens.numel() - 1 if varlen else batch
    u = _time_contiguous(u)
    strides = []
    if SELECTIVE["dt"]:
        delta = _time_contiguous(delta)
        strides += [delta.stride(0), delta.stride(1)]
    else:
        delta = delta.to(torch.float32).contiguous()
    if SELECTIVE["A"]:
        A, s = _tokens(A, COMPLEX)
        strides += s
    else:
        A = _param(A, COMPLEX)
    bc, cpg = [], []
    for name, t in (("B", B), ("C", C)):
        if SELECTIVE[name]:
            # fp32 copies: B and C are small (groups x n per token) and every lane of a group
            # reads them, so the kernel should not convert them lane by lane.
            t, s = _tokens(t.unsqueeze(1) if t.dim() == 3 else t, COMPLEX, fp32=True)
            strides += s
            groups = t.shape[2] if COMPLEX else t.shape[1]
        else:
            t = _param(t, COMPLEX)
            groups = t.shape[0]
        bc.append(t)
        cpg.append(max(d // groups, 1))
    if out is None:
        out = torch.empty((batch, d, L), device=dev, dtype=u.dtype)
    assert out.shape == (batch, d, L) and out.dtype == u.dtype and out.is_contiguous()
    state_shape = (nseq, d, N, 2) if COMPLEX else (nseq, d, N)
    if state_out is not None:
        last = torch.view_as_real(state_out) if COMPLEX else state_out
        assert tuple(last.shape) == state_shape and last.is_contiguous()
    else:
        last = torch.empty(state_shape, device=dev, dtype=torch.float32) if return_last_state else out
    h0 = _param(initial_state, COMPLEX) if initial_state is not None else out
    extra = {{}}
    opt_args = []
{opt_args}
    cu = cu_seqlens if varlen else out
    args = (u, delta, A, bc[0], bc[1], *opt_args, h0, out, last, cu, d, L, cpg[0], cpg[1],
            u.stride(0), u.stride(1), *strides, *z_strides, out.stride(0), out.stride(1))
    flags = dict(WRITE_HT=bool(return_last_state), VARLEN=varlen)
    if L > 0 and d > 0 and nseq > 0:
        sms = _sm_count(dev)
        n_seg = _n_segments(nseq, d, L, sms)
        if n_seg > 1:
            cfg = SEG_CONFIG
            blocks = triton.cdiv(d, cfg["block_d"])
            seg = torch.empty((2, nseq, n_seg, d, N, 2 if COMPLEX else 1), device=dev,
                              dtype=torch.float32)
            seg_args = (*args, seg[0], seg[1], n_seg)
            _launch(cfg, (blocks, nseq * (n_seg - 1)), seg_args, extra, LOCAL=True, APPLY=False,
                    HAS_H0=False, **flags)
            # small blocks: the walk over segments is a latency chain, so more programs
            _ssmc_scan_combine[(triton.cdiv(d * N, 128), nseq)](
                seg[0], seg[1], h0, d * N, n_seg, HAS_H0=initial_state is not None, CPLX=COMPLEX,
                BLOCK=128, num_warps=4)
            _launch(cfg, (blocks, nseq * n_seg), seg_args, extra, LOCAL=False, APPLY=True,
                    HAS_H0=True, **flags)
        else:
            cfg = CONFIG
            if FEW_CONFIG is not None and nseq * triton.cdiv(d, CONFIG["block_d"]) < sms:
                cfg = FEW_CONFIG
            _launch(cfg, (triton.cdiv(d, cfg["block_d"]), nseq), (*args, out, out, 1), extra,
                    LOCAL=False, APPLY=False, HAS_H0=initial_state is not None, **flags)
    elif return_last_state:
        last.copy_(h0 if initial_state is not None else torch.zeros_like(last))
    if not return_last_state:
        return out, None
    return out, (state_out if state_out is not None else
                 torch.view_as_complex(last) if COMPLEX else last)
'''


def launcher_source(plan: KernelPlan, config: dict, selective: Dict[str, bool],
                    kernel: str) -> str:
    """The combine kernel and ``forward`` for the scan kernel named ``kernel``, launched with
    ``config`` (one pass), ``few_channels_config`` (state-split) or ``segmented_config``."""
    f = plan.family
    # The optional terms in the kernel's parameter order (right after C), each converted as
    # its role says: a parameter to fp32, a per-token input to unit stride along l (the
    # kernel takes its (b, d) strides).
    table = plan.operands
    opt, flags = optional_term_lines(plan, "opt_args", "out", "_time_contiguous({name})")
    opt += [f"    extra['{flag}'] = {name} is not None" for flag, name in flags]
    z_strides = next((f"({name}.stride(0), {name}.stride(1)) if {name} is not None else (0, 0)"
                      for _, name in flags if table[name].role is Role.INPUT), "()")
    opt.append(f"    z_strides = {z_strides}")
    return COMBINE + LAUNCHER.format(
        N=f.dims.state, cplx=f.A.structure is AStructure.COMPLEX_DIAGONAL, sel=selective,
        config=dict(config), few_config=few_channels_config(plan, config), name=f.name,
        kernel=kernel, seg_config=segmented_config(plan, config), opt_args="\n".join(opt))
