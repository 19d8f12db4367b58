"""The calling convention: check a user's call and normalize it into a ``Problem``.

``bind`` is the one place where the arguments of a compiled family are validated (shape, dtype,
device, stride, the arguments the spec fixes, varlen offsets). Every backend then receives the
same normalized tensors, and every mistake is reported once, naming the argument, before
anything runs. ``example_inputs`` draws random valid keyword arguments for a family's signature.

Sizes (docs/calling_convention.md): b batch, l seqlen, h heads, p head_dim, d channels, n state,
g groups, r rank, s sequences (the batch, or the number of packed sequences when varlen).
Normalized forms: selective B/C of the selective scan are always (b, g, n, l); the decode step's
mamba_ssm-style expanded dt (b,h,p), A (h,p,n), dt_bias (h,p), D (h,p) become (b,h), (h,),
(h,), (h,); ``cu_seqlens`` is int64; SSD's ``seq_idx`` is (1, l) int32 whenever varlen.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import CallError
from .plan import require_sizes
from .ir import AStructure, Convention, DType, Method, Sharing, SSMFamily
from .operands import DIM_WORDS as _DIM_WORDS
from .operands import Form, Need, Operand, Role, operand_table
# The problems live in ssmc.problems; importing them from here keeps working.
from .problems import (INF, KEYWORD_ONLY, PAD_SLOT_ID, POSITIONAL, PROBLEMS, Problem,  # noqa: F401
                       SelectiveScanProblem, SSDProblem, StateUpdateProblem)

TORCH_DTYPE = {DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16,
               DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64}
COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


# --------------------------------------------------------------------------------------------
# bind

def _err(msg, hint=None):
    return CallError(msg, hint=hint)


def _dims_text(form: Form, env) -> str:
    comma = "," if len(form.dims) == 1 else ""
    sym = ", ".join(form.dims)
    if not form.dims:
        return "a scalar"
    if not any(d in env for d in form.dims):
        return f"({sym}{comma})"
    val = ", ".join(str(env.get(d, d)) for d in form.dims)
    return f"({sym}{comma}) = ({val}{comma})"


def _as_tensor(name, v):
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        try:
            return torch.from_numpy(v if v.flags.writeable else v.copy())
        except (ValueError, TypeError) as e:
            raise _err(f"argument {name!r}: numpy array cannot become a tensor ({e})") from None
    raise _err(f"argument {name!r} must be a torch tensor or numpy array, got {type(v).__name__}")


class _Binder:
    def __init__(self, family: SSMFamily, ref_name: str):
        self.fam, self.ref_name = family, ref_name
        # Sizes come from the tensors (the spec's dims are defaults for example inputs and
        # models): the first argument that has a dim fixes it for the rest of the call.
        self.env: Dict[str, int] = {}
        # Who fixed each size, for messages: a mismatch names both tensors instead of blaming
        # the later one alone.
        self.fixed_by: Dict[str, str] = {}
        self.inputs = {TORCH_DTYPE[t] for t in family.dtypes.inputs}
        self.ref = None   # the primary input (x / u): fixes dtype and device
        # How each tensor became its normalized form (_normalize), replayed by a later call
        # with the same shape signature; and whether any check read tensor values (a call
        # whose validity depends on values is never replayed).
        self.steps: Dict[str, tuple] = {}
        self.read_values = False
        self.widened: set = set()   # terms taken whole by a form that widens (D (h, p))

    def shape(self, name, t, slot: Operand) -> Form:
        shape = tuple(t.shape)
        for form in slot.forms:
            sizes = tuple(zip(form.dims, shape)) + form.implies
            if len(shape) == len(form.dims) and all(self.env.get(d) in (None, v) for d, v in sizes):
                for dsym, v in sizes:
                    if dsym not in self.env:
                        self.env[dsym] = v
                        self.fixed_by[dsym] = f"argument {name!r} has {_DIM_WORDS[dsym]} {v}"
                return form
        same_rank = [f for f in slot.forms if len(f.dims) == len(shape)]
        expected = " or ".join(_dims_text(f, self.env) for f in slot.forms)
        msg = f"argument {name!r} has shape {shape}; expected {expected}"
        wrong = [i for i, (dsym, v) in enumerate(zip(same_rank[0].dims, shape))
                 if self.env.get(dsym) not in (None, v)] if same_rank else []
        implied = [(d, v) for d, v in (same_rank[0].implies if same_rank else ())
                   if self.env.get(d) not in (None, v)]
        if implied and not wrong:
            dsym, v = implied[0]
            msg += (f": that form has {v} {_DIM_WORDS[dsym]}, but {self.fixed_by[dsym]}")
        if wrong:
            i, dsym = wrong[0], same_rank[0].dims[wrong[0]]
            word = _DIM_WORDS.get(dsym, dsym)
            msg += f": dim {i} ({word}) is {shape[i]}, but {self.fixed_by[dsym]}"
        hint = None
        if not same_rank and any(len(f.dims) == len(shape) for f in slot.other):
            hint = f"that rank fits the other selectivity, but the spec says {slot.what}"
        raise _err(msg, hint)

    def dtype(self, name, t, op: Operand):
        ok = {getattr(torch, d) for d in op.dtypes}
        if op.same_as is not None:
            ok &= {self.ref.dtype} | ({torch.float32} if op.fp32_too else set())
        if t.dtype not in ok:
            names = ", ".join(sorted(str(o).replace("torch.", "") for o in ok))
            why = ""
            if op.same_as is not None:
                why = (f" (per-token inputs share the dtype of {self.ref_name}"
                       + (", or are float32)" if op.fp32_too else ")"))
            elif op.role is Role.INITIAL_STATE:
                why = " (states are kept in the spec's state dtype)"
            if op.complex:
                why = f" ({self.fam.name}'s A is complex diagonal)"
            raise _err(f"argument {name!r} has dtype {str(t.dtype).replace('torch.', '')}; "
                       f"expected {names}{why}")

    def tensor(self, name, v, slot: Operand):
        if not isinstance(v, torch.Tensor):
            self.read_values = True     # a numpy array: converted, not replayed
        t = _as_tensor(name, v)
        if self.ref is not None and t.device != self.ref.device:
            raise _err(f"argument {name!r} is on {t.device} but {self.ref_name} is on "
                       f"{self.ref.device}; all tensors must be on one device")
        form = self.shape(name, t, slot)
        if self.ref is None:
            if t.dtype not in self.inputs:
                names = ", ".join(sorted(str(o).replace("torch.", "") for o in self.inputs))
                raise _err(f"argument {name!r} has dtype {str(t.dtype).replace('torch.', '')}; "
                           f"the spec's input dtypes are {names}")
        else:
            self.dtype(name, t, slot)
        if form.expanded:
            broadcast = all(t.shape[ax] == 1 or t.stride(ax) == 0 for ax in form.expanded)
            if not broadcast and form.widens:
                self.widened.add(name)
                return self._normalize(name, t, ("whole",))
            if not broadcast:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise _err(f"argument {name!r} is a full {tuple(t.shape)} tensor under CUDA "
                               f"graph capture, where its values cannot be checked",
                               f"pass it expanded (stride 0) along "
                               + ", ".join(_DIM_WORDS[form.dims[ax]] for ax in form.expanded))
                self.read_values = True
                for ax in sorted(form.expanded):
                    if t.shape[ax] > 1 and not torch.equal(t, t.narrow(ax, 0, 1).expand_as(t)):
                        raise _err(f"argument {name!r} varies along {_DIM_WORDS[form.dims[ax]]} "
                                   f"but the spec says {slot.what}")
            return self._normalize(name, t, ("select", tuple(ax for ax in range(t.dim())
                                                             if ax not in form.expanded)))
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise _err(f"argument {name!r} must be contiguous along its last dim "
                       f"({_DIM_WORDS.get(form.dims[-1], form.dims[-1])}); got strides "
                       f"{tuple(t.stride())} (stride {t.stride(-1)} along the last dim)",
                       "call .contiguous() on it first")
        if form.insert is not None:
            return self._normalize(name, t, ("unsqueeze", form.insert))
        return self._normalize(name, t, ("whole",))

    def _normalize(self, name, t, step):
        self.steps[name] = step
        return normalize(t, step)


def normalize(t: torch.Tensor, step: tuple) -> torch.Tensor:
    """One argument's normalized form: ``("whole",)`` as given, ``("select", kept axes)`` the
    broadcast axes dropped, ``("unsqueeze", axis)`` an axis added ((b, n, l) -> (b, 1, n, l))."""
    kind = step[0]
    if kind == "select":
        # t.select(ax, 0) for each broadcast axis, as one view (a call's cost is mostly per
        # torch op)
        shape, stride = t.shape, t.stride()
        return t.as_strided([shape[ax] for ax in step[1]], [stride[ax] for ax in step[1]],
                            t.storage_offset()).contiguous()
    if kind == "unsqueeze":
        return t.unsqueeze(step[1])
    if kind == "contiguous":
        return t.contiguous()
    return t


def _flag(name, v, spec_value: bool, what: str, fam):
    if v is None:
        return spec_value
    if not isinstance(v, (bool, np.bool_, int)):
        raise _err(f"argument {name!r} must be a bool, got {type(v).__name__}")
    if bool(v) != spec_value:
        raise _err(f"argument {name}={bool(v)} contradicts the spec: {fam.name} "
                   f"{'applies' if spec_value else 'does not apply'} {what}",
                   "omit it (None means the spec's value)")
    return spec_value


def _limit(v, fam):
    spec = tuple(float(x) for x in fam.delta.clamp) if fam.delta.clamp else (0.0, INF)
    if v is None:
        return spec
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        raise _err(f"argument 'dt_limit' must be a pair (lo, hi), got {v!r}") from None
    same = all(a == b or math.isclose(a, b, rel_tol=1e-9) for a, b in zip((lo, hi), spec))
    if not same:
        raise _err(f"argument dt_limit={(lo, hi)} contradicts the spec: {fam.name} clamps Δ to "
                   f"{spec}", "omit it (None means the spec's value)")
    return spec


def _offsets(cu, batch, seqlen, device):
    """cu_seqlens checked and as int64 on the tensors' device."""
    if isinstance(cu, (list, tuple)):
        cu = torch.tensor(cu, dtype=torch.int64, device=device)
    cu = _as_tensor("cu_seqlens", cu)
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise _err(f"argument 'cu_seqlens' must be a 1-d int32/int64 tensor of nseq+1 offsets, "
                   f"got shape {tuple(cu.shape)} dtype {str(cu.dtype).replace('torch.', '')}")
    if cu.device != device:
        raise _err(f"argument 'cu_seqlens' is on {cu.device} but the inputs are on {device}")
    if batch != 1:
        raise _err(f"argument 'cu_seqlens' packs sequences along l, so the batch must be 1; "
                   f"got batch {batch}")
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != seqlen or any(b < a for a, b in zip(vals, vals[1:])):
        raise _err(f"argument 'cu_seqlens' must be non-decreasing offsets from 0 to seqlen "
                   f"{seqlen}; got {vals if len(vals) <= 12 else vals[:6] + ['...'] + vals[-3:]}")
    return cu.to(torch.int64), vals


def _seq_idx_of(offsets, seqlen, device):
    pos = torch.arange(seqlen, dtype=torch.int64)
    idx = torch.searchsorted(torch.tensor(offsets[1:], dtype=torch.int64), pos, right=True)
    return idx.to(torch.int32).reshape(1, seqlen).to(device)


_NAMES = {conv: frozenset(POSITIONAL[conv] + KEYWORD_ONLY[conv]) for conv in POSITIONAL}


def collect(conv, args, kwargs):
    """A call's arguments by name; a CallError for too many, unknown or doubled ones."""
    pos = POSITIONAL[conv]
    if len(args) > len(pos):
        raise _err(f"{conv.value} takes at most {len(pos)} positional arguments "
                   f"({', '.join(pos)}); got {len(args)}")
    values = dict(zip(pos, args))
    names = _NAMES[conv]
    # Plain loops and set membership: dynamo traces this (the op wrapper calls it), and it runs
    # on every call.
    for k, v in (kwargs or {}).items():
        if k not in names:
            raise _err(f"unexpected keyword argument {k!r} for the {conv.value} convention",
                       f"it takes: {', '.join(pos + KEYWORD_ONLY[conv])}")
        if k in values:
            raise _err(f"argument {k!r} given both by position and by keyword")
        values[k] = v
    return values


def _presence(fam: SSMFamily, table, values, env):
    """Tensors the family needs must be given; tensors it does not have must not be."""
    for op in table.arguments:
        if op.need is Need.ABSENT and values.get(op.name) is not None:
            raise _err(f"argument {op.name!r} was given but {fam.name} {op.why}")
    required = sorted(table.required(), key=lambda k: (k != table.primary, k))
    for name in required:
        if values.get(name) is None:
            raise _err(f"argument {name!r} is missing: {fam.name} needs it, shaped "
                       f"{_dims_text(table[name].forms[0], env)}")


def _varlen(binder: _Binder, values, table, conv, batch, seqlen, device):
    """(cu_seqlens int64 or None, seq_idx (1, l) int32 or None, nseq), checked and derived."""
    cu, seq_idx, offsets = values.get("cu_seqlens"), values.get("seq_idx"), None
    if cu is not None:
        cu, offsets = _offsets(cu, batch, seqlen, device)
    if seq_idx is not None:
        seq_idx = binder.tensor("seq_idx", seq_idx, table["seq_idx"])
        if batch != 1:
            raise _err(f"argument 'seq_idx' describes sequences packed along l and needs batch 1; "
                       f"got batch {batch}")
        ids = seq_idx[0].tolist()
        if any(b < a for a, b in zip(ids, ids[1:])) or (ids and ids[0] < 0):
            raise _err("argument 'seq_idx' must be non-decreasing sequence numbers from 0")
        # offset k = how many tokens belong to sequences before k (empty sequences allowed)
        from_ids = torch.searchsorted(torch.tensor(ids, dtype=torch.int64),
                                      torch.arange((ids[-1] + 1 if ids else 1) + 1)).tolist()
        if offsets is None:
            offsets = from_ids
            cu = torch.tensor(offsets, dtype=torch.int64, device=device)
        elif not torch.equal(seq_idx.to(torch.int32), _seq_idx_of(offsets, seqlen, device)):
            raise _err("arguments 'seq_idx' and 'cu_seqlens' describe different sequences")
        seq_idx = seq_idx.to(torch.int32)
    elif offsets is not None and conv is Convention.SSD:
        seq_idx = _seq_idx_of(offsets, seqlen, device)
    return cu, seq_idx, (len(offsets) - 1 if offsets is not None else batch)


def bind(family: SSMFamily, convention, args: Sequence = (), kwargs: Optional[dict] = None):
    """Validate one call of ``family`` under ``convention``; returns the normalized Problem.

    Raises ``CallError`` naming the offending argument (expected vs got) before anything runs.
    A call whose tensors have the shapes, strides, dtypes and devices of an earlier valid call,
    and whose other arguments are equal, is not checked again: the earlier call's normalization
    is replayed (no tensor values are read, nothing syncs; what a decode step in a CUDA graph
    needs). A call whose validity depends on tensor values (``cu_seqlens``, ``seq_idx``, a
    materialized broadcast, numpy arrays) is checked every time.
    """
    conv = Convention(convention)
    values = collect(conv, args, kwargs)
    key = _shape_signature(conv, values)
    replays = _REPLAYS.get(id(family))
    if replays is None:
        # Keyed by the family object (its value hash walks sympy trees); the entry holds the
        # family so that its id is not reused while the entry lives.
        if len(_REPLAYS) >= _REPLAY_LIMIT:
            _REPLAYS.clear()
        replays = _REPLAYS[id(family)] = (family, {})
    try:
        replay = replays[1].get(key) if key is not None else None
    except TypeError:           # an argument that cannot be hashed: check the call
        key = replay = None
    if replay is not None:
        return replay(values, key)
    problem, replay = _bind(family, conv, values)
    if key is not None and replay is not None:
        object.__setattr__(problem, "signature", key)
        if len(replays[1]) >= _REPLAY_LIMIT:
            replays[1].clear()
        replays[1][key] = replay
    return problem


_REPLAYS: Dict[int, tuple] = {}
_REPLAY_LIMIT = 4096            # families, and signatures per family


def _shape_signature(conv, values) -> Optional[tuple]:
    """What a call's validity depends on, when it does not depend on tensor values; None when
    it may (index tensors are checked by value). Other arguments enter as they are: one that
    cannot be hashed (a list) makes the lookup fail, and the call is checked."""
    if values.get("cu_seqlens") is not None or values.get("seq_idx") is not None:
        return None
    dt_limit = values.get("dt_limit")
    if dt_limit is not None and not isinstance(dt_limit, tuple):
        return None             # a list or a tensor: its values are what is checked
    # One flat tuple, built in a loop: this runs on every decode step. Each entry is a name
    # then (shape, strides, dtype, device) for a tensor or (type, value) otherwise, with the
    # type because 1.0 == True hashes alike and bind refuses the float.
    tensor = torch.Tensor
    key = [conv]
    for name, v in values.items():
        if isinstance(v, tensor):
            key += (name, v.shape, v.stride(), v.dtype, v.device)
        else:
            key += (name, type(v), v)
    return tuple(key)


def _contiguous(shape, stride) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _replayer(fields: dict, values: dict, steps: Dict[str, tuple], conv: Convention, gather):
    """The Problem of a later call with the same shape signature: the same sizes, family and
    options; its tensors normalized the same way."""
    static = {k: v for k, v in fields.items() if k not in steps}
    cls = PROBLEMS[conv]
    whole = tuple(name for name, step in steps.items() if step == ("whole",))
    # The signature fixes a broadcast's shape and strides, so its normalized view is one
    # as_strided whose sizes and strides are known now (and a copy only if it was one now).
    views, other = [], []
    for name, step in steps.items():
        if step[0] == "select":
            t = values[name]
            shape = [t.shape[ax] for ax in step[1]]
            stride = [t.stride(ax) for ax in step[1]]
            if _contiguous(shape, stride):
                views.append((name, shape, stride))
                continue
        if step != ("whole",):
            other.append((name, step))
    new = object.__new__

    def replay(values, signature):
        tensors = {name: values[name] for name in whole}
        for name, shape, stride in views:
            t = values[name]
            tensors[name] = t.as_strided(shape, stride, t.storage_offset())
        for name, step in other:
            tensors[name] = normalize(values[name], step)
        if gather is not None:
            tensors = gather(tensors)
        # The fields a checked call of this signature had; the dataclass's __init__ is skipped
        # (its defaults are class attributes), a few microseconds of every decode step.
        problem = new(cls)
        problem.__dict__.update(static)
        problem.__dict__.update(tensors)
        problem.__dict__["signature"] = signature
        return problem
    return replay


def _bind(fam: SSMFamily, conv: Convention, values: dict):
    """The checks and the normalization: (Problem, a replayer for calls of the same shape
    signature or None)."""
    st = fam.A.structure
    if conv is not Convention.STATE_UPDATE and (conv is Convention.SSD) != (st is AStructure.SCALAR):
        need = "A scalar per head" if conv is Convention.SSD else "an A that is not scalar per head"
        raise _err(f"the {conv.value} convention needs {need}; {fam.name}'s A is {st.value}")
    if conv is Convention.STATE_UPDATE and fam.method is Method.TRAPEZOIDAL:
        raise _err(f"{fam.name} uses the trapezoidal method, whose decode step needs the previous "
                   "token's B x; the state_update convention carries only the state",
                   "run the scan/chunked form, or ask for a convention with a previous-input cache")
    table = operand_table(fam, conv)
    primary = table.primary
    binder = _Binder(fam, primary)
    _presence(fam, table, values, binder.env)

    # The primary input fixes batch, seqlen, dtype and device.
    x = binder.ref = binder.tensor(primary, values[primary], table[primary])
    batch, seqlen = x.shape[0], binder.env.setdefault("l", 1)
    cu, seq_idx, nseq = _varlen(binder, values, table, conv, batch, seqlen, x.device)
    if cu is not None or seq_idx is not None:
        binder.read_values = True
    binder.env["s"] = nseq
    binder.fixed_by["s"] = (f"'cu_seqlens' holds {nseq} sequences" if cu is not None
                            else f"argument {primary!r} has batch {nseq}")
    slots = _slot_indices(binder, values, table, conv, x.device)
    pooled = "state" if conv is Convention.STATE_UPDATE else table.keyword.get("initial")
    fields = {primary: x}
    for op in table.tensors():
        name = op.name
        if name not in fields and op.role is not Role.INDEX and values.get(name) is not None:
            if slots is not None and name == pooled:
                op = _pool_operand(op)
            fields[name] = binder.tensor(name, values[name], op)
    if slots is not None:
        fields["state_batch_indices"] = slots
        binder.steps["state_batch_indices"] = ("whole",) if slots is values[
            "state_batch_indices"] else ("contiguous",)

    fam = _sized_family(fam, binder)
    omitted = tuple(key for key in table.droppable_terms()
                    if values.get(table.keyword.get(key, key)) is None)
    if omitted:
        fam = without_terms(fam, omitted)
    if binder.widened:
        fam = with_full_terms(fam, tuple(sorted(binder.widened)))
    pos = POSITIONAL[conv]
    softplus = "delta_softplus" if conv is Convention.SELECTIVE_SCAN else "dt_softplus"
    fields.update(family=fam, nseq=nseq, dt_limit=_limit(values.get("dt_limit"), fam))
    fields[softplus] = _flag(softplus, values.get(softplus), fam.delta.softplus, "softplus to Δ",
                             fam)
    for flag in ("return_final_states", "return_last_state", "return_varlen_states"):
        if flag in pos:
            fields[flag] = _bool(flag, values.get(flag))
    if "pad_slot_id" in table:
        fields["pad_slot_id"] = _pad_slot(values.get("pad_slot_id"))
    if "cu_seqlens" in pos:
        fields["cu_seqlens"] = cu
    gather = None
    if conv is Convention.SSD:
        fields.update(seq_idx=seq_idx, chunk_size=_chunk(values.get("chunk_size"), fam))
        if fields["return_varlen_states"] and values.get("cu_seqlens") is None:
            # as mamba_ssm asks; with seq_idx alone the number of states would be a value
            raise _err("return_varlen_states=True needs the packed sequences as cu_seqlens "
                       "(seq_idx alone does not say how many states to return)")
        init = fields.get("initial_states")
        if slots is not None and init is not None:
            pad = fields["pad_slot_id"]
            gather = lambda t: _gather_initial(t, pad)  # noqa: E731
            fields.update(gather(fields))
        elif init is not None and cu is not None and init.shape[0] != nseq:
            # mamba_ssm's (b, h, p, n) with packed sequences: the first sequence's state.
            first = torch.zeros((nseq,) + tuple(init.shape[1:]), dtype=init.dtype,
                                device=init.device)
            first[0] = init[0]
            fields["initial_states"] = first
    problem = PROBLEMS[conv](**fields)
    if binder.read_values:
        return problem, None
    return problem, _replayer(fields, values, binder.steps, conv, gather)


def _pool_operand(op: Operand) -> Operand:
    """The state (or initial states) as a pool of slots that state_batch_indices picks from."""
    return dataclasses.replace(op, forms=(Form(("c",) + op.dims[1:]),))


def _slot_indices(binder: _Binder, values, table, conv, device):
    """state_batch_indices, checked: 1-d integers, one per batch row (per sequence for the
    initial states of packed sequences), on the inputs' device. Their values are checked
    where that costs no sync (on the CPU); on a GPU an index outside the pool that is not the
    pad slot is treated as the pad slot: never read or written."""
    idx = values.get("state_batch_indices")
    if idx is None:
        return None
    if conv is Convention.SSD and values.get("initial_states") is None:
        raise _err("argument 'state_batch_indices' picks the initial states' slots: pass the "
                   "pool of states as initial_states")
    idx = _as_tensor("state_batch_indices", idx)
    rows = binder.env["s"] if conv is Convention.SSD else binder.env["b"]
    what = "sequences" if conv is Convention.SSD else "batch rows"
    if idx.dim() != 1 or idx.shape[0] != rows or idx.dtype not in (torch.int32, torch.int64):
        raise _err(f"argument 'state_batch_indices' must be a 1-d int32/int64 tensor of one slot "
                   f"per {what[:-1]} ({rows} {what}), got shape {tuple(idx.shape)} dtype "
                   f"{str(idx.dtype).replace('torch.', '')}")
    if idx.device != device:
        raise _err(f"argument 'state_batch_indices' is on {idx.device} but the inputs are on "
                   f"{device}")
    if idx.device.type == "cpu":
        binder.read_values = True
        pool = values["state" if conv is Convention.STATE_UPDATE else "initial_states"]
        slots = pool.shape[0] if isinstance(pool, torch.Tensor) and pool.dim() else 0
        pad = _pad_slot(values.get("pad_slot_id"))
        bad = idx[~live_slots(idx, pad, slots) & (idx != pad)].tolist()
        if bad:
            raise _err(f"argument 'state_batch_indices' holds slot {bad[0]}, outside the pool of "
                       f"{slots} slots (and not the pad slot {pad})")
    # Kernels read one slot per row with unit stride: a strided view (a column of a table) is
    # copied, here and on every replay (the stride is in the signature).
    return idx if idx.stride(0) == 1 or idx.shape[0] <= 1 else idx.contiguous()


def live_slots(idx: torch.Tensor, pad: int, slots: int) -> torch.Tensor:
    """Which rows of state_batch_indices name a state (a bool tensor beside ``idx``): not the
    pad slot and inside the pool of ``slots``. What the Triton step computes as ``live``; a row
    that is not is neither read nor written."""
    return (idx != pad) & (idx >= 0) & (idx < slots)


def _gather_initial(tensors: dict, pad: int) -> dict:
    """Each sequence's initial state picked from the pool by state_batch_indices; a padded
    sequence (or one whose index is outside the pool) starts from zeros. Tensor ops only: no
    value is read on the host."""
    pool, idx = tensors["initial_states"], tensors["state_batch_indices"]
    ok = live_slots(idx, pad, pool.shape[0])
    picked = pool.index_select(0, torch.where(ok, idx, torch.zeros_like(idx)))
    ok = ok.view(-1, *([1] * (pool.dim() - 1)))
    return dict(tensors, initial_states=torch.where(ok, picked, torch.zeros_like(picked)))


def _pad_slot(v) -> int:
    if v is None:
        return PAD_SLOT_ID
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _err(f"argument 'pad_slot_id' must be an int, got {v!r}")
    return int(v)


def sizes_from_shapes(family: SSMFamily, convention, shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """The sizes a call's tensors show, from their shapes alone (no values, no checks): what a
    fake implementation under torch.compile needs to state output shapes. The first form of
    each argument's rank decides, as ``bind`` would for a valid call."""
    table = operand_table(family, Convention(convention))
    env: Dict[str, int] = {}
    for name, shape in shapes.items():
        op = table[name] if name in table else None
        form = next((f for f in op.forms if len(f.dims) == len(shape)), None) if op else None
        if form is not None:
            for dsym, v in tuple(zip(form.dims, shape)) + form.implies:
                env.setdefault(dsym, int(v))
    return env


def _sized_family(fam: SSMFamily, binder: _Binder) -> SSMFamily:
    """``fam`` with the sizes this call's tensors have (the same object when they are the
    spec's): the kernel that runs is specialized for them. Checks what the structure needs of
    sizes no single tensor shows (groups dividing the heads or channels)."""
    env, dims = binder.env, fam.dims
    ssd_like = fam.A.structure is AStructure.SCALAR
    unit = "h" if ssd_like else "d"
    # No tensor of the call has a groups axis (B and C per head, or a (b, n, l) form): the
    # spec's groups if they still divide, else one; nothing reads it.
    spec_groups = dims.groups or 1      # 0: left open by the spec
    groups = env.get("g", spec_groups if env[unit] % spec_groups == 0 else 1)
    if env[unit] % groups:
        raise _err(f"{binder.fixed_by['g']}, which does not divide the {env[unit]} "
                   f"{_DIM_WORDS[unit]} ({binder.fixed_by[unit]})",
                   "each group of B/C is shared by an equal number of "
                   + ("heads" if ssd_like else "channels"))
    return resized(fam, **_size_words(env, ssd_like, groups, dims))


def _size_words(env, ssd_like: bool, groups: int, dims) -> dict:
    if ssd_like:
        return dict(heads=env["h"], head_dim=env["p"], state=env["n"], groups=groups)
    return dict(channels=env["d"], state=env["n"], groups=groups, rank=env.get("r", dims.rank))


@lru_cache(maxsize=256)
def without_terms(fam: SSMFamily, terms: Tuple[str, ...]) -> SSMFamily:
    """``fam`` without the optional terms a call omitted (``D``, ``z``, ``dt_bias``), as
    mamba_ssm computes with None: no skip, no gate, Δ without its bias. One object per
    (family, terms): the call runs the kernel generated for that family."""
    changes = {}
    if "D" in terms:
        changes["D"] = None
    if "z" in terms:
        changes["gate"] = None
    if "dt_bias" in terms:
        changes["delta"] = dataclasses.replace(fam.delta, bias=False)
    return dataclasses.replace(fam, **changes)


@lru_cache(maxsize=256)
def with_full_terms(fam: SSMFamily, terms: Tuple[str, ...]) -> SSMFamily:
    """``fam`` with the terms a call gave whole where the spec has them per head: D of shape
    (h, p) is D per head x head_dim, as mamba_ssm takes it."""
    if "D" in terms and fam.D is not None:
        return dataclasses.replace(fam, D=dataclasses.replace(fam.D, sharing=Sharing.HEAD_DIM))
    return fam


SIZE_NAMES = ("heads", "head_dim", "channels", "state", "groups", "rank")


@lru_cache(maxsize=256)
def _resized(fam: SSMFamily, sizes: Tuple[int, ...], open_sizes: Tuple[str, ...]) -> SSMFamily:
    return dataclasses.replace(fam, dims=dataclasses.replace(
        fam.dims, open=open_sizes, **dict(zip(SIZE_NAMES, sizes))))


def resized(fam: SSMFamily, **sizes: int) -> SSMFamily:
    """``fam`` with other sizes (``heads``, ``head_dim``, ``channels``, ``state``, ``groups``,
    ``rank``); one object per (family, sizes), so that kernels specialized for a size are found
    by it. A size the spec leaves open is given this way (or by a call's tensors). A scalar-A
    family's channels follow heads x head_dim."""
    unknown = set(sizes) - set(SIZE_NAMES)
    if unknown:
        raise _err(f"unknown size {sorted(unknown)[0]!r}; sizes are {', '.join(SIZE_NAMES)}")
    for name, value in sizes.items():
        if not (isinstance(value, (int, np.integer)) and value > 0) and not (name == "rank"
                                                                              and value == 0):
            raise _err(f"size {name}={value!r} must be a positive int")
    if fam.A.structure is AStructure.SCALAR and (fam.dims.channels or fam.dims.open):
        heads = sizes.get("heads", fam.dims.heads)
        sizes["channels"] = heads * sizes.get("head_dim", fam.dims.head_dim)
    still_open = tuple(n for n in fam.dims.open if n not in sizes)
    if all(getattr(fam.dims, k) == v for k, v in sizes.items()) and still_open == fam.dims.open:
        return fam          # the spec's sizes: the caller's own object (kernels compare by identity)
    full = dict({k: getattr(fam.dims, k) for k in SIZE_NAMES}, **sizes)
    return _resized(fam, tuple(int(full[k]) for k in SIZE_NAMES), still_open)


def _chunk(chunk, fam):
    if chunk is None:
        return fam.compute.chunk_size
    if not (isinstance(chunk, (int, np.integer)) and chunk > 0):
        raise _err(f"argument 'chunk_size' must be a positive int, got {chunk!r}")
    if fam.compute.chunk_size is not None and chunk != fam.compute.chunk_size:
        raise _err(f"argument chunk_size={chunk} contradicts the spec: {fam.name} is compiled for "
                   f"chunks of {fam.compute.chunk_size}", "omit it (None means the spec's value)")
    return int(chunk)


def _bool(name, v):
    if v is None:
        return False
    if not isinstance(v, (bool, np.bool_, int)):
        raise _err(f"argument {name!r} must be a bool, got {type(v).__name__}")
    return bool(v)


# --------------------------------------------------------------------------------------------
# example_inputs

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def example_inputs(family: SSMFamily, convention=None, batch: int = 2, seqlen: int = 64,
                   dtype="float32", device="cpu", seed: int = 0, *, with_state: bool = False,
                   varlen: Optional[Sequence[int]] = None) -> dict:
    """Random valid keyword arguments for ``family`` under ``convention`` (default: the family's).

    Reproducible from ``seed``. Per-token tensors are in ``dtype``; learned parameters fp32;
    states in the state dtype. Values follow the usual initializations: Δ log-uniform in
    [1e-3, 1e-1] after softplus(dt + dt_bias); Mamba-1 A = -(1..n) per channel, Mamba-2 A in
    [-16, -1]; complex A = -1/2 + i pi k (S4D-Lin); B, C, x, z, D standard normal.
    ``with_state`` adds an initial state and asks for the final one; ``varlen`` (a list of
    sequence lengths) packs them into batch 1 with ``cu_seqlens`` (batch and seqlen are then
    taken from it). For the state_update convention ``seqlen`` is ignored and ``state`` included.
    """
    require_sizes(family, "example_inputs", "as keywords: example_inputs({sizes})")
    conv = Convention(convention) if convention is not None else family.convention
    act_dtype = _DTYPE_NAMES[dtype] if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed(int(seed))
    fam, dims = family, family.dims
    st = fam.A.structure
    step = conv is Convention.STATE_UPDATE
    scalar, cplx = st is AStructure.SCALAR, st is AStructure.COMPLEX_DIAGONAL
    h, p, n, g, r, d = dims.heads, dims.head_dim, dims.state, dims.groups, dims.rank, dims.d_inner
    unit = h if scalar else d
    lengths = None
    if varlen is not None:
        if step:
            raise ValueError("varlen has no meaning for the state_update convention")
        lengths = [int(v) for v in varlen]
        batch, seqlen = 1, sum(lengths)
    steps = 1 if step else seqlen
    nseq = len(lengths) if lengths is not None else batch

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def crandn(*shape):
        return torch.complex(randn(*shape), randn(*shape)) / math.sqrt(2.0)

    def log_uniform(lo, hi, *shape):
        return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo))
                         * torch.rand(shape, generator=gen, dtype=torch.float64))

    def inv_softplus(y):
        return torch.log(torch.expm1(y))

    def a_values(*lead):
        base = torch.arange(1, n + 1, dtype=torch.float64)
        if scalar:
            return -(1.0 + 15.0 * torch.rand(lead, generator=gen, dtype=torch.float64))
        if cplx:
            re = -0.5 * torch.exp(0.1 * randn(*lead, n))
            return torch.complex(re, math.pi * (base - 1) + 0.1 * randn(*lead, n))
        # Jitter the log so that a kernel reading the wrong channel's A cannot pass by symmetry.
        diag = -base * torch.exp(0.1 * randn(*lead, n))
        if st is AStructure.DENSE:
            return torch.diag_embed(diag) + 0.5 * randn(*lead, n, n) / math.sqrt(n)
        return diag

    # Token-major (b, L, ...) first; the selective scan moves L last, the step drops it.
    def per_token(t):
        t = t.to(COMPLEX_OF[torch.float32] if t.is_complex() else act_dtype)
        if step:
            return t.squeeze(1).contiguous()
        return t.movedim(1, -1).contiguous() if conv is Convention.SELECTIVE_SCAN else t

    def param(t):
        return t.to(torch.complex64 if t.is_complex() else torch.float32).contiguous()

    x_shape = (batch, steps, h, p) if scalar else (batch, steps, d)
    out = {}
    names = {Convention.SSD: ("x", "dt", "dt_bias", "initial_states", "return_final_states"),
             Convention.SELECTIVE_SCAN: ("u", "delta", "delta_bias", "initial_state",
                                         "return_last_state"),
             Convention.STATE_UPDATE: ("x", "dt", "dt_bias", "state", None)}[conv]
    x_name, dt_name, bias_name, state_name, ret_name = names
    out[x_name] = per_token(randn(*x_shape))

    # Δ* log-uniform in [1e-3, 1e-1]; dt and dt_bias chosen so that the spec's map gives Δ*.
    target = log_uniform(1e-3, 1e-1, *((batch, steps, unit) if fam.delta.selective else (unit,)))
    pre = inv_softplus(target) if fam.delta.softplus else target
    if fam.delta.bias:
        bias_target = log_uniform(1e-3, 1e-1, unit)
        bias = inv_softplus(bias_target) if fam.delta.softplus else 0.5 * bias_target
        out[bias_name] = param(bias)
        pre = pre - bias
    out[dt_name] = per_token(pre) if fam.delta.selective else param(pre)

    out["A"] = per_token(a_values(batch, steps, unit)) if fam.A.selective else param(a_values(unit))
    if st is AStructure.DPLR:
        out["P"] = param(0.3 * randn(d, r, n) / math.sqrt(n))
        out["Q"] = param(0.3 * randn(d, r, n) / math.sqrt(n))
    for name, spec in (("B", fam.B), ("C", fam.C)):
        draw = crandn if cplx else randn
        if spec.selective:
            out[name] = per_token(draw(batch, steps, g, n))
        else:
            out[name] = param(draw(g if spec.sharing is Sharing.GROUP else unit, n))
    if fam.D is not None:
        out["D"] = param(randn(h, p) if fam.D.sharing is Sharing.HEAD_DIM and scalar
                         else randn(unit))
    if fam.gate is not None:
        out["z"] = per_token(randn(*x_shape))
    state_shape = (h, p, n) if scalar else (d, n)
    state_dtype = TORCH_DTYPE[fam.dtypes.state]
    if step or with_state:
        s = (crandn if cplx else randn)(batch if step else nseq, *state_shape)
        out[state_name] = s.to(COMPLEX_OF[state_dtype] if cplx else state_dtype)
        if ret_name:
            out[ret_name] = True
    if lengths is not None:
        out["cu_seqlens"] = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    order = POSITIONAL[conv] + KEYWORD_ONLY[conv]
    return {k: out[k].to(device) if isinstance(out[k], torch.Tensor) else out[k]
            for k in sorted(out, key=order.index)}
