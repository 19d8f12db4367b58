"""The normalized calls: one ``Problem`` dataclass per calling convention
(docs/calling_convention.md).

``ssmc.signature.bind`` builds them; every backend reads them. The fields of each are the
keyword names of its convention's signature, in the order the signature takes them
positionally (keyword-only arguments last), so that ``POSITIONAL`` is read off the dataclass
instead of being a second list that has to agree with it. ``family``, ``nseq`` and
``convention`` are not arguments: ``bind`` fills them in.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

from .ir import Convention, SSMFamily

if TYPE_CHECKING:   # the annotations only: planning (ssmc.operands) reads this without torch
    import torch

INF = float("inf")
# The slot index that marks a padded batch row (vLLM's PAD_SLOT_ID): its state is neither read
# nor written.
PAD_SLOT_ID = -1
_NOT_ARGUMENTS = ("family", "nseq", "convention")


@dataclass(frozen=True, eq=False)
class _ProblemBase:
    """What every problem has; the family fixes h, p, d, n, g, r, the tensors b and l.

    A subclass names the fields that play the roles every backend asks about, as properties:
    ``input`` (the primary input: x or u), ``seqlen``, ``initial`` (the incoming state or None)
    and ``wants_final_state``.
    """
    family: SSMFamily
    # The call's shape signature (ssmc.signature): equal for two calls whose tensors have the
    # same shapes, strides, dtypes and devices and whose other arguments are equal, None when
    # validity depends on values. What a backend derives from shapes alone (a launch's grid
    # and layout) it may keep by this key. Not a field: bind sets it.
    signature = None

    heads = property(lambda self: self.family.dims.heads)
    head_dim = property(lambda self: self.family.dims.head_dim)
    channels = property(lambda self: self.family.dims.d_inner)
    state_size = property(lambda self: self.family.dims.state)
    groups = property(lambda self: self.family.dims.groups)
    rank = property(lambda self: self.family.dims.rank)
    varlen = property(lambda self: getattr(self, "cu_seqlens", None) is not None)
    batch = property(lambda self: self.input.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype

    @property
    def device(self) -> torch.device:
        return self.input.device

    @property
    def seq_offsets(self) -> Tuple[int, ...]:
        """Start offsets of the sequences plus the end: (0, l) unless varlen."""
        if self.varlen:
            return tuple(int(v) for v in self.cu_seqlens.tolist())
        return (0, self.seqlen)

    @classmethod
    def argument_names(cls) -> Tuple[str, ...]:
        """The convention's keyword names, in positional order (keyword-only ones last)."""
        return tuple(f.name for f in fields(cls) if f.name not in _NOT_ARGUMENTS)

    def kwargs(self) -> Dict[str, object]:
        """The normalized call as keyword arguments (bind(family, convention, (), kwargs()) works)."""
        return {k: getattr(self, k) for k in self.argument_names()}


@dataclass(frozen=True, eq=False)
class SSDProblem(_ProblemBase):
    """mamba_chunk_scan_combined: x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n), ..."""
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    chunk_size: Optional[int] = None
    D: Optional[torch.Tensor] = None
    z: Optional[torch.Tensor] = None
    dt_bias: Optional[torch.Tensor] = None
    initial_states: Optional[torch.Tensor] = None
    seq_idx: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    dt_softplus: bool = False
    dt_limit: Tuple[float, float] = (0.0, INF)
    return_final_states: bool = False
    return_varlen_states: bool = False
    state_batch_indices: Optional[torch.Tensor] = None
    pad_slot_id: int = PAD_SLOT_ID
    nseq: int = 0
    convention: Convention = field(default=Convention.SSD, init=False)

    input = property(lambda self: self.x)
    seqlen = property(lambda self: self.x.shape[1])
    initial = property(lambda self: self.initial_states)
    # The kernels write each sequence's final state; mamba_ssm's final_states is each batch
    # row's (for packed sequences the last one's), its varlen_states each sequence's.
    wants_final_state = property(lambda self: self.return_final_states
                                 or self.return_varlen_states)

    def _last_sequence(self, count: int):
        """The index of the sequence holding the last token (trailing empty sequences, as
        padding makes them, hold none); found on the device, without a host read."""
        import torch
        last = torch.searchsorted(self.cu_seqlens, self.cu_seqlens[-1:] - 1, right=True) - 1
        return last.clamp(0, count - 1)

    def _row_final(self, final):
        """The batch row's final state with packed sequences: that of the sequence holding the
        last token."""
        return final.index_select(0, self._last_sequence(final.shape[0]))

    def state_gradient(self, d_final_states=None, d_varlen_states=None):
        """The adjoint of ``outputs``'s states: the gradient of the kernels' final state (one
        per sequence) given those of final_states and varlen_states (None: zero)."""
        total = d_varlen_states if self.return_varlen_states else None
        if self.return_final_states and d_final_states is not None:
            part = d_final_states
            if self.varlen:
                part = d_final_states.new_zeros((self.nseq,) + tuple(d_final_states.shape[1:]))
                part.index_add_(0, self._last_sequence(self.nseq), d_final_states)
            total = part if total is None else total + part
        return total

    def outputs(self, y, final):
        """What mamba_chunk_scan_combined returns: y, then final_states if asked for, then
        varlen_states if asked for."""
        out = (y,)
        if self.return_final_states:
            out += (self._row_final(final) if self.varlen else final,)
        if self.return_varlen_states:
            out += (final,)
        return out if len(out) > 1 else y


@dataclass(frozen=True, eq=False)
class SelectiveScanProblem(_ProblemBase):
    """selective_scan_fn: u (b,d,l), delta (b,d,l), A (d,n), B/C (b,g,n,l), ..."""
    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor] = None
    z: Optional[torch.Tensor] = None
    delta_bias: Optional[torch.Tensor] = None
    delta_softplus: bool = False
    return_last_state: bool = False
    initial_state: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    dt_limit: Tuple[float, float] = (0.0, INF)
    nseq: int = 0
    convention: Convention = field(default=Convention.SELECTIVE_SCAN, init=False)

    input = property(lambda self: self.u)
    seqlen = property(lambda self: self.u.shape[-1])
    initial = property(lambda self: self.initial_state)
    wants_final_state = property(lambda self: self.return_last_state)

    def outputs(self, y, final):
        return (y, final) if self.return_last_state else y

    def state_gradient(self, d_last_state=None):
        """The adjoint of ``outputs``'s state: the last state's gradient as it is."""
        return d_last_state if self.return_last_state else None


@dataclass(frozen=True, eq=False)
class StateUpdateProblem(_ProblemBase):
    """selective_state_update: state (b,h,p,n) or (b,d,n) updated in place, x (b,h,p) or (b,d)."""
    state: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor] = None
    z: Optional[torch.Tensor] = None
    dt_bias: Optional[torch.Tensor] = None
    dt_softplus: bool = False
    state_batch_indices: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    dt_limit: Tuple[float, float] = (0.0, INF)
    pad_slot_id: int = PAD_SLOT_ID
    nseq: int = 0
    convention: Convention = field(default=Convention.STATE_UPDATE, init=False)

    input = property(lambda self: self.x)
    seqlen = property(lambda self: 1)
    initial = property(lambda self: self.state)
    wants_final_state = property(lambda self: False)

    def outputs(self, y, final):
        return y


PROBLEMS = {Convention.SSD: SSDProblem, Convention.SELECTIVE_SCAN: SelectiveScanProblem,
            Convention.STATE_UPDATE: StateUpdateProblem}
# For annotations and isinstance checks alike.
Problem = Union[SSDProblem, SelectiveScanProblem, StateUpdateProblem]

# Arguments a convention updates in place (the decode step's state).
MUTATED = {Convention.SSD: (), Convention.SELECTIVE_SCAN: (), Convention.STATE_UPDATE: ("state",)}
# The flag that asks for the final state as a second output, where the convention has one.
FINAL_STATE_FLAG = {Convention.SSD: "return_final_states",
                    Convention.SELECTIVE_SCAN: "return_last_state"}
# The flags that each add a state output after y, in the order the outputs come
# (Problem.outputs): mamba_chunk_scan_combined's final_states, then varlen_states.
OUTPUT_FLAGS = {Convention.SSD: ("return_final_states", "return_varlen_states"),
                Convention.SELECTIVE_SCAN: ("return_last_state",), Convention.STATE_UPDATE: ()}

KEYWORD_ONLY = {Convention.SSD: ("state_batch_indices", "pad_slot_id"),
                Convention.SELECTIVE_SCAN: ("P", "Q", "dt_limit"),
                Convention.STATE_UPDATE: ("P", "Q", "dt_limit", "pad_slot_id")}
POSITIONAL = {conv: tuple(name for name in cls.argument_names() if name not in KEYWORD_ONLY[conv])
              for conv, cls in PROBLEMS.items()}
