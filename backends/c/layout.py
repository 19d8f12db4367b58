"""The C entry point's parameters: which tensors a plan takes, their logical dims and indexing.

One table per calling convention (docs/calling_convention.md) says, for every tensor, its logical
dimensions; the family's IR picks the variant (selective or constant Δ/A/B/C, B/C shared per
group or per head). The same ``Param`` list drives the C signature, the ctypes call, the
cross-target test driver's argument file and the example ``main.c``, so they cannot disagree.

Every tensor is passed as a pointer plus one ``int64_t`` element stride per logical dim, so a
caller can pass views (a stride of 0 broadcasts). Complex tensors are interleaved (re, im)
float pairs, the layout of torch's complex64 and of C99's ``float _Complex``; their strides
count floats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ssmc.ir import Algorithm, AStructure, Convention, KernelPlan
from ssmc.lti import is_matrix_conv
from ssmc.operands import Operand, Role

from .matrix_conv import c_params

# The loop variable the generated C uses for each logical dim letter.
INDEX_VAR = {"b": "bi", "s": "s", "l": "t", "h": "hh", "p": "pp", "d": "ch", "g": "gg",
             "n": "nn", "k": "k", "m": "mm"}

DIM_WORDS = {"b": "batch", "s": "sequence (batch row, or cu_seqlens entry when varlen)",
             "l": "time", "h": "head", "p": "head_dim", "d": "channel", "g": "group",
             "n": "state", "k": "lag", "m": "state (column of a matrix A's Abar)"}


SIZE_MACROS = {"h": "HEADS", "p": "HEAD_DIM", "d": "CHANNELS", "n": "STATE", "g": "GROUPS",
               "m": "STATE_COLS"}


@dataclass(frozen=True)
class Param:
    """One C parameter: a size (``int64_t``) or a tensor (pointer + one stride per dim)."""
    name: str
    kind: str                 # "size" | "tensor" | "offsets" (int64 cu_seqlens)
    doc: str
    dims: Tuple[str, ...] = ()
    role: str = "in"          # "in" | "out" | "inout"
    is_complex: bool = False
    nullable: bool = False

    def stride_names(self) -> List[str]:
        return [f"{self.name}_s{d}" for d in self.dims]

    def c_decl(self) -> List[str]:
        """The C parameter declarations, pointer first, then its strides."""
        if self.kind == "size":
            return [f"int64_t {self.name}"]
        if self.kind == "offsets":
            return [f"const int64_t *restrict {self.name}"]
        const = "const " if self.role == "in" else ""
        # Inputs never alias an output. The states are left without restrict: a streaming
        # caller may pass one buffer as both the initial and the final state.
        restrict = "restrict " if self.role != "inout" and "state" not in self.name else ""
        decl = [f"{const}float *{restrict}{self.name}"]
        return decl + [f"int64_t {s}" for s in self.stride_names()]


def _shape_words(p: Param) -> str:
    return "(" + ", ".join(p.dims) + ")"


@dataclass(frozen=True)
class Layout:
    """Everything the generators and the caller-side marshalling need to know about a plan."""
    plan: KernelPlan
    convention: Convention
    prefix: str                      # C identifier prefix (the family name, lower case)
    entry: str                       # the entry function's name
    channel_dims: Tuple[str, ...]    # the loops over independent state rows: (h, p) or (d,)
    coef_dim: str                    # the dim Δ and A are indexed by: h or d
    params: Tuple[Param, ...]
    sizes: Dict[str, int]            # spec-fixed sizes by dim letter

    @property
    def is_complex(self) -> bool:
        return self.plan.family.A.structure is AStructure.COMPLEX_DIAGONAL

    @property
    def per_state_coefs(self) -> bool:
        """Ā, B̄ differ per state element (diagonal A), not only per head (scalar A)."""
        return self.plan.family.A.structure is not AStructure.SCALAR

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.params)

    def at(self, name: str, **override: str) -> str:
        """``name[i0 * name_s0 + ...]`` with the loop variables (or overrides, e.g. t='t - 1')."""
        p = self.param(name)
        terms = []
        for d, stride in zip(p.dims, p.stride_names()):
            var = override.get(d, INDEX_VAR[d])
            var = f"({var})" if " " in var else var
            terms.append(f"{var} * {stride}" if var != "0" else None)
        offset = " + ".join(t for t in terms if t) or "0"
        return f"{name}[{offset}]"

    def at_im(self, name: str, **override: str) -> str:
        """The imaginary part of a complex element (the float right after the real part)."""
        text = self.at(name, **override)
        return text[:-1] + " + 1]"

    def macro(self, dim: str) -> str:
        """The header's #define for a spec-fixed size, e.g. MAMBA2_HEADS."""
        return f"{self.prefix.upper()}_{SIZE_MACROS[dim]}"


def c_identifier(name: str) -> str:
    ident = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return ident if ident and not ident[0].isdigit() else f"ssm_{ident}"


def conv_is_ssd(plan: KernelPlan) -> bool:
    return plan.family.A.structure is AStructure.SCALAR


# What a NULL pointer means, for the parameters a kernel runs without (the operand table's
# ``nullable``), by role.
_NULL_MEANS = {Role.INITIAL_STATE: "zeros", Role.FINAL_STATE: "not written (may be the same "
               "buffer as the initial state)"}


# C sources stay ASCII; the operand table's words are written for Python messages.
_ASCII = str.maketrans({"Δ": "Delta", "×": "x"})


def _tensor_param(op: Operand) -> Param:
    role = {Role.CACHE: "inout", Role.OUTPUT: "out", Role.FINAL_STATE: "out"}.get(op.role, "in")
    doc = op.what.translate(_ASCII)
    assert doc.isascii(), doc
    if op.nullable:
        doc += f"; NULL: {_NULL_MEANS.get(op.role, 'the term is dropped')}"
    return Param(op.name, "tensor", doc, op.dims, role=role, is_complex=op.complex,
                 nullable=op.nullable)


def make_layout(plan: KernelPlan) -> Layout:
    """The entry point's parameters: sizes C needs passed, then the operand table's tensors
    (their normalized dims), outputs last."""
    fam = plan.family
    table = plan.operands
    conv = table.convention
    ssd = conv_is_ssd(plan)
    prefix = c_identifier(fam.name)
    entry = f"{prefix}_{plan.algorithm.value}"
    step = plan.algorithm is Algorithm.STEP
    row = ("h", "p") if ssd else ("d",)
    coef = "h" if ssd else "d"

    params: List[Param] = [Param("batch", "size", "batch size (number of sequences unless varlen)")]
    if not step:
        params.append(Param("seqlen", "size", "sequence length l (total tokens when varlen)"))
        params.append(Param("cu_seqlens", "offsets", "varlen: (nseq + 1,) offsets into l, batch "
                            "must be 1; NULL: every batch row is one sequence", nullable=True))
        params.append(Param("nseq", "size", "number of sequences in cu_seqlens (ignored when it "
                            "is NULL)"))
    # seq_idx is another spelling of cu_seqlens (bind derives one from the other); the DPLR
    # factors reach C only through the host's discretization (matrix_conv).
    for op in table.tensors():
        if op.role is not Role.INDEX and op.name not in ("P", "Q"):
            params.append(_tensor_param(op))
    params += [_tensor_param(op) for op in table.outputs]
    if plan.algorithm is Algorithm.CONV:
        params.append(Param("conv_kernel", "tensor", "workspace: the convolution kernel K, "
                            "(heads or channels, seqlen) floats", (coef, "k"), role="out"))
    sizes = {"n": fam.dims.state, "g": fam.dims.groups}
    if is_matrix_conv(plan):   # the host discretizes matrix A: see matrix_conv.py
        params = c_params(plan, params, Param)
        sizes["m"] = fam.dims.state
    if ssd:
        sizes.update(h=fam.dims.heads, p=fam.dims.head_dim)
    else:
        sizes.update(d=fam.dims.d_inner)
    return Layout(plan, conv, prefix, entry, row, coef, tuple(params), sizes)


def tensor_names(L: "Layout") -> Dict[str, str]:
    """The convention's keyword for x, dt, dt_bias, initial, final and y (the operand table's)."""
    return L.plan.operands.keyword
