"""Generator of the decode-step kernel (selective_state_update convention).

One token: the state is read once, updated in place and written once, so the kernel is bound
by memory bandwidth (Mamba-2 decode, b64 h80 p64 n128: 168 MB of fp32 state each way). A
program owns a [BLOCK_R, N] tile of the state, contiguous along n (full 16-byte loads across a
warp), and computes y = C·h for its rows with one reduction over n.

- Scalar A per head (state (b, h, p, n)): rows are head_dim entries of one head; Δ, Ā and B̄
  are scalars of the program, B and C one vector of its group.
- Diagonal / complex-diagonal A (state (b, d, n)): rows are channels; Ā, B̄ are tiles. Complex
  tensors travel as real views (the state through ``torch.view_as_real``, so the in-place
  update reaches the caller's tensor) and y = 2 Re(C h).
The trapezoidal method has no decode step in this convention (it needs the previous B x).
A tile with fewer elements than the program's threads is replicated across threads by Triton;
the kernel then waits at a barrier between the state's load and its store (tile_replicated).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ssmc.ir import AStructure, KernelPlan, Sharing
from ssmc.plan import plan_limits

from . import codegen
from .codegen import Lines, as_text, cadd, cmul
from .scan_launcher import optional_inputs, optional_term_lines

WHAT = "decode step (state update)"


def supports(plan: KernelPlan) -> Optional[str]:
    st = plan.family.A.structure
    if st not in (AStructure.SCALAR, AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
        return f"the Triton decode step handles scalar, diagonal and complex-diagonal A, not {st.value}"
    return plan_limits(plan)


def _is_scalar(plan: KernelPlan) -> bool:
    return plan.family.A.structure is AStructure.SCALAR


def _pow2(v) -> bool:
    return isinstance(v, int) and v >= 1 and v & (v - 1) == 0


def tile_replicated(plan: KernelPlan, config: dict) -> bool:
    """Whether the [block_r, n] state tile has fewer elements than the program has threads.

    Triton then lays the tile out with several threads holding the same element: every copy
    loads it, only one copy's store is kept, and each copy computes its own y. Without a
    barrier a copy can load after another copy stored, update the state twice and send its
    wrong y through the reduction (read in Triton 3.6's sm_90 code for Mamba-1 n16, block_r 4,
    8 warps). With at least one element per thread no element has two owners.
    """
    elements = config["block_r"] * codegen.pow2_at_least(plan.family.dims.state)
    return elements < 32 * config["num_warps"]


def _warps_for(plan: KernelPlan, rows: int, warps: int) -> int:
    """``warps``, halved until the tile has an element for every thread."""
    while warps > 1 and tile_replicated(plan, {"block_r": rows, "num_warps": warps}):
        warps //= 2
    return warps


def check_config(plan: KernelPlan, config: dict):
    """ValueError for a config the generator cannot lay out (tl.arange needs powers of two)."""
    for key in ("block_r", "num_warps"):
        if not _pow2(config.get(key)):
            raise ValueError(f"decode step config: {key} must be a power of two >= 1, "
                             f"got {config.get(key)!r} in {config}")
    if config["num_warps"] > 32:
        raise ValueError(f"decode step config: num_warps {config['num_warps']} > 32")


def default_config(plan: KernelPlan) -> dict:
    f = plan.family
    n = codegen.pow2_at_least(f.dims.state)
    if _is_scalar(plan):
        rows = min(codegen.pow2_at_least(f.dims.head_dim), max(1, 4096 // n))
    else:
        rows = max(1, min(64, 2048 // n))
    return {"block_r": rows, "num_warps": _warps_for(plan, rows, 4)}


def candidates(plan: KernelPlan) -> List[dict]:
    """Row blocks x warps; tiles with fewer elements than threads are left out (the extra
    threads would only repeat the loads of others and need a barrier)."""
    f = plan.family
    out = []
    limit = codegen.pow2_at_least(f.dims.head_dim) if _is_scalar(plan) else 256
    for rows in (4, 8, 16, 32, 64, 128):
        if rows > limit:
            continue
        for warps in (1, 2, 4, 8):
            cfg = {"block_r": rows, "num_warps": warps}
            if not tile_replicated(plan, cfg):
                out.append(cfg)
    default = default_config(plan)
    return out if default in out else [default] + out


def _delta(o: Lines, plan: KernelPlan, raw: str, bias_load: str):
    if plan.family.delta.bias:
        o("if HAS_DT_BIAS:", f"    dt_bias = {bias_load}.to(tl.float32)", "else:",
          "    dt_bias = 0.0")
    o(f"dt = {codegen.delta_expr(plan, raw)}")


def _coefs(o: Lines, plan: KernelPlan, names):
    """abar/bbar (re, im) names, printed from the IR; None where zero."""
    parts = codegen.split_parts(plan)
    keys = [k for k, e in parts.items() if not k.startswith("bbar_prev") and not codegen.is_zero(e)]
    lines, finals = codegen.print_block({k: parts[k] for k in keys}, names, tmp_prefix="tmp")
    o.extend(lines)
    for k in keys:
        o(f"{k} = {finals[k]}")
    cplx = plan.family.A.structure is AStructure.COMPLEX_DIAGONAL
    get = lambda k: k if k in keys else None  # noqa: E731
    if cplx:
        return (get("abar_re"), get("abar_im")), (get("bbar_re"), get("bbar_im"))
    return (get("abar"), None), (get("bbar"), None)


def _optional_ptrs(plan: KernelPlan) -> List[str]:
    """Pointers of the optional inputs the spec has, in the launcher's argument order."""
    return [ptr for ptr, _ in optional_inputs(plan)]


def _optional_flags(plan: KernelPlan) -> List[str]:
    """The constexpr saying, for each optional input, whether the call passed it."""
    return [f"{flag}: tl.constexpr" for _, flag in optional_inputs(plan)]


def _barrier_if_replicated(o: Lines, replicated: bool):
    """Between the state's load and its in-place store when the tile is replicated."""
    if replicated:
        o("# fewer tile elements than threads: copies of an element must all have loaded it",
          "# before one copy stores the update (ssmc.backends.triton.step.tile_replicated)",
          "tl.debug_barrier()")


_SLOT_PARAMS = ("slots_ptr", "n_slots", "pad_slot")


def _layout(*names: str) -> List[str]:
    """Sizes and strides as compile-time constants. A decode step is launched every token with
    the same layout, and Triton's launch costs about a microsecond per runtime argument (the
    host side of a step is most of its time at small batch): a new layout compiles once."""
    return [f"{name}: tl.constexpr" for name in names]


def _slot(o: Lines):
    """Which state slot this batch row updates: its own row, or the slot state_batch_indices
    names in a pool. A padded row (pad_slot, or an index outside the pool) reads and writes
    no state."""
    o("if HAS_SLOTS:",
      "    slot = tl.load(slots_ptr + bat).to(tl.int64)",
      "    live = (slot != pad_slot) & (slot >= 0) & (slot < n_slots)",
      "    slot = tl.where(live, slot, 0)",
      "else:",
      "    slot = bat",
      "    live = bat >= 0")


def _zero_padded(o: Lines):
    o("if HAS_SLOTS:", "    y = tl.where(live, y, 0.0)")


def _scalar_kernel(plan: KernelPlan, name: str, replicated: bool) -> str:
    f = plan.family
    N = f.dims.state
    o = Lines()
    params = ["state_ptr", "x_ptr", "dt_ptr", "A_ptr", "B_ptr", "C_ptr", *_optional_ptrs(plan)]
    params += ["y_ptr", *_SLOT_PARAMS, *_layout(
        "head_dim", "heads_per_group_B", "heads_per_group_C",
        "stride_s_b", "stride_s_h", "stride_s_p", "stride_x_b", "stride_x_h",
        "stride_dt_b", "stride_A_b", "stride_B_b", "stride_B_g", "stride_C_b", "stride_C_g",
        "stride_z_b", "stride_z_h", "stride_y_b", "stride_y_h"),
               "BLOCK_R: tl.constexpr", *_optional_flags(plan), "HAS_SLOTS: tl.constexpr"]
    o.jit_def(name, params)
    o("pid_r = tl.program_id(0)", "head = tl.program_id(1)",
      "bat = tl.program_id(2).to(tl.int64)")
    _slot(o)
    o(
      "rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)", "r_ok = rows < head_dim",
      f"nn = tl.arange(0, {codegen.pow2_at_least(N)})", f"n_ok = nn < {N}")
    # Δ, A: one scalar per head for this program
    raw = "bat * stride_dt_b + head" if f.delta.selective else "head"
    _delta(o, plan, f"tl.load(dt_ptr + {raw}).to(tl.float32)", "tl.load(dt_bias_ptr + head)")
    if f.A.selective:
        o("a = tl.load(A_ptr + bat * stride_A_b + head).to(tl.float32)")
    else:
        o("a = tl.load(A_ptr + head).to(tl.float32)")
    abar, bbar = _coefs(o, plan, {"dt": "dt", "a": "a"})
    for w in ("B", "C"):
        spec = getattr(f, w)
        if spec.selective:
            src = (f"{w}_ptr + bat * stride_{w}_b + (head // heads_per_group_{w}) * "
                   f"stride_{w}_g + nn")
        elif spec.sharing is Sharing.HEAD:
            src = f"{w}_ptr + head * {N} + nn"
        else:
            src = f"{w}_ptr + (head // heads_per_group_{w}) * {N} + nn"
        o(f"{w.lower()}_vec = tl.load({src}, mask=n_ok, other=0.0).to(tl.float32)")
    o("x = tl.load(x_ptr + bat * stride_x_b + head * stride_x_h + rows, mask=r_ok, "
      "other=0.0).to(tl.float32)",
      "s_ptrs = state_ptr + slot * stride_s_b + head * stride_s_h + rows[:, None] * stride_s_p "
      "+ nn[None, :]",
      # where(), not `& live`: the interpreter gives a scalar & tensor of bools a non-bool dtype
      "s_mask = tl.where(live, r_ok[:, None] & n_ok[None, :], False)",
      "h = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)")
    _barrier_if_replicated(o, replicated)
    bx = cmul(bbar, ("x", None))[0]
    o(f"h = {as_text(cmul(abar, ('h', None))[0])} + ({bx})[:, None] * b_vec[None, :]")
    o("tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=s_mask)",
      "y = tl.sum(h * c_vec[None, :], axis=1)")
    if f.D:
        if f.D.sharing is Sharing.HEAD_DIM:
            o("if HAS_D:", "    y += tl.load(D_ptr + head * head_dim + rows, mask=r_ok, "
              "other=0.0).to(tl.float32) * x")
        else:
            o("if HAS_D:", "    y += tl.load(D_ptr + head).to(tl.float32) * x")
    if f.gate:
        o("if HAS_Z:",
          "    z = tl.load(z_ptr + bat * stride_z_b + head * stride_z_h + rows, mask=r_ok, "
          "other=0.0).to(tl.float32)",
          "    y = y * _silu(z)")
    _zero_padded(o)
    o("tl.store(y_ptr + bat * stride_y_b + head * stride_y_h + rows, "
      "y.to(y_ptr.dtype.element_ty), mask=r_ok)")
    return o.text()


def _diagonal_kernel(plan: KernelPlan, name: str, replicated: bool) -> str:
    f = plan.family
    N = f.dims.state
    NP = codegen.pow2_at_least(N)
    cplx = f.A.structure is AStructure.COMPLEX_DIAGONAL
    o = Lines()
    params = ["state_ptr", "x_ptr", "dt_ptr", "A_ptr", "B_ptr", "C_ptr", *_optional_ptrs(plan)]
    params += ["y_ptr", *_SLOT_PARAMS, *_layout(
        "n_channels", "cpg_B", "cpg_C", "stride_s_b", "stride_s_d",
        "stride_s_n", "stride_x_b", "stride_dt_b", "stride_A_b", "stride_B_b",
        "stride_B_g", "stride_C_b", "stride_C_g", "stride_z_b", "stride_y_b"),
               "BLOCK_R: tl.constexpr", *_optional_flags(plan), "HAS_SLOTS: tl.constexpr"]
    o.jit_def(name, params)
    o("pid_r = tl.program_id(0)", "bat = tl.program_id(1).to(tl.int64)")
    _slot(o)
    o(
      "ch = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)", "ok = ch < n_channels",
      "chl = tl.minimum(ch, n_channels - 1).to(tl.int64)",
      f"nn = tl.arange(0, {NP})", f"n_ok = nn < {N}", "tile_ok = ok[:, None] & n_ok[None, :]",
      "nl = tl.minimum(nn, %d)" % (N - 1))
    raw = "bat * stride_dt_b + chl" if f.delta.selective else "chl"
    _delta(o, plan, f"tl.load(dt_ptr + {raw}).to(tl.float32)", "tl.load(dt_bias_ptr + chl)")
    o("dt2 = dt[:, None]")
    # Complex parameters arrive as (..., n, 2) real views: re at 2k, im at 2k + 1.
    a_idx = ("bat * stride_A_b + " if f.A.selective else "") + f"chl[:, None] * {N} + nl[None, :]"
    if cplx:
        o(f"a_re = tl.load(A_ptr + ({a_idx}) * 2).to(tl.float32)",
          f"a_im = tl.load(A_ptr + ({a_idx}) * 2 + 1).to(tl.float32)")
        abar, bbar = _coefs(o, plan, {"dt": "dt2", "a_re": "a_re", "a_im": "a_im"})
    else:
        o(f"a = tl.load(A_ptr + {a_idx}).to(tl.float32)")
        abar, bbar = _coefs(o, plan, {"dt": "dt2", "a": "a"})
    vals = {}
    for w in ("B", "C"):
        spec = getattr(f, w)
        if spec.selective:
            row = f"bat * stride_{w}_b + (chl // cpg_{w})[:, None] * stride_{w}_g"
        elif spec.sharing is Sharing.HEAD:
            row = f"chl[:, None] * {N}"
        else:
            row = f"(chl // cpg_{w})[:, None] * {N}"
        letter = w.lower()
        if cplx:
            o(f"{letter}_re = tl.load({w}_ptr + ({row} + nl[None, :]) * 2).to(tl.float32)",
              f"{letter}_im = tl.load({w}_ptr + ({row} + nl[None, :]) * 2 + 1).to(tl.float32)")
            vals[w] = (f"{letter}_re", f"{letter}_im")
        else:
            o(f"{letter}_t = tl.load({w}_ptr + {row} + nl[None, :]).to(tl.float32)")
            vals[w] = (f"{letter}_t", None)
    o("x = tl.load(x_ptr + bat * stride_x_b + chl).to(tl.float32)",
      "s_ptrs = state_ptr + slot * stride_s_b + chl[:, None] * stride_s_d + nn[None, :] * stride_s_n",
      "s_ok = tl.where(live, tile_ok, False)")
    if cplx:
        o("h_re = tl.load(s_ptrs, mask=s_ok, other=0.0).to(tl.float32)",
          "h_im = tl.load(s_ptrs + 1, mask=s_ok, other=0.0).to(tl.float32)")
        h = ("h_re", "h_im")
    else:
        o("h = tl.load(s_ptrs, mask=s_ok, other=0.0).to(tl.float32)")
        h = ("h", None)
    _barrier_if_replicated(o, replicated)
    new = cadd(cmul(abar, h), cmul(bbar, cmul(vals["B"], ("x[:, None]", None))))
    o(f"new_re = {as_text(new[0])}")
    if cplx:
        o(f"new_im = {as_text(new[1])}",
          "tl.store(s_ptrs, new_re.to(state_ptr.dtype.element_ty), mask=s_ok)",
          "tl.store(s_ptrs + 1, new_im.to(state_ptr.dtype.element_ty), mask=s_ok)",
          # padded n columns load 0 for h but may not be 0 for C: mask the reduction
          "y = 2.0 * tl.sum(tl.where(tile_ok, c_re * new_re - c_im * new_im, 0.0), axis=1)")
    else:
        o("tl.store(s_ptrs, new_re.to(state_ptr.dtype.element_ty), mask=s_ok)",
          "y = tl.sum(tl.where(tile_ok, c_t * new_re, 0.0), axis=1)")
    if f.D:
        o("if HAS_D:", "    y += tl.load(D_ptr + chl).to(tl.float32) * x")
    if f.gate:
        o("if HAS_Z:", "    y = y * _silu(tl.load(z_ptr + bat * stride_z_b + chl).to(tl.float32))")
    _zero_padded(o)
    o("tl.store(y_ptr + bat * stride_y_b + ch, y.to(y_ptr.dtype.element_ty), mask=ok)")
    return o.text()


# A launcher module: ``forward`` is ``launcher(...)(...)``. ``launcher`` does the work that
# depends only on shapes, strides and dtypes (the grid, the kernel's layout constants, which
# tensors need a copy) and returns ``launch``, which converts and launches; ssmc keeps one
# ``launch`` per shape signature of a call (ssmc.signature), so a decode step pays only that.
# Both launchers' entry points: the same calling convention, the state's trailing dims aside.
STEP_ENTRY = '''def forward(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None,
            pad_slot_id=-1, out=None, **_):
    \"\"\"{name}: one decode step; updates state (b, {dims}) in place, returns (y, None).
    With state_batch_indices (b,), state is a pool (slots, {dims}) and row i updates slot
    state_batch_indices[i]; a row whose index is pad_slot_id (or outside the pool) is skipped
    and its y is zero.\"\"\"
    return launcher(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out=out)(
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, out)


def launcher(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None,
             pad_slot_id=-1, out=None, **_):
    \"\"\"The ``launch`` of every call whose tensors have these shapes, strides and dtypes.\"\"\"
'''

SCALAR_LAUNCHER = '''
CONFIG = {config!r}


def _inputs(x, A, dt, B, C):
    \"\"\"The required inputs as the kernel reads them.\"\"\"
    return (x if x.stride(-1) == 1 else x.contiguous(), A.contiguous(), dt.contiguous(),
            B.contiguous() if {sel_B} else _param(B, False),
            C.contiguous() if {sel_C} else _param(C, False))


{forward}    slots, heads, head_dim, n = state.shape
    batch = x.shape[0]
    ss = state.stride()
    assert ss[-1] == 1, "state must be contiguous along n"
    x, A, dt, B, C = _inputs(x, A, dt, B, C)
    bs, cs, xs = B.stride(), C.stride(), x.stride()
    y_shape = (batch, heads, head_dim)
    y = out if out is not None else torch.empty(y_shape, device=x.device, dtype=x.dtype)
    opt = []
{opt}
    zs = z.stride() if z is not None else (0, 0)
    layout = (head_dim, max(heads // B.shape[-2], 1), max(heads // C.shape[-2], 1),
              ss[0], ss[1], ss[2], xs[0], xs[1], dt.stride(0) if dt.dim() == 2 else 0,
              A.stride(0) if A.dim() == 2 else 0, bs[0] if B.dim() == 3 else 0, bs[-2],
              cs[0] if C.dim() == 3 else 0, cs[-2], zs[0], zs[1], *y.stride()[:2])
    flags = dict(BLOCK_R=CONFIG["block_r"], num_warps=CONFIG["num_warps"],{flags}
                 HAS_SLOTS=state_batch_indices is not None)
    run = {kernel}[(-(-head_dim // CONFIG["block_r"]), heads, batch)]

    def launch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None,
               pad_slot_id=-1, out=None):
        x, A, dt, B, C = _inputs(x, A, dt, B, C)
        y = out if out is not None else torch.empty(y_shape, device=x.device, dtype=x.dtype)
        opt = []
{launch_opt}
        slots_ptr = state_batch_indices if state_batch_indices is not None else y
        run(state, x, dt, A, B, C, *opt, y, slots_ptr, slots, pad_slot_id, *layout, **flags)
        return y, None
    return launch
'''

DIAGONAL_LAUNCHER = '''
CONFIG = {config!r}
COMPLEX = {cplx}


def _real(t, selective):
    \"\"\"Parameters as the kernel reads them (per-token ones keep their dtype).\"\"\"
    return t.contiguous() if selective and not COMPLEX else _param(t, COMPLEX)


def _inputs(state, x, dt, A, B, C):
    \"\"\"The state and the required inputs as the kernel reads them: complex as real pairs,
    B and C with a group dim.\"\"\"
    bc = []
    for t, selective in ((B, {sel_B}), (C, {sel_C})):
        if t.dim() == 2 and selective:
            t = t.unsqueeze(1)
        bc.append(_real(t, selective))
    s = torch.view_as_real(state) if COMPLEX else state
    return s, x.contiguous(), dt.contiguous(), _real(A, {sel_A}), bc[0], bc[1]


{forward}    slots, d, n = state.shape
    batch = x.shape[0]
    if COMPLEX:
        assert state.is_complex() and state.stride(-1) == 1, "state: complex, contiguous along n"
    else:
        assert state.stride(-1) == 1, "state must be contiguous along n"
    s, x, dt, A, b, c = _inputs(state, x, dt, A, B, C)
    s_strides = s.stride()[:3] if COMPLEX else (s.stride(0), s.stride(1), 1)
    groups = [t.shape[-3 if COMPLEX else -2] for t in (b, c)]
    y_shape = (batch, d)
    y = out if out is not None else torch.empty(y_shape, device=x.device, dtype=x.dtype)
    opt = []
{opt}
    zs = (z.stride(0),) if z is not None else (0,)
    per = 2 if COMPLEX else 1
    bstr = []
    for t, selective in ((b, {sel_B}), (c, {sel_C})):
        bstr += [t.stride(0) // per if selective else 0, t.stride(1) // per if selective else 0]
    layout = (d, max(d // groups[0], 1), max(d // groups[1], 1),
              *s_strides, x.stride(0), dt.stride(0) if dt.dim() == 2 else 0,
              (A.stride(0) // per) if {sel_A} else 0, *bstr, *zs, y.stride(0))
    flags = dict(BLOCK_R=CONFIG["block_r"], num_warps=CONFIG["num_warps"],{flags}
                 HAS_SLOTS=state_batch_indices is not None)
    run = {kernel}[(-(-d // CONFIG["block_r"]), batch)]

    def launch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None,
               pad_slot_id=-1, out=None):
        s, x, dt, A, b, c = _inputs(state, x, dt, A, B, C)
        y = out if out is not None else torch.empty(y_shape, device=x.device, dtype=x.dtype)
        opt = []
{launch_opt}
        slots_ptr = state_batch_indices if state_batch_indices is not None else y
        run(s, x, dt, A, b, c, *opt, y, slots_ptr, slots, pad_slot_id, *layout, **flags)
        return y, None
    return launch
'''


def generate(plan: KernelPlan, config: dict, notes: Sequence[str] = ()) -> str:
    check_config(plan, config)
    replicated = tile_replicated(plan, config)
    f = plan.family
    kname = f"ssmc_step_{''.join(ch if ch.isalnum() else '_' for ch in f.name)}"
    opt, flags = optional_term_lines(plan, "opt", "y",
                                     "{name} if {name}.stride(-1) == 1 else {name}.contiguous()")
    flags = "".join(f"\n                 {flag}={name} is not None," for flag, name in flags)
    launch_opt = "\n".join("    " + line for line in opt)
    if _is_scalar(plan):
        body = _scalar_kernel(plan, kname, replicated)
        launcher = SCALAR_LAUNCHER.format(forward=STEP_ENTRY.format(name=f.name, dims="h, p, n"),
                                          config=dict(config), name=f.name, kernel=kname,
                                          sel_B=f.B.selective, sel_C=f.C.selective,
                                          opt="\n".join(opt), launch_opt=launch_opt,
                                          flags=flags)
    else:
        body = _diagonal_kernel(plan, kname, replicated)
        launcher = DIAGONAL_LAUNCHER.format(
            forward=STEP_ENTRY.format(name=f.name, dims="d, n"),
            config=dict(config), name=f.name, kernel=kname, sel_A=f.A.selective,
            sel_B=f.B.selective, sel_C=f.C.selective, opt="\n".join(opt), flags=flags,
            launch_opt=launch_opt,
            cplx=f.A.structure is AStructure.COMPLEX_DIAGONAL)
    return codegen.module_source(plan, config, WHAT, body + launcher, notes)
