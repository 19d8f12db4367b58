"""The operand table: every argument and output of a plan's calling convention, derived once.

This pass is the one statement of the calling convention (docs/calling_convention.md). For a
family and a convention it says, for each argument: its logical dims as size letters (never
numbers: the same table serves every size a family is called at), the other shapes a call may
give it (mamba_ssm's (b, n, l) B/C, the decode step's expanded forms), its role, whether the
call must, may or must not pass it for this family, the dtypes it accepts, and its selectivity
and sharing already resolved. ``bind`` validates calls with it; the torch op reads output shapes
from it; the C entry point's parameters and the Triton launchers' keyword arguments are read
off it. Names and order come from the convention's ``Problem`` dataclass (ssmc/problems.py), so
the table cannot list an argument the normalized call lacks, or miss one.

Size letters: b batch, l seqlen, h heads, p head_dim, d channels, n state, g groups, r rank,
s sequences (the batch, or the number of packed sequences when varlen), c state slots (a state
pool indexed by ``state_batch_indices``).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

from .ir import AStructure, Convention, DType, SSMFamily, Sharing
from .problems import FINAL_STATE_FLAG, PROBLEMS

# What each size letter is, in words.
DIM_WORDS = {"b": "batch", "l": "seqlen", "h": "heads", "p": "head_dim", "d": "channels",
             "n": "state", "g": "groups", "r": "rank", "s": "sequences", "c": "state slots"}


class Role(enum.Enum):
    INPUT = "input"                  # one value per token (x, z, a selective Δ/A/B/C)
    PARAMETER = "parameter"          # a learned constant
    INITIAL_STATE = "initial state"  # the state each sequence starts from
    CACHE = "cache"                  # the decode step's state, updated in place
    INDEX = "index"                  # integers: sequence boundaries (cu_seqlens, seq_idx), state slots
    OPTION = "option"                # a flag or number (chunk_size, softplus, dt_limit, ...)
    OUTPUT = "output"
    FINAL_STATE = "final state"


class Need(enum.Enum):
    REQUIRED = "required"   # the family needs it
    OPTIONAL = "optional"   # None means absent (a state) or the spec's value (an option)
    ABSENT = "absent"       # the family has no such term: passing it is an error


@dataclass(frozen=True)
class Form:
    """One shape a call may give an argument, as size letters."""
    dims: Tuple[str, ...]
    expanded: Tuple[int, ...] = ()   # axes that must be broadcasts (mamba_ssm's expanded step forms)
    insert: Optional[int] = None     # axis inserted to reach the normalized form: (b,n,l) -> (b,1,n,l)
    implies: Tuple[Tuple[str, int], ...] = ()   # sizes the form fixes without an axis: (b,n,l) is g=1
    # A tensor of this form that is not a broadcast along ``expanded`` is taken whole, by the
    # family with this term per head x head_dim (mamba_ssm's D of shape (h, p)).
    widens: bool = False


@dataclass(frozen=True)
class Operand:
    """One argument (or output) of a convention, for one family.

    ``forms[0]`` is the normalized form: what ``bind`` hands every backend (``dims``).
    ``dtypes`` names the torch dtypes accepted (``same_as`` when it must equal another
    argument's). ``why`` says, for an ABSENT operand, what the family lacks; ``what`` how the
    spec defines it, for messages and generated docs.
    """
    name: str
    role: Role
    need: Need
    forms: Tuple[Form, ...] = ()
    dtypes: Tuple[str, ...] = ()
    same_as: Optional[str] = None
    complex: bool = False
    selective: Optional[bool] = None
    sharing: Optional[Sharing] = None
    what: str = ""
    why: str = ""
    other: Tuple[Form, ...] = ()     # forms of the opposite selectivity, for a hint
    # A kernel runs without it (None / a NULL pointer): the term is dropped (D, z, the Δ bias),
    # the state starts at zero, the final state is not written.
    nullable: bool = False
    # float32 accepted beside ``same_as``'s dtype: mamba_ssm's callers pass fp32 Δ, A, B, C
    # with bf16/fp16 x (Mamba-2 computes dt in fp32).
    fp32_too: bool = False

    @property
    def dims(self) -> Tuple[str, ...]:
        return self.forms[0].dims if self.forms else ()

    @property
    def is_tensor(self) -> bool:
        return self.role is not Role.OPTION

    @property
    def present(self) -> bool:
        """Whether the family has this argument at all (required or optional)."""
        return self.need is not Need.ABSENT


@dataclass(frozen=True)
class OperandTable:
    """A convention's arguments, in signature order, and its outputs, for one family."""
    convention: Convention
    primary: str                     # the argument that fixes batch, seqlen, dtype and device
    arguments: Tuple[Operand, ...]
    outputs: Tuple[Operand, ...]
    # The convention's keyword for each operand generators refer to by what it is: x, dt,
    # dt_bias, initial, final, y (selective_scan_fn spells them u, delta, delta_bias, ...).
    keyword: Dict[str, str]

    def __getitem__(self, name: str) -> Operand:
        for op in self.arguments + self.outputs:
            if op.name == name:
                return op
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(op.name == name for op in self.arguments + self.outputs)

    def tensors(self) -> Tuple[Operand, ...]:
        """The tensor arguments the family has (what a kernel's launcher takes)."""
        return tuple(op for op in self.arguments if op.is_tensor and op.present)

    def key_of(self, name: str) -> str:
        """What a generator calls an operand (x, dt, dt_bias, ...; else its keyword)."""
        return next((k for k, v in self.keyword.items() if v == name), name)

    def droppable_terms(self) -> Tuple[str, ...]:
        """The keys of the terms the family has that a kernel can run without (D, z, dt_bias):
        a kernel takes a flag for each saying whether the call passed it."""
        return tuple(self.key_of(op.name) for op in self.tensors()
                     if op.nullable and op.role in (Role.INPUT, Role.PARAMETER))

    def required(self) -> Tuple[str, ...]:
        return tuple(op.name for op in self.arguments if op.need is Need.REQUIRED)



def _forms(*dims_list) -> Tuple[Form, ...]:
    return tuple(Form(tuple(d)) for d in dims_list)


_TORCH_NAMES = {DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16", DType.FLOAT32: "float32",
                DType.FLOAT64: "float64"}
_COMPLEX_NAMES = {"float32": "complex64", "float64": "complex128"}


def _names(dtypes) -> Tuple[str, ...]:
    return tuple(sorted({_TORCH_NAMES[d] for d in dtypes}))


def _complex(names) -> Tuple[str, ...]:
    return tuple(sorted({_COMPLEX_NAMES[n] for n in names if n in _COMPLEX_NAMES}))


@lru_cache(maxsize=256)
def operand_table(fam: SSMFamily, convention: Convention) -> OperandTable:
    """The operand table of ``fam`` called under ``convention``."""
    conv = Convention(convention)
    st = fam.A.structure
    cplx = st is AStructure.COMPLEX_DIAGONAL
    ssd_like = st is AStructure.SCALAR
    step = conv is Convention.STATE_UPDATE
    unit = "h" if ssd_like else "d"          # what Δ, D, bias and per-head B/C are indexed by
    per_unit = "head" if ssd_like else "channel"
    primary = "u" if conv is Convention.SELECTIVE_SCAN else "x"

    inputs = _names(fam.dtypes.inputs)
    params = _names(set(fam.dtypes.inputs) | {DType.FLOAT32})
    state = _names((fam.dtypes.state,))
    cache = _names(set(fam.dtypes.inputs) | {fam.dtypes.state})
    complex_params = _complex(set(inputs) | set(state))

    def act(name, forms, **kw):
        return Operand(name, Role.INPUT, Need.REQUIRED, forms, inputs, same_as=primary, **kw)

    def sel(name, selective, sel_forms, const_forms, what, complex_=False, sharing=None):
        forms, other = (sel_forms, const_forms) if selective else (const_forms, sel_forms)
        what += ", selective (one per token)" if selective else ", a learned constant"
        if complex_:
            dtypes, same = complex_params, None
        else:
            dtypes, same = (params, primary) if selective else (params, None)
        return Operand(name, Role.INPUT if selective else Role.PARAMETER, Need.REQUIRED, forms,
                       dtypes, same, complex_, selective, sharing, what, other=other,
                       fp32_too=selective and not complex_)

    def term(name, has, forms, what, lacks, role=Role.PARAMETER, dtypes=params, same_as=None,
             nullable=True):
        # A term the family has may be omitted (None), as mamba_ssm allows: the call then runs
        # the family without it (signature.without_terms).
        need = (Need.OPTIONAL if nullable else Need.REQUIRED) if has else Need.ABSENT
        return Operand(name, role, need, forms, dtypes,
                       same_as, what=what, why="" if has else lacks, nullable=nullable)

    def bc(name):
        spec = getattr(fam, name)
        if ssd_like:
            tok = _forms(("b", "g", "n") if step else ("b", "l", "g", "n"))
        elif step:
            tok = _forms(("b", "g", "n")) + (Form(("b", "n"), insert=1, implies=(("g", 1),)),)
        else:
            tok = _forms(("b", "g", "n", "l")) + (Form(("b", "n", "l"), insert=1,
                                                        implies=(("g", 1),)),)
        const = _forms(("g", "n") if spec.sharing is Sharing.GROUP else (unit, "n"))
        per = "group" if spec.sharing is Sharing.GROUP else per_unit
        return sel(name, spec.selective, tok, const, f"{name} is per {per}", cplx, spec.sharing)

    def state_operand(name, role, dims, need):
        return Operand(name, role, need, _forms(dims), _complex(state) if cplx else
                       (cache if role is Role.CACHE else state), complex=cplx,
                       what="the state, updated in place" if role is Role.CACHE else
                       "the state before each sequence's first token; None: zeros",
                       nullable=role is Role.INITIAL_STATE)

    def option(name, what):
        return Operand(name, Role.OPTION, Need.OPTIONAL, what=what)

    no_dplr = "has no low-rank part in A (it is not DPLR)"
    has_d, has_gate, has_bias = fam.D is not None, fam.gate is not None, fam.delta.bias
    dplr = st is AStructure.DPLR
    row = ("h", "p") if ssd_like else ("d",)
    ops: Dict[str, Operand] = {}
    if ssd_like:
        if step:
            tok, dt_forms = ("b", "h", "p"), (
                (Form(("b", "h")), Form(("b", "h", "p"), expanded=(2,))),
                (Form(("h",)), Form(("h", "p"), expanded=(1,))))
            a_forms = ((Form(("b", "h")), Form(("b", "h", "p", "n"), expanded=(2, 3))),
                       (Form(("h",)), Form(("h", "p", "n"), expanded=(1, 2))))
            bias_forms = (Form(("h",)), Form(("h", "p"), expanded=(1,)))
        else:
            tok = ("b", "l", "h", "p")
            dt_forms = (_forms(("b", "l", "h")), _forms(("h",)))
            a_forms = (_forms(("b", "l", "h")), _forms(("h",)))
            bias_forms = _forms(("h",))
        per_dim = has_d and fam.D.sharing is Sharing.HEAD_DIM
        if per_dim:
            d_forms = _forms(("h", "p"))
        else:
            d_forms = (Form(("h",)), Form(("h", "p"), expanded=(1,), widens=True))
        d_what = "D is per head x head_dim" if per_dim else "D is per head"
        bias_what = "the Δ bias is one per head"
    else:
        tok = ("b", "d") if step else ("b", "d", "l")
        dt_forms = (_forms(tok), _forms(("d",)))
        a_const = ("d", "n", "n") if st is AStructure.DENSE else ("d", "n")
        a_forms = (_forms(("b",) + a_const + (() if step else ("l",))), _forms(a_const))
        bias_forms, d_forms = _forms(("d",)), _forms(("d",))
        d_what, bias_what = "D is per channel", "the Δ bias is one per channel"

    x_name = primary
    dt_name = "delta" if conv is Convention.SELECTIVE_SCAN else "dt"
    bias_name = "delta_bias" if conv is Convention.SELECTIVE_SCAN else "dt_bias"
    if step:
        ops["state"] = state_operand("state", Role.CACHE, ("b",) + row + ("n",), Need.REQUIRED)
    ops[x_name] = act(x_name, _forms(tok), what="the input")
    ops[dt_name] = sel(dt_name, fam.delta.selective, *dt_forms, f"Δ is one per {per_unit}")
    ops["A"] = sel("A", fam.A.selective, *a_forms, f"A is {st.value} per {per_unit}", cplx)
    ops["B"], ops["C"] = bc("B"), bc("C")
    ops["D"] = term("D", has_d, d_forms, d_what + "; the skip y += D x", "has no D skip")
    ops["z"] = term("z", has_gate, _forms(tok), "the gate: y *= silu(z)", "has no output gate",
                    role=Role.INPUT, dtypes=inputs, same_as=primary)
    ops[bias_name] = term(bias_name, has_bias, bias_forms, bias_what + "; added to Δ before "
                          "its softplus", "adds no bias to Δ")
    for name in ("P", "Q") if conv is not Convention.SSD else ():
        ops[name] = term(name, dplr, _forms(("d", "r", "n")), "low-rank factor of A", no_dplr,
                         nullable=False)
    init = {Convention.SSD: "initial_states", Convention.SELECTIVE_SCAN: "initial_state"}.get(conv)
    slots = Operand("state_batch_indices", Role.INDEX, Need.OPTIONAL, _forms(("s" if init else "b",)),
                    ("int32", "int64"), what="each sequence's slot in a state pool (c, ...) "
                    "given as the state; pad_slot_id marks a padded row", nullable=True)
    if step:
        ops["state_batch_indices"] = slots
        ops["pad_slot_id"] = option("pad_slot_id", "the slot index of a padded row (-1)")
    if init:
        ops[init] = state_operand(init, Role.INITIAL_STATE, ("s",) + row + ("n",), Need.OPTIONAL)
        if conv is Convention.SSD:
            # mamba_ssm's form: one state per batch row, which for packed sequences is the
            # first sequence's (the others start from zeros).
            ops[init] = dataclasses.replace(ops[init], forms=ops[init].forms
                                            + _forms(("b",) + row + ("n",)))
            ops["state_batch_indices"] = slots
            ops["pad_slot_id"] = option("pad_slot_id", "the slot index of a padded sequence (-1)")
            ops["return_varlen_states"] = option(
                "return_varlen_states", "whether each packed sequence's final state is returned")
        ops["cu_seqlens"] = Operand("cu_seqlens", Role.INDEX, Need.OPTIONAL, _forms(("s+1",)),
                                    ("int32", "int64"), what="offsets of sequences packed along "
                                    "l (batch 1)")
    if conv is Convention.SSD:
        ops["seq_idx"] = Operand("seq_idx", Role.INDEX, Need.OPTIONAL, _forms(("b", "l")),
                                 ("int32", "int64"), what="each token's sequence number")
        ops["chunk_size"] = option("chunk_size", "the chunk length (the spec's)")
    softplus = "delta_softplus" if conv is Convention.SELECTIVE_SCAN else "dt_softplus"
    ops[softplus] = option(softplus, "whether Δ goes through softplus (the spec's)")
    ops["dt_limit"] = option("dt_limit", "the clamp of Δ (the spec's)")
    if conv in FINAL_STATE_FLAG:
        ops[FINAL_STATE_FLAG[conv]] = option(FINAL_STATE_FLAG[conv],
                                             "whether the final state is returned too")

    order = PROBLEMS[conv].argument_names()
    missing = set(order) ^ set(ops)
    assert not missing, f"operand table and {PROBLEMS[conv].__name__} disagree on {missing}"
    arguments = tuple(ops[name] for name in order)

    y_name = "out" if conv is Convention.SELECTIVE_SCAN else "y"
    outputs = [Operand(y_name, Role.OUTPUT, Need.REQUIRED, _forms(tok), inputs, same_as=primary,
                       what="the output")]
    if init:
        final = "last_state" if conv is Convention.SELECTIVE_SCAN else "final_states"
        outputs.append(Operand(final, Role.FINAL_STATE, Need.OPTIONAL,
                               _forms(("s",) + row + ("n",)),
                               _complex(state) if cplx else state, complex=cplx,
                               what="the state after each sequence's last token",
                               nullable=True))
    keyword = {"x": x_name, "dt": dt_name, "dt_bias": bias_name, "y": y_name}
    if init:
        keyword.update(initial=init, final=outputs[1].name)
    return OperandTable(conv, primary, arguments, tuple(outputs), keyword)


def shape_of(op: Operand, sizes: Dict[str, int]) -> Tuple[int, ...]:
    """The normalized shape of ``op`` at ``sizes`` (size letter -> int)."""
    return tuple(sizes[d] for d in op.dims)


__all__ = ["DIM_WORDS", "Role", "Need", "Form", "Operand", "OperandTable",
           "operand_table", "shape_of"]
