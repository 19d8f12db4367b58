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

from ssmc.ir import Algorithm, AStructure, KernelPlan, Sharing
from ssmc.lti import is_matrix_conv
from ssmc.plan import convention_of
from ssmc.ir import Convention

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


def _bc_dims(plan: KernelPlan, which: str, conv: Convention) -> Tuple[str, ...]:
    spec = getattr(plan.family, which)
    per_row = "h" if conv_is_ssd(plan) else "d"
    if spec.selective:
        if conv is Convention.STATE_UPDATE:
            return ("b", "g", "n")
        return ("b", "l", "g", "n") if conv is Convention.SSD else ("b", "g", "n", "l")
    return ("g", "n") if spec.sharing is Sharing.GROUP else (per_row, "n")


def conv_is_ssd(plan: KernelPlan) -> bool:
    return plan.family.A.structure is AStructure.SCALAR


def make_layout(plan: KernelPlan) -> Layout:
    fam = plan.family
    conv = convention_of(plan)
    ssd = conv_is_ssd(plan)
    cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
    prefix = c_identifier(fam.name)
    entry = f"{prefix}_{plan.algorithm.value}"
    step = plan.algorithm is Algorithm.STEP
    row = ("h", "p") if ssd else ("d",)
    coef = "h" if ssd else "d"
    names = tensor_names(conv)

    def x_dims():
        if step:
            return ("b",) + row
        return ("b", "l") + row if ssd else ("b", "d", "l")

    def per_token(sel_dims_scan, sel_dims_step, const_dims, selective):
        if not selective:
            return const_dims
        return sel_dims_step if step else sel_dims_scan

    params: List[Param] = [Param("batch", "size", "batch size (number of sequences unless varlen)")]
    if not step:
        params.append(Param("seqlen", "size", "sequence length l (total tokens when varlen)"))
        params.append(Param("cu_seqlens", "offsets", "varlen: (nseq + 1,) offsets into l, batch "
                            "must be 1; NULL: every batch row is one sequence", nullable=True))
        params.append(Param("nseq", "size", "number of sequences in cu_seqlens (ignored when it "
                            "is NULL)"))
    if step:
        params.append(Param("state", "tensor", "the state, updated in place", ("b",) + row + ("n",),
                            role="inout", is_complex=cplx))
    params.append(Param(names["x"], "tensor", "input", x_dims()))
    # dt: SSD (b,l,h), selective scan (b,d,l), step (b,h) or (b,d); a constant Δ is (h,)/(d,).
    params.append(Param(names["dt"], "tensor",
                        "Delta before its parameterization (+ bias, softplus, clamp)",
                        per_token(("b", "l", "h") if ssd else ("b", "d", "l"), ("b", coef),
                                  (coef,), fam.delta.selective)))
    a_const = ("h",) if ssd else ("d", "n")
    a_sel_scan = ("b", "l", "h") if ssd else ("b", "d", "n", "l")
    a_sel_step = ("b", "h") if ssd else ("b", "d", "n")
    params.append(Param("A", "tensor", "A (continuous time, already -exp(A_log))",
                        per_token(a_sel_scan, a_sel_step, a_const, fam.A.selective),
                        is_complex=cplx))
    for which in ("B", "C"):
        params.append(Param(which, "tensor", f"{which} ({'selective' if getattr(fam, which).selective else 'learned constant'})",
                            _bc_dims(plan, which, conv), is_complex=cplx))
    if fam.D is not None:
        d_dims = ("h", "p") if ssd and fam.D.sharing is Sharing.HEAD_DIM else (coef,)
        params.append(Param("D", "tensor", "skip: y += D x; NULL: no skip", d_dims,
                            nullable=True))
    if fam.gate is not None:
        params.append(Param("z", "tensor", "gate: y *= silu(z); NULL: no gate", x_dims(),
                            nullable=True))
    if fam.delta.bias:
        params.append(Param(names["dt_bias"], "tensor", "added to Delta before softplus; "
                            "NULL: 0", (coef,), nullable=True))
    if not step:
        params.append(Param(names["initial"], "tensor", "state before the first token; NULL: "
                            "zeros", ("s",) + row + ("n",), is_complex=cplx, nullable=True))
    params.append(Param(names["y"], "tensor", "output", x_dims(), role="out"))
    if not step:
        params.append(Param(names["final"], "tensor", "state after the last token; NULL: not "
                            "written (may be the same buffer as the initial state)",
                            ("s",) + row + ("n",), role="out", is_complex=cplx, nullable=True))
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


def tensor_names(conv: Convention) -> Dict[str, str]:
    """Tensor names as the convention's keyword arguments spell them."""
    if conv is Convention.SELECTIVE_SCAN:
        return {"x": "u", "dt": "delta", "dt_bias": "delta_bias", "initial": "initial_state",
                "final": "last_state", "y": "out"}
    return {"x": "x", "dt": "dt", "dt_bias": "dt_bias", "initial": "initial_states",
            "final": "final_states", "y": "y"}
