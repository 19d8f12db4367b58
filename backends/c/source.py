"""Assembling the generated files: the header, the .c file around the kernel bodies.

The header documents every parameter of the entry point (shape by logical dims, what it is, when
NULL is allowed) and carries the family, its IR hash and the discretized expressions, so a
reader of the artifact alone knows what it computes. Everything is ASCII and C99: the code must
build with any small toolchain (``-std=c99 -pedantic -Wall -Wextra -Werror``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List

from ssmc import __version__
from ssmc.backends import header
from ssmc.ir import Algorithm, SSMFamily
from ssmc.plan import ir_hash

from .layout import DIM_WORDS, SIZE_MACROS, Layout, Param

ERROR_CODES = (("SSMC_OK", 0, "success"),
               ("SSMC_ERR_SIZE", 1, "a negative size"),
               ("SSMC_ERR_VARLEN_BATCH", 2, "cu_seqlens given with batch != 1"),
               ("SSMC_ERR_OFFSETS", 3, "cu_seqlens not nondecreasing within [0, seqlen]"))

CONVENTION_WORDS = {"ssd": "mamba_chunk_scan_combined (SSD layout)",
                    "selective_scan": "selective_scan_fn (selective-scan layout)",
                    "state_update": "selective_state_update (decode step)"}


class Code:
    """Lines of C with indentation, built with ``block`` contexts."""

    def __init__(self, level: int = 0):
        self.lines: List[str] = []
        self.level = level

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(("    " * self.level + line) if line else "")

    @contextmanager
    def block(self, head: str):
        self(head + " {" if not head.startswith("/*") else "{ " + head)
        self.level += 1
        yield
        self.level -= 1
        self("}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def describe_family(fam: SSMFamily) -> List[str]:
    """The family's IR in a few lines of words, for the header comment."""
    dims = fam.dims
    size = (f"heads={dims.heads} head_dim={dims.head_dim}" if dims.heads else
            f"channels={dims.d_inner}")
    delta = "selective" if fam.delta.selective else "learned constant"
    delta += (", + bias" if fam.delta.bias else "") + (", softplus" if fam.delta.softplus else "")
    if fam.delta.clamp:
        delta += f", clamp({fam.delta.clamp[0]}, {fam.delta.clamp[1]})"

    def bc(spec):
        return ("selective" if spec.selective else "learned constant") + f" per {spec.sharing.value}"
    return [
        f"dims: {size} state={dims.state} groups={dims.groups}",
        f"A: {fam.A.structure.value}{' (selective)' if fam.A.selective else ''}",
        f"Delta: {delta}",
        f"B: {bc(fam.B)}; C: {bc(fam.C)}",
        f"D: {'per ' + fam.D.sharing.value if fam.D else 'none'}; "
        f"gate: {fam.gate.kind + '(z)' if fam.gate else 'none'}",
        f"discretization: {fam.method.value}",
    ]


def _param_doc(p: Param) -> str:
    if p.kind == "size":
        return f" *   {p.name:<15} {p.doc}"
    if p.kind == "offsets":
        return f" *   {p.name:<15} int64 {p.doc}"
    shape = "(" + ", ".join(p.dims) + ")"
    kind = "complex (re, im) " if p.is_complex else ""
    strides = ", ".join(p.stride_names())
    tail = f"; strides {strides}" if strides else ""
    return f" *   {p.name:<15} {kind}float {shape}: {p.doc}{tail}"


def header_comment(L: Layout, config: dict) -> List[str]:
    """The opening comment of both files: ``ssmc.backends.header``, then the family and its
    discretized math in words."""
    plan, fam = L.plan, L.plan.family
    d = plan.disc
    notes = ["", f"Family {fam.name} (family hash {ir_hash(fam)}), ssmc {__version__}:"]
    notes += [f"  {line}" for line in describe_family(fam)]
    notes += [
        "Discretized (dt = Delta after its parameterization, a = one element of A):",
        f"  Abar = {d.abar}",
        f"  Bbar = {d.bbar}",
        f"  Bbar_prev = {d.bbar_prev}",
        "  h_t = Abar h_{t-1} + Bbar B_t x_t + Bbar_prev B_{t-1} x_{t-1};  "
        "y_t = C_t h_t + D x_t; y_t *= silu(z_t)",
    ]
    if L.is_complex:
        notes.append("  complex A, B, C, states; y_t = 2 Re(C_t h_t) (conjugate pairs)")
    notes.append(f"Convention: {CONVENTION_WORDS[L.convention.value]}.")
    if plan.algorithm is Algorithm.CHUNKED:
        notes.append(f"Chunked plan (chunk {plan.chunk_size}): in C this is a direct per-head "
                     "recurrence over the (head_dim, state) rows; it needs no chunking.")
    text = header(plan, config, config.get("triple") or "c", " *", notes)
    return ["/*"] + text.splitlines() + [" */"]


def prototype(L: Layout, name: str, params) -> str:
    """One line per parameter: a tensor's pointer and its strides share the line."""
    decls = [", ".join(p.c_decl()) for p in params]
    return f"int {name}(\n    " + ",\n    ".join(decls) + ")"


def function_doc(L: Layout, name: str, params, summary: List[str]) -> List[str]:
    lines = [f"/* {name}: " + summary[0]]
    lines += [f" * {s}" for s in summary[1:]]
    lines.append(" * Tensors are float pointers with one int64 element stride per dim "
                 "(views allowed; stride 0 broadcasts).")
    dims = sorted({d for p in params for d in p.dims})
    lines.append(" * Dims: " + ", ".join(f"{d} = {DIM_WORDS[d]}" for d in dims) + ".")
    lines += [_param_doc(p) for p in params]
    lines.append(" * Returns SSMC_OK, or an SSMC_ERR_* code (nothing written) for bad sizes.")
    lines.append(" */")
    return lines


def header_file(L: Layout, functions, config: dict) -> str:
    """``functions``: (name, params, summary lines) of every public function."""
    guard = f"SSMC_{L.prefix.upper()}_{L.plan.algorithm.value.upper()}_H"
    out = header_comment(L, config) + [f"#ifndef {guard}", f"#define {guard}", "",
                               "#include <stdint.h>", ""]
    for dim, size in sorted(L.sizes.items()):
        out.append(f"#define {L.macro(dim)} {size}  /* spec-fixed size: {SIZE_MACROS[dim].lower()} */")
    out.append("")
    out.append("#ifndef SSMC_OK")
    for name, value, why in ERROR_CODES:
        out.append(f"#define {name} {value}  /* {why} */")
    out.append("#endif")
    out.append(BF16_HELPERS)
    out += ["#ifdef __cplusplus", 'extern "C" {', "#endif", ""]
    for name, params, summary in functions:
        out += function_doc(L, name, params, summary)
        out.append(prototype(L, name, params) + ";")
        out.append("")
    out += ["#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {guard} */"]
    return "\n".join(out) + "\n"


BF16_HELPERS = r"""
#ifndef SSMC_BF16_HELPERS
#define SSMC_BF16_HELPERS
#include <string.h>

/* Loaders for callers that hold bf16 data (the kernels take float). bf16 is the upper half of
 * an IEEE-754 float, so widening is a shift; memcpy is the portable bit cast. */
static inline void ssmc_bf16_to_float(const uint16_t *src, float *dst, int64_t count)
{
    int64_t i;
    for (i = 0; i < count; ++i) {
        const uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &bits, sizeof bits);
    }
}

/* float -> bf16, rounding to nearest even (as torch does); a NaN stays a (quiet) NaN. */
static inline void ssmc_float_to_bf16(const float *src, uint16_t *dst, int64_t count)
{
    int64_t i;
    for (i = 0; i < count; ++i) {
        uint32_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u)
            dst[i] = (uint16_t)((bits >> 16) | 0x40u);
        else
            dst[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
}
#endif
"""

HELPERS = r"""
static inline float ssmc_silu(float x)
{
    return x / (1.0f + expf(-x));
}

/* cu_seqlens must start at or after 0, never decrease and end within seqlen. */
static inline int ssmc_check_offsets(const int64_t *cu_seqlens, int64_t nseq, int64_t seqlen)
{
    int64_t s;
    if (nseq < 0 || cu_seqlens[0] < 0) return SSMC_ERR_OFFSETS;
    for (s = 0; s < nseq; ++s)
        if (cu_seqlens[s + 1] < cu_seqlens[s]) return SSMC_ERR_OFFSETS;
    return cu_seqlens[nseq] <= seqlen ? SSMC_OK : SSMC_ERR_OFFSETS;
}
"""


def source_file(L: Layout, header_name: str, bodies: List[str], config: dict) -> str:
    out = header_comment(L, config) + ["", f'#include "{header_name}"', "", "#include <math.h>",
                               "#include <stddef.h>", HELPERS]
    return "\n".join(out) + "\n" + "\n".join(bodies)
