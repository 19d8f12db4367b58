"""``SSMLayer``: a full Mamba-1 or Mamba-2 block around a compiled SSM family.

The block's shape follows the family. Scalar A (SSD) builds the Mamba-2 block::

    in_proj -> z | xBC | dt;  causal depthwise conv1d + silu over xBC;  x, B, C = split(xBC)
    y = SSD(x, dt, A, B, C, D, z, dt_bias)          # compiled kernel (softplus, clamp from the spec)
    out_proj(RMSNorm(y))                            # gate inside the kernel, or norm(y * silu(z))

Diagonal or complex-diagonal A builds the Mamba-1 block::

    in_proj -> x | z;  causal depthwise conv1d + silu over x;  x_proj(x) -> dt_r | B | C
    y = selective_scan(x, dt_proj.weight @ dt_r, A, B, C, D, z, delta_bias=dt_proj.bias)
    out_proj(y)

Only the parts the spec makes selective come from projections; a time-invariant Δ, B or C is a
learned parameter (``dt``, ``B``, ``C``) instead. Parameter names match Hugging Face's
``MambaMixer`` / ``Mamba2Mixer`` (A_log, D, conv1d, in_proj, x_proj, dt_proj / dt_bias, norm,
out_proj) so that their checkpoints load without renaming. A = -exp(A_log) when the spec says
so (``ASpec.log_param``), else the parameter is ``A`` itself.

Recurrent inference: ``allocate_state(batch)`` gives an ``SSMState`` (the last ``d_conv`` conv
inputs and the SSM state); ``forward(h, state)`` runs a prompt and leaves the state after it,
``step(h, state)`` advances one token with the family's decode-step kernel.

Inputs are checked like kernel calls (``check_input``): a hidden of the wrong d_model, rank,
dtype or device, or a state of another batch, raises ``ssmc.CallError`` naming the argument and
its expected shape before anything runs. The checks read shapes, dtypes and devices only (never
values), so they cost a few comparisons per call and trace under ``torch.compile``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssmc.errors import CallError, SSMCError
from ssmc.ir import Algorithm, AStructure, Sharing, SSMFamily

_COMPILED = {}

FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dims_text(dims) -> str:
    comma = "," if len(dims) == 1 else ""
    words = ", ".join(d[0] for d in dims)
    sizes = ", ".join(d[0] if d[1] is None else str(d[1]) for d in dims)
    return f"({words}{comma}) = ({sizes}{comma})"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_input(name: str, t, dims, dtype=None, device=None, *, field: Optional[str] = None,
                owner: str = "the layer's parameters", why: Optional[str] = None,
                hint: Optional[str] = None) -> None:
    """Raise a ``CallError`` naming argument ``name`` unless tensor ``t`` has the form asked for.

    ``dims``: one ``(word, size)`` per axis, size None where any size goes, optionally a third
    item saying where the size comes from ("the batch of 'hidden'"). ``dtype``: the dtype of
    ``owner`` (a ``torch.dtype``; inside ``torch.autocast`` its dtype is accepted too), or a tuple
    of the dtypes allowed (``why`` says why). ``device``: ``owner``'s device. ``field`` names the
    tensor inside the argument (``state.ssm``); ``hint`` is shown with a shape error. Reads only
    shape, dtype and device, never values: a few comparisons, no sync, traceable by dynamo.
    """
    if not isinstance(t, torch.Tensor):
        raise CallError(f"{_subject(name, field)} must be a torch tensor, got {type(t).__name__}")
    shape = t.shape
    ok = len(shape) == len(dims)
    if ok:
        for d, size in zip(dims, shape):
            if d[1] is not None and d[1] != size:
                ok = False
                break
    if not ok:
        raise _shape_error(name, field, tuple(shape), dims, hint)
    if dtype is not None and t.dtype != dtype and not _dtype_allowed(t, dtype):
        raise _dtype_error(name, field, t, dtype, owner, why)
    if device is not None and t.device != device:
        raise CallError(f"{_subject(name, field)} is on {t.device} but {owner} are on {device}; "
                        "all tensors must be on one device",
                        hint=f"move it with {_path(name, field)}.to({str(device)!r})")


def _path(name, field) -> str:
    return f"{name}.{field}" if field else name


def _subject(name, field) -> str:
    return f"argument {name!r}" + (f" ({name}.{field})" if field else "")


def _dtype_allowed(t, dtype) -> bool:
    if isinstance(dtype, tuple):
        return t.dtype in dtype
    kind = t.device.type   # torch.autocast runs a layer of fp32 parameters on its dtype
    return (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
            and t.dtype == torch.get_autocast_dtype(kind))


def _shape_error(name, field, shape, dims, hint) -> CallError:
    msg = f"{_subject(name, field)} has shape {shape}; expected {_dims_text(dims)}"
    if len(shape) != len(dims):
        msg += f": {len(shape)} dims instead of {len(dims)}"
    else:
        i, d = next((i, d) for i, d in enumerate(dims) if d[1] not in (None, shape[i]))
        msg += f": dim {i} ({d[0]}) is {shape[i]}, expected {d[1]}"
        msg += f" ({d[2]})" if len(d) > 2 else ""
    return CallError(msg, hint=hint)


def _dtype_error(name, field, t, dtype, owner, why) -> CallError:
    if isinstance(dtype, tuple):
        want = dtype[0]
        expected = " or ".join(_dtype_name(d) for d in dtype) + (f" ({why})" if why else "")
    else:
        want, expected = dtype, f"{_dtype_name(dtype)}, {why or 'the dtype of ' + owner}"
    return CallError(f"{_subject(name, field)} has dtype {_dtype_name(t.dtype)}; expected "
                     f"{expected}", hint=f"convert it with {_path(name, field)}.to({want})")


def compiled_kernel(family: SSMFamily, target: str):
    """One CompiledKernel per (family, target) in a process: 28 layers share one kernel."""
    from ssmc.api import compile as compile_family
    from ssmc.plan import ir_hash
    key = (ir_hash(family), target)
    if key not in _COMPILED:
        algorithm = Algorithm.SCAN if family.compute.algorithm is Algorithm.STEP else None
        _COMPILED[key] = compile_family(family, target=target, algorithm=algorithm)
    return _COMPILED[key]


def resolve_family(spec_or_family, family: Optional[str] = None) -> SSMFamily:
    if isinstance(spec_or_family, SSMFamily):
        return spec_or_family
    from ssmc.api import _family
    return _family(spec_or_family, family)


class RMSNorm(nn.Module):
    """RMSNorm with a weight; statistics in fp32, over groups of ``group_size`` channels (Mamba-2
    normalizes each group of heads on its own when B/C have several groups)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if gate is not None:
            h = h * F.silu(gate.float())
        shape = h.shape
        h = h.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.reshape(shape)).to(dtype)


@dataclass
class SSMState:
    """Inference state of one SSM layer: conv (b, conv_dim, d_conv) inputs, newest last; ssm
    (b, h, p, n) for SSD families or (b, d, n) for the others, fp32 (complex64 for complex A)."""
    conv: torch.Tensor
    ssm: torch.Tensor


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class SSMLayer(nn.Module):
    """A Mamba-1 or Mamba-2 block (see the module docstring) running a compiled family.

    ``spec_or_family``: an ``ir.SSMFamily``, a spec path or text (``family=`` picks one of several).
    ``target``: where the SSM kernel runs (reference, cpu, cuda, c). ``use_custom_op`` calls the
    kernel through a torch custom op so the layer compiles under ``torch.compile(fullgraph=True)``.
    ``sizes`` (``channels=``, ``state=``, ``heads=``, ...) replace the spec's dims: the layer's
    weights need every size, so a size the spec leaves open must be given here.
    """

    def __init__(self, spec_or_family, d_model: int, target: str = "reference",
                 family: Optional[str] = None, *, d_conv: int = 4, dt_rank="auto",
                 conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5,
                 norm_group_size: Optional[int] = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_init_range=(1.0, 16.0), use_custom_op: bool = True,
                 sizes: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        from ssmc.plan import require_sizes
        from ssmc.signature import resized
        fam = resolve_family(spec_or_family, family)
        fam = resized(fam, **sizes) if sizes else fam
        require_sizes(fam, "SSMLayer (its weights)", "as SSMLayer(..., sizes=dict({sizes}))")
        structure = fam.A.structure
        if structure not in (AStructure.SCALAR, AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL):
            raise SSMCError(f"SSMLayer builds blocks for scalar, diagonal and complex-diagonal A; "
                            f"family {fam.name} has {structure.value} A (call ssmc.compile for its "
                            "kernel)", fam.A.loc)
        if fam.A.selective:
            raise SSMCError(f"family {fam.name} has a selective A, which no Mamba block projects "
                            "from the input; SSMLayer cannot build it", fam.A.loc)
        if structure is AStructure.COMPLEX_DIAGONAL and (fam.B.selective or fam.C.selective):
            raise SSMCError(f"family {fam.name}: SSMLayer supports complex A with learned "
                            "(time-invariant) B and C only", fam.B.loc)
        self.family = fam
        self.target = target
        self.d_model = d_model
        self.d_inner = fam.dims.d_inner
        self.d_state = fam.dims.state
        self.groups = fam.dims.groups
        self.d_conv = d_conv
        self.is_ssd = structure is AStructure.SCALAR
        self.is_complex = structure is AStructure.COMPLEX_DIAGONAL
        self.use_custom_op = use_custom_op
        self.kernel = compiled_kernel(fam, target)
        self._scan = self._wrap(self.kernel)
        self._step_fn = None
        factory = {"device": device, "dtype": dtype}
        di, n, g = self.d_inner, self.d_state, self.groups
        units = fam.dims.heads if self.is_ssd else di    # what Δ, A, D are indexed by
        self.units = units
        # What a state must look like after its batch (check_input's dims), and its ssm dtype.
        if self.is_ssd:
            self._ssm_dims = (("heads", fam.dims.heads), ("head_dim", fam.dims.head_dim),
                              ("state", self.d_state))
        else:
            self._ssm_dims = (("channels", di), ("state", n))
        self.state_dtype = torch.complex64 if self.is_complex else torch.float32
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        bc_width = g * n * (int(fam.B.selective) + int(fam.C.selective))
        if self.is_ssd:
            # Mamba-2 projects z always: the gated norm needs it even when the kernel has no gate.
            self.conv_dim = di + bc_width
            proj = di + self.conv_dim + (units if fam.delta.selective else 0)
        else:
            self.conv_dim = di
            proj = di * (2 if fam.gate is not None else 1)
        self.in_proj = nn.Linear(d_model, proj, bias=bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                    padding=d_conv - 1, bias=conv_bias, **factory)
        if not self.is_ssd:
            x_width = (self.dt_rank if fam.delta.selective else 0) + bc_width
            if x_width:
                self.x_proj = nn.Linear(di, x_width, bias=False, **factory)
            if fam.delta.selective:
                self.dt_proj = nn.Linear(self.dt_rank, di, bias=fam.delta.bias, **factory)

        # Δ: initial step sizes log-uniform in [dt_min, dt_max], stored through softplus^-1
        # when the spec applies softplus, as Mamba does.
        dt0 = torch.exp(torch.rand(units, device=device) * (math.log(dt_max) - math.log(dt_min))
                        + math.log(dt_min)).clamp(min=dt_init_floor)
        dt_param = _inverse_softplus(dt0) if fam.delta.softplus else dt0
        if fam.delta.bias and fam.delta.selective and not self.is_ssd:
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt_param)
                std = self.dt_rank ** -0.5
                self.dt_proj.weight.uniform_(-std, std)
        elif fam.delta.bias:
            self.dt_bias = nn.Parameter(dt_param.clone())
        if not fam.delta.selective:
            # A learned constant Δ: the bias (when the spec has one) carries the initial value.
            self.dt = nn.Parameter(torch.zeros_like(dt_param) if fam.delta.bias else dt_param)

        # A: Mamba-2 draws one rate per head from A_init_range; Mamba-1 uses 1..n per channel
        # (S4D-Real); complex A adds S4D-Lin's imaginary parts pi * k.
        if self.is_ssd:
            rates = torch.empty(units, device=device).uniform_(*A_init_range)
        else:
            rates = torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(di, 1)
            if self.is_complex:
                rates = torch.full((di, n), 0.5, device=device)
                self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32,
                                                                  device=device).repeat(di, 1))
        if fam.A.log_param:
            self.A_log = nn.Parameter(torch.log(rates))
        else:
            self.A = nn.Parameter(-rates)
        if fam.D is not None:
            d_shape = (units, fam.dims.head_dim) if fam.D.sharing is Sharing.HEAD_DIM else (units,)
            self.D = nn.Parameter(torch.ones(d_shape, device=device))
        for name, spec in (("B", fam.B), ("C", fam.C)):
            if not spec.selective:
                rows = g if spec.sharing is Sharing.GROUP else units
                value = torch.randn(rows, n, device=device) * n ** -0.5
                if self.is_complex:
                    value = torch.complex(value, torch.randn(rows, n, device=device) * n ** -0.5)
                setattr(self, name, nn.Parameter(value))
        if self.is_ssd:
            self.norm = RMSNorm(di, eps=norm_eps, group_size=norm_group_size or di // g, **factory)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)

    # -- kernels ------------------------------------------------------------------------------

    def _wrap(self, kernel):
        if not self.use_custom_op:
            return kernel
        from .ops import as_op
        return as_op(kernel)

    @property
    def step_kernel(self):
        if self._step_fn is None:
            self._step_fn = self._wrap(self.kernel.step)
        return self._step_fn

    def extra_repr(self) -> str:
        kind = "mamba2" if self.is_ssd else "mamba1"
        return (f"{self.family.name} ({kind} block), d_model={self.d_model}, "
                f"d_inner={self.d_inner}, state={self.d_state}, target={self.target}")

    # -- parameters as the kernel takes them ---------------------------------------------------

    def A_value(self) -> torch.Tensor:
        if self.family.A.log_param:
            real = -torch.exp(self.A_log.float())
        else:
            real = self.A.float()
        if self.is_complex:
            return torch.complex(real, self.A_imag.float())
        return real

    def _optional(self, name: str):
        value = getattr(self, name, None)
        return None if value is None else value.float()

    def _dt_bias(self):
        if not self.family.delta.bias:
            return None
        if hasattr(self, "dt_bias"):
            return self.dt_bias.float()
        return self.dt_proj.bias.float()

    def _constant(self, name: str, x: torch.Tensor):
        value = getattr(self, name)
        return value if value.is_complex() else value.to(x.dtype)

    # -- state --------------------------------------------------------------------------------

    def allocate_state(self, batch: int, device=None, dtype=None) -> SSMState:
        weight = self.out_proj.weight
        device = device or weight.device
        dtype = dtype or weight.dtype
        conv = torch.zeros(batch, self.conv_dim, max(self.d_conv, 1), device=device, dtype=dtype)
        shape = (batch,) + tuple(size for _, size in self._ssm_dims)
        return SSMState(conv, torch.zeros(shape, device=device, dtype=self.state_dtype))

    # -- input checks (before anything runs; see check_input) ----------------------------------

    _FORWARD_HINT = ("forward takes (batch, seqlen, d_model); one token per sequence, "
                     "(batch, d_model), goes through step(hidden, state)")
    _STEP_HINT = ("step takes one token per sequence, (batch, d_model); a sequence, "
                  "(batch, seqlen, d_model), goes through forward(hidden, state)")
    _STATE_HINT = "allocate_state(batch) gives the state this layer expects"

    def _check(self, hidden, state, step: bool):
        weight = self.in_proj.weight
        model = ("d_model", self.d_model)
        dims = (("batch", None), model) if step else (("batch", None), ("seqlen", None), model)
        check_input("hidden", hidden, dims, weight.dtype, weight.device,
                    hint=self._STEP_HINT if step else self._FORWARD_HINT)
        if state is None and not step:
            return
        if not isinstance(state, SSMState):
            got = "is missing" if state is None else f"is a {type(state).__name__}"
            raise CallError(f"argument 'state' {got}; expected an SSMState of batch "
                            f"{hidden.shape[0]}", hint=self._STATE_HINT)
        batch = ("batch", hidden.shape[0], "the batch of 'hidden'")
        check_input("state", state.ssm, (batch,) + self._ssm_dims, (self.state_dtype,),
                    weight.device, field="ssm", why="the dtype of the SSM state",
                    hint=self._STATE_HINT)
        check_input("state", state.conv, (batch, ("conv_dim", self.conv_dim),
                                          ("d_conv", max(self.d_conv, 1))),
                    FLOATING, weight.device, field="conv", why="conv inputs are floating",
                    hint=self._STATE_HINT)

    def _conv(self, x: torch.Tensor, state: Optional[SSMState]) -> torch.Tensor:
        """Causal depthwise conv + silu over (b, c, l); the state supplies the left context and
        receives the last d_conv inputs."""
        if self.d_conv == 0:
            return x
        length = x.shape[-1]
        if state is not None:
            extended = torch.cat([state.conv[..., 1:].to(x.dtype), x], dim=-1)
            state.conv.copy_(torch.cat([state.conv, x.to(state.conv.dtype)], -1)[..., -self.d_conv:])
        else:
            extended = F.pad(x, (self.d_conv - 1, 0))
        out = F.conv1d(extended, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out[..., :length])

    def _conv_step(self, x: torch.Tensor, state: SSMState) -> torch.Tensor:
        if self.d_conv == 0:
            return x
        state.conv.copy_(torch.cat([state.conv[..., 1:], x[..., None].to(state.conv.dtype)], -1))
        out = (state.conv.to(x.dtype) * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        return F.silu(out)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, state: Optional[SSMState] = None) -> torch.Tensor:
        """hidden (b, l, d_model) -> (b, l, d_model). With ``state``: continue from it and leave
        the state after the last token (prefill). Raises ``CallError`` for a hidden or state
        that does not fit (see ``check_input``)."""
        self._check(hidden, state, step=False)
        if self.is_ssd:
            return self._forward_mamba2(hidden, state)
        return self._forward_mamba1(hidden, state)

    def step(self, hidden: torch.Tensor, state: SSMState) -> torch.Tensor:
        """hidden (b, d_model) -> (b, d_model), one token, using the decode-step kernel."""
        self._check(hidden, state, step=True)
        if self.is_ssd:
            return self._step_mamba2(hidden, state)
        return self._step_mamba1(hidden, state)

    def _split_mamba2(self, zxbcdt: torch.Tensor):
        fam, di = self.family, self.d_inner
        widths = [di, self.conv_dim] + ([self.units] if fam.delta.selective else [])
        parts = torch.split(zxbcdt, widths, dim=-1)
        return parts[0], parts[1], (parts[2] if fam.delta.selective else None)

    def _split_bc(self, xbc: torch.Tensor, width: int):
        """x, B, C from the conv output (Mamba-2) or from x_proj (Mamba-1, after dt_r)."""
        fam, gn = self.family, self.groups * self.d_state
        widths = [width] + [gn] * (int(fam.B.selective) + int(fam.C.selective))
        parts = list(torch.split(xbc, widths, dim=-1))
        first = parts.pop(0)
        B = parts.pop(0) if fam.B.selective else None
        C = parts.pop(0) if fam.C.selective else None
        return first, B, C

    def _forward_mamba2(self, hidden, state):
        fam = self.family
        b, length, _ = hidden.shape
        h, p, g, n = fam.dims.heads, fam.dims.head_dim, self.groups, self.d_state
        z, xbc, dt = self._split_mamba2(self.in_proj(hidden))
        xbc = self._conv(xbc.transpose(1, 2), state).transpose(1, 2)
        x, B, C = self._split_bc(xbc, self.d_inner)
        B = B.reshape(b, length, g, n) if B is not None else self._constant("B", x)
        C = C.reshape(b, length, g, n) if C is not None else self._constant("C", x)
        dt = dt.contiguous() if dt is not None else self.dt.to(x.dtype)
        gated = fam.gate is not None
        out = self._scan(x.reshape(b, length, h, p).contiguous(), dt, self.A_value(),
                         B.contiguous(), C.contiguous(), D=self._optional("D"),
                         z=z.reshape(b, length, h, p).contiguous() if gated else None,
                         dt_bias=self._dt_bias(),
                         initial_states=state.ssm if state is not None else None,
                         return_final_states=state is not None)
        if state is not None:
            out, final = out
            state.ssm.copy_(final)
        y = out.reshape(b, length, self.d_inner)
        y = self.norm(y) if gated else self.norm(y, z)
        return self.out_proj(y)

    def _step_mamba2(self, hidden, state):
        fam = self.family
        b = hidden.shape[0]
        h, p, g, n = fam.dims.heads, fam.dims.head_dim, self.groups, self.d_state
        z, xbc, dt = self._split_mamba2(self.in_proj(hidden))
        xbc = self._conv_step(xbc, state)
        x, B, C = self._split_bc(xbc, self.d_inner)
        B = B.reshape(b, g, n) if B is not None else self._constant("B", x)
        C = C.reshape(b, g, n) if C is not None else self._constant("C", x)
        dt = dt.contiguous() if dt is not None else self.dt.to(x.dtype)
        gated = fam.gate is not None
        y = self.step_kernel(state.ssm, x.reshape(b, h, p).contiguous(), dt, self.A_value(),
                             B.contiguous(), C.contiguous(), D=self._optional("D"),
                             z=z.reshape(b, h, p).contiguous() if gated else None,
                             dt_bias=self._dt_bias())
        y = y.reshape(b, self.d_inner)
        y = self.norm(y) if gated else self.norm(y, z)
        return self.out_proj(y)

    def _mamba1_inputs(self, x_rows: torch.Tensor):
        """dt and selective B, C from x_proj; x_rows is (..., d_inner)."""
        fam = self.family
        if not hasattr(self, "x_proj"):
            return None, None, None
        dt_r, B, C = self._split_bc(self.x_proj(x_rows),
                                    self.dt_rank if fam.delta.selective else 0)
        dt = F.linear(dt_r, self.dt_proj.weight) if fam.delta.selective else None
        return dt, B, C

    def _forward_mamba1(self, hidden, state):
        fam = self.family
        b, length, _ = hidden.shape
        g, n = self.groups, self.d_state
        xz = self.in_proj(hidden)
        x, z = (xz.chunk(2, dim=-1) if fam.gate is not None else (xz, None))
        x = self._conv(x.transpose(1, 2), state)                       # (b, d, l)
        dt, B, C = self._mamba1_inputs(x.transpose(1, 2))
        delta = dt.transpose(1, 2).contiguous() if dt is not None else self.dt.to(x.dtype)
        B = (B.reshape(b, length, g, n).permute(0, 2, 3, 1).contiguous() if B is not None
             else self._constant("B", x))
        C = (C.reshape(b, length, g, n).permute(0, 2, 3, 1).contiguous() if C is not None
             else self._constant("C", x))
        out = self._scan(x.contiguous(), delta, self.A_value(), B, C, D=self._optional("D"),
                         z=z.transpose(1, 2).contiguous() if z is not None else None,
                         delta_bias=self._dt_bias(),
                         initial_state=state.ssm if state is not None else None,
                         return_last_state=state is not None)
        if state is not None:
            out, last = out
            state.ssm.copy_(last)
        return self.out_proj(out.transpose(1, 2))

    def _step_mamba1(self, hidden, state):
        fam = self.family
        b = hidden.shape[0]
        g, n = self.groups, self.d_state
        xz = self.in_proj(hidden)
        x, z = (xz.chunk(2, dim=-1) if fam.gate is not None else (xz, None))
        x = self._conv_step(x, state)
        dt, B, C = self._mamba1_inputs(x)
        dt = dt.contiguous() if dt is not None else self.dt.to(x.dtype)
        B = B.reshape(b, g, n).contiguous() if B is not None else self._constant("B", x)
        C = C.reshape(b, g, n).contiguous() if C is not None else self._constant("C", x)
        y = self.step_kernel(state.ssm, x.contiguous(), dt, self.A_value(), B, C,
                             D=self._optional("D"),
                             z=z.contiguous() if z is not None else None, dt_bias=self._dt_bias())
        return self.out_proj(y)


__all__ = ["SSMLayer", "SSMState", "RMSNorm", "check_input", "compiled_kernel", "resolve_family"]
