"""Semantic checks: a pass over an ``ir.SpecFile`` that returns it or raises ``SpecError``.

The parser only knows the shape of each statement; whether the statements make sense together
(sizes that divide, an algorithm that fits the structure of A, layers that name a defined
family) is decided here, on the IR, so that specs built in Python get the same checks as spec
text. Each error points at the ``Loc`` of the node at fault. docs/language.md lists every check.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from . import ir
from .errors import SpecError

__all__ = ["check", "check_family", "check_model", "require_positive"]

LAYER_KEYWORDS = ("attention", "mlp", "moe")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "relu")
GATES = ("silu",)
STATE_DTYPES = (ir.DType.FLOAT32, ir.DType.FLOAT64)
# No real model has a million blocks; a layout that unrolls to more is a typo in a repeat count,
# and unrolling it (ModelSpec.blocks) would exhaust memory.
MAX_BLOCKS = 1_000_000


def check(specfile: ir.SpecFile) -> ir.SpecFile:
    """Every check of docs/language.md, in source order; the first failure raises."""
    _check_names(specfile)
    for family in specfile.families:
        check_family(family)
    families = {f.name: f for f in specfile.families}
    for model in specfile.models:
        check_model(model, families)
    return specfile


def require_positive(value, what: str, loc: Optional[ir.Loc], prefix: str = "") -> None:
    """Sizes are whole numbers >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{prefix}{what} must be a positive whole number, got {value}", loc)


def _at(node_loc: ir.Loc, fallback: ir.Loc) -> ir.Loc:
    return node_loc if node_loc.line > 0 else fallback


def _first_line(loc: ir.Loc) -> str:
    return f" (first at line {loc.line})" if loc.line > 0 else ""


# --------------------------------------------------------------------------------------------
# Names across the file

def _check_names(specfile: ir.SpecFile) -> None:
    seen: Dict[str, ir.SSMFamily] = {}
    for family in specfile.families:
        if family.name in seen:
            raise SpecError(f"ssm family '{family.name}' is defined twice"
                            f"{_first_line(seen[family.name].loc)}", family.loc,
                            "give each family its own name")
        if family.name in LAYER_KEYWORDS:
            raise SpecError(f"'{family.name}' is a layer keyword and cannot name an ssm family",
                            family.loc)
        seen[family.name] = family
    models: Dict[str, ir.ModelSpec] = {}
    for model in specfile.models:
        if model.name in models:
            raise SpecError(f"model '{model.name}' is defined twice{_first_line(models[model.name].loc)}",
                            model.loc, "give each model its own name")
        models[model.name] = model
        if model.name in seen:
            family = seen[model.name]
            later, earlier = (model, family) if model.loc.line >= family.loc.line else (family, model)
            kind = "ssm family" if earlier is family else "model"
            where = f" at line {earlier.loc.line}" if earlier.loc.line > 0 else ""
            raise SpecError(f"'{model.name}' is already the name of the {kind}{where}", later.loc,
                            "ssm families and models share one namespace")


# --------------------------------------------------------------------------------------------
# SSM families

def check_family(family: ir.SSMFamily) -> ir.SSMFamily:
    here = family.loc
    prefix = "" if here.line > 0 else f"ssm {family.name}: "

    def fail(message, loc=None, hint=None):
        raise SpecError(prefix + message, _at(loc or ir.NOLOC, here), hint)

    structure = family.A.structure
    _check_dims(family, fail, prefix)

    if family.A.selective and structure in (ir.AStructure.DPLR, ir.AStructure.DENSE):
        fail(f"a selective A is supported for scalar, diagonal and complex diagonal structures, "
             f"not {structure.value}", family.A.loc)

    delta = family.delta
    if delta.clamp is not None:
        lo, hi = delta.clamp
        if math.isnan(lo) or math.isnan(hi) or lo < 0:
            fail(f"clamp({lo:g}, {hi:g}): the lower bound must be >= 0 (delta is a step size)",
                 delta.loc)
        if lo >= hi:
            fail(f"clamp({lo:g}, {hi:g}): the lower bound must be below the upper bound", delta.loc)

    for label, bc in (("B", family.B), ("C", family.C)):
        if bc.sharing is ir.Sharing.HEAD_DIM:
            fail(f"{label} cannot be per head_dim; B and C are per group or per head", bc.loc)

    if family.D is not None:
        if family.D.sharing is ir.Sharing.HEAD_DIM and structure is not ir.AStructure.SCALAR:
            fail(f"D per head_dim needs A scalar per head (heads x head_dim); a {structure.value} "
                 f"A has one D per channel", family.D.loc, "write 'D per channel'")
        if family.D.sharing is ir.Sharing.GROUP:
            fail("D is per head, per channel or per head_dim, not per group", family.D.loc)
    if family.gate is not None and family.gate.kind not in GATES:
        fail(f"unknown gate '{family.gate.kind}'; known: {', '.join(GATES)}", family.gate.loc)

    _check_compute(family, fail)

    dtypes = family.dtypes
    if not dtypes.inputs:
        fail("dtype inputs lists no dtype", dtypes.loc)
    for label, dtype in (("state", dtypes.state), ("accum", dtypes.accum)):
        if dtype not in STATE_DTYPES:
            fail(f"dtype {label} = {dtype.value}: the state and the accumulation are kept in fp32 "
                 f"(or fp64)", dtypes.loc)
    return family


def _check_dims(family: ir.SSMFamily, fail, prefix: str) -> None:
    dims, structure = family.dims, family.A.structure
    loc = _at(dims.loc, family.loc)
    for name in ("state", "heads", "head_dim", "channels", "groups", "rank"):
        value = getattr(dims, name)
        if value < 0 or (name == "groups" and value < 1 and name not in dims.open):
            require_positive(value, name, loc, prefix)
    scalar = structure is ir.AStructure.SCALAR
    needed = ("heads", "head_dim", "state") if scalar else ("channels", "state")
    missing = [n for n in needed if getattr(dims, n) == 0 and n not in dims.open]
    if missing:
        fail(f"dims lacks {', '.join(missing)}: A {_structure_words(structure)} needs "
             f"{', '.join(needed)}", loc,
             "e.g. dims heads = 80, head_dim = 64, state = 128" if scalar
             else "e.g. dims channels = 1536, state = 16")
    if scalar:
        if "channels" in dims.open:
            fail("a scalar-A family is sized by heads and head_dim: leave those open, not "
                 "channels", loc)
        if dims.channels and dims.heads and dims.channels != dims.heads * dims.head_dim:
            fail(f"channels = {dims.channels} but heads * head_dim = {dims.heads * dims.head_dim}; "
                 f"a scalar-A family is sized by heads and head_dim", loc)
        sized, count = "heads", dims.heads
    else:
        if dims.heads or "heads" in dims.open:
            fail(f"A {_structure_words(structure)} is sized by channels, not heads", loc,
                 f"e.g. dims channels = {dims.heads * max(dims.head_dim, 1)}, state = {dims.state}")
        if dims.head_dim != 1:
            fail(f"head_dim applies only to A scalar per head; A {_structure_words(structure)} "
                 f"has one state vector per channel", loc)
        sized, count = "channels", dims.channels
    if count and dims.groups and count % dims.groups:
        fail(f"{sized} = {count} is not divisible by groups = {dims.groups} "
             f"(B and C are shared by {sized} / groups {sized} each)", loc)
    if structure is ir.AStructure.DPLR:
        if dims.rank == 0:
            fail("A dplr needs a rank", _at(family.A.loc, loc),
                 "write 'A dplr(rank = 1)' or add 'rank = 1' to dims")
        if dims.state and dims.rank >= dims.state:
            fail(f"rank = {dims.rank} must be smaller than state = {dims.state} "
                 f"(the low-rank correction P^T Q is {dims.state} x {dims.state} of rank {dims.rank})",
                 loc)
    elif dims.rank:
        fail(f"rank applies only to A dplr, not to A {_structure_words(structure)}", loc)


def _structure_words(structure: ir.AStructure) -> str:
    return {ir.AStructure.SCALAR: "scalar per head",
            ir.AStructure.COMPLEX_DIAGONAL: "complex diagonal"}.get(structure, structure.value)


def _check_compute(family: ir.SSMFamily, fail) -> None:
    compute, structure = family.compute, family.A.structure
    algorithm = compute.algorithm
    if algorithm is ir.Algorithm.CHUNKED:
        if compute.chunk_size is None:
            fail("compute chunked needs a chunk size", compute.loc, "e.g. compute chunked(256)")
        size = compute.chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
            fail(f"chunk size {size} is not a positive power of two", compute.loc,
                 "e.g. chunked(64), chunked(128), chunked(256)")
        if structure is not ir.AStructure.SCALAR:
            fail(f"compute chunked (SSD) needs A scalar per head, but A is "
                 f"{_structure_words(structure)}: the chunked algorithm turns the decay inside a "
                 f"chunk into one cumulative sum per head, which needs one decay per head",
                 compute.loc, "use compute scan" + (" (or conv, the system being LTI)"
                                                    if family.is_lti else ""))
    elif compute.chunk_size is not None:
        fail(f"a chunk size applies only to compute chunked, not {algorithm.value}", compute.loc)
    if algorithm is ir.Algorithm.CONV and not family.is_lti:
        selective = [label for label, sel in (("A", family.A.selective),
                                              ("delta", family.delta.selective),
                                              ("B", family.B.selective),
                                              ("C", family.C.selective)) if sel]
        verb = "is" if len(selective) == 1 else "are"
        fail(f"compute conv needs a time-invariant (LTI) system, but {_and(selective)} {verb} "
             f"selective", compute.loc,
             "use compute scan, or make " + _and(selective) + " constant")


def _and(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# --------------------------------------------------------------------------------------------
# Models

def check_model(model: ir.ModelSpec, families: Dict[str, ir.SSMFamily]) -> ir.ModelSpec:
    here = model.loc
    prefix = "" if here.line > 0 else f"model {model.name}: "

    def fail(message, loc=None, hint=None):
        raise SpecError(prefix + message, _at(loc or ir.NOLOC, here), hint)

    require_positive(model.d_model, "d_model", here, prefix)
    if model.vocab is not None:
        require_positive(model.vocab, "vocab", here, prefix)
    if model.norm not in NORMS:
        fail(f"unknown norm '{model.norm}'; known: {', '.join(NORMS)}")
    if not model.layout:
        fail("the model has no layers")

    def positive(value, what, loc):
        require_positive(value, what, _at(loc, here), prefix)

    def walk(items) -> int:
        """Checks the layers; returns how many blocks they unroll to."""
        total = 0
        for item in items:
            loc = _at(item.loc, here)
            total += 1
            if isinstance(item, ir.Repeat):
                if isinstance(item.count, bool) or not isinstance(item.count, int) or item.count < 1:
                    fail(f"repeat count must be at least 1, got {item.count}", loc)
                if not item.items:
                    fail("a repeat holds no layers", loc)
                total += walk(item.items) * item.count - 1
                if total > MAX_BLOCKS:
                    fail(f"the layout unrolls to more than {MAX_BLOCKS} blocks", loc)
            elif isinstance(item, ir.SSMBlock):
                if item.family not in families:
                    known = ", ".join(families) if families else "none (this file defines no ssm family)"
                    fail(f"layer '{item.family}' names no ssm family; known families: {known}", loc)
            elif isinstance(item, ir.AttentionBlock):
                positive(item.heads, "attention heads", loc)
                positive(item.kv_heads, "attention kv_heads", loc)
                if item.heads % item.kv_heads:
                    fail(f"attention heads = {item.heads} is not divisible by kv_heads = "
                         f"{item.kv_heads} (each key/value head serves heads / kv_heads query heads)",
                         loc)
                if item.head_dim is not None:
                    positive(item.head_dim, "attention head_dim", loc)
                elif model.d_model % item.heads:
                    fail(f"d_model = {model.d_model} is not divisible by attention heads = "
                         f"{item.heads}", loc, "give head_dim = ... explicitly")
                if item.window is not None:
                    positive(item.window, "attention window", loc)
            elif isinstance(item, ir.MLPBlock):
                if item.hidden is not None:
                    positive(item.hidden, "mlp hidden", loc)
                if item.activation not in ACTIVATIONS:
                    fail(f"unknown mlp activation '{item.activation}'; known: {', '.join(ACTIVATIONS)}",
                         loc)
            elif isinstance(item, ir.MoEBlock):
                positive(item.experts, "moe experts", loc)
                positive(item.top_k, "moe top_k", loc)
                if item.top_k > item.experts:
                    fail(f"moe top_k = {item.top_k} exceeds experts = {item.experts}", loc)
                if item.hidden is not None:
                    positive(item.hidden, "moe hidden", loc)
            else:
                fail(f"unknown layer {item!r}", loc)
        return total

    walk(model.layout)
    return model
