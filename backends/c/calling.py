"""From a bound ``Problem`` (torch tensors, the convention's keyword names) to the C arguments.

``marshal`` gives, for every ``Param`` of the entry point, its value: an int for sizes, a
float32 (or complex64) tensor viewed with exactly the param's logical dims for tensors (None for
NULL), an int64 tensor for cu_seqlens. Inputs that are already fp32 are passed as they are,
strides and all; others are converted to contiguous fp32 here, at the boundary. The same
values feed the ctypes call (build.py) and the cross-target argument file (cross.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ssmc.errors import CallError
from ssmc.ir import Algorithm, Convention
from ssmc.lti import host_coefficients, is_matrix_conv

from .layout import Layout, Param, tensor_names


@dataclass
class Call:
    layout: Layout
    values: Dict[str, object] = field(default_factory=dict)
    out_dtype: torch.dtype = torch.float32
    state_writeback: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (user state, work copy)

    def flat(self) -> List[Tuple[Param, object]]:
        return [(p, self.values.get(p.name)) for p in self.layout.params]


def _get(problem, name: str):
    return getattr(problem, name, None)


def _expected(L: Layout, dim: str, batch: int, seqlen: int, nseq: int) -> int:
    if dim == "b":
        return batch
    if dim in ("l", "k"):
        return seqlen
    if dim == "s":
        return nseq
    return L.sizes[dim]


def _fit_dims(L: Layout, p: Param, t: torch.Tensor) -> torch.Tensor:
    """selective_scan_fn's (b, n, l) B/C (and the step's (b, n)) mean one group."""
    if p.dims in (("b", "g", "n", "l"), ("b", "g", "n")) and t.dim() == len(p.dims) - 1:
        return t.unsqueeze(1)
    return t


def _as_float_view(p: Param, t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise CallError(f"{p.name} is on {t.device}; the C target runs on the CPU")
    if p.is_complex:
        if t.dtype != torch.complex64:
            t = t.to(torch.complex64)
        return t
    if t.is_complex():
        raise CallError(f"{p.name} is complex ({t.dtype}) but this family's {p.name} is real")
    return t if t.dtype == torch.float32 else t.to(torch.float32).contiguous()


def float_strides(p: Param, t: torch.Tensor) -> List[int]:
    """Element strides in floats (a complex element is two floats)."""
    if p.is_complex:
        return list(torch.view_as_real(t).stride()[:-1])
    return list(t.stride())


def _input(L: Layout, p: Param, t, batch, seqlen, nseq):
    if t is None:
        if not p.nullable:
            raise CallError(f"{p.name} is required by {L.plan.family.name}")
        return None
    if not isinstance(t, torch.Tensor):
        raise CallError(f"{p.name} must be a torch tensor, got {type(t).__name__}")
    t = _as_float_view(p, _fit_dims(L, p, t))
    want = tuple(_expected(L, d, batch, seqlen, nseq) for d in p.dims)
    if tuple(t.shape) != want:
        raise CallError(f"{p.name} has shape {tuple(t.shape)}, expected {want} "
                        f"({', '.join(p.dims)})")
    return t


def _empty(L: Layout, p: Param, batch, seqlen, nseq) -> torch.Tensor:
    shape = tuple(_expected(L, d, batch, seqlen, nseq) for d in p.dims)
    dtype = torch.complex64 if p.is_complex else torch.float32
    return torch.full(shape, float("nan"), dtype=dtype)


def _offsets(problem, batch: int):
    cu = _get(problem, "cu_seqlens")
    seq_idx = _get(problem, "seq_idx")
    if cu is None and seq_idx is not None:
        # Without offsets, a seq_idx that changes within a row would reset the state there.
        if bool((seq_idx != seq_idx[..., :1]).any()):
            raise CallError("the C target takes varlen sequences as cu_seqlens; pass cu_seqlens "
                            "(seq_idx alone with several sequences per row is not supported)")
    if cu is None:
        return None, batch
    cu = cu.to(device="cpu", dtype=torch.int64).contiguous()
    if cu.dim() != 1 or cu.numel() < 1:
        raise CallError(f"cu_seqlens must be 1-D (nseq + 1,), got shape {tuple(cu.shape)}")
    return cu, cu.numel() - 1


def marshal(L: Layout, problem) -> Call:
    names = tensor_names(L)
    call = Call(L)
    step = L.plan.algorithm is Algorithm.STEP
    main_name = names["x"]
    main = _get(problem, main_name)
    if main is None:
        raise CallError(f"{main_name} is required")
    call.out_dtype = main.dtype if main.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                  torch.float64) else torch.float32
    batch = int(main.shape[0])
    if step:
        seqlen, cu, nseq = 1, None, batch
    else:
        seqlen = int(main.shape[1] if L.convention is Convention.SSD else main.shape[-1])
        cu, nseq = _offsets(problem, batch)
        if cu is not None and batch != 1:
            raise CallError(f"cu_seqlens needs batch 1 (all sequences concatenated), got {batch}")
        if cu is not None and (int(cu[0]) < 0 or int(cu[-1]) > seqlen
                               or bool((cu[1:] < cu[:-1]).any())):
            raise CallError(f"cu_seqlens must be nondecreasing offsets within [0, {seqlen}]")
    # matrix A's conv takes the host's float64 discretization (ssmc/lti.py), not dt/A/B/P/Q
    host = host_coefficients(L.plan, problem) if is_matrix_conv(L.plan) else {}
    for p in L.params:
        if p.kind == "size":
            call.values[p.name] = {"batch": batch, "seqlen": seqlen, "nseq": nseq}[p.name]
        elif p.kind == "offsets":
            call.values[p.name] = cu
        elif p.role == "in":
            value = host[p.name] if p.name in host else _get(problem, p.name)
            call.values[p.name] = _input(L, p, value, batch, seqlen, nseq)
        elif p.role == "inout":
            user = _get(problem, p.name)
            if user is None:
                raise CallError(f"{p.name} is required")
            work = _input(L, p, user, batch, seqlen, nseq)
            if work.data_ptr() != user.data_ptr() or work.dtype != user.dtype:
                call.state_writeback = (user, work)
            call.values[p.name] = work
        elif p.name == names.get("final"):
            wants = problem.wants_final_state
            call.values[p.name] = _empty(L, p, batch, seqlen, nseq) if wants else None
        else:
            call.values[p.name] = _empty(L, p, batch, seqlen, nseq)
    return call


def results(call: Call):
    """``(y, final_state_or_None)`` after the kernel ran; writes a converted state back."""
    names = tensor_names(call.layout)
    if call.state_writeback is not None:
        user, work = call.state_writeback
        user.copy_(work)
    y = call.values[names["y"]]
    y = y.to(call.out_dtype) if y.dtype != call.out_dtype else y
    if call.layout.plan.algorithm is Algorithm.STEP:
        return y, None
    return y, call.values.get(names["final"])
