"""Planning: a checked family becomes the KernelPlan(s) a backend lowers.

The plan is where the spec's ``compute`` meets what a caller asks for (e.g. the decode step of a
chunked family); the discretized expressions are attached here once, so backends only print them.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Optional

from .discretize import discretize
from .errors import SpecError
from .ir import Algorithm, Convention, KernelPlan, Loc, Method, SSMFamily


# The chunk of a chunked plan for a family whose spec names none (its compute is scan, and a
# caller asked for chunked): small enough for short sequences, a power of two as the kernels need.
DEFAULT_CHUNK_SIZE = 64


def chunk_size_of(family: SSMFamily, algorithm: Algorithm) -> Optional[int]:
    """The chunk size a plan of ``family`` with ``algorithm`` has: the spec's, else
    DEFAULT_CHUNK_SIZE; None for an algorithm that does not chunk. ``KernelPlan.chunk_size`` is
    the one truth a kernel and a call's ``chunk_size`` argument are checked against."""
    if algorithm is not Algorithm.CHUNKED:
        return None
    chunk = family.compute.chunk_size
    return DEFAULT_CHUNK_SIZE if chunk is None else chunk


def make_plan(family: SSMFamily, algorithm: Optional[Algorithm] = None) -> KernelPlan:
    """The plan for ``family`` with the spec's algorithm, or ``algorithm`` when given."""
    algorithm = algorithm or family.compute.algorithm
    if algorithm is Algorithm.CONV and not family.is_lti:
        raise SpecError(f"family {family.name} is selective, so the conv algorithm does not apply",
                        family.compute.loc)
    return KernelPlan(family=family, algorithm=algorithm, disc=discretize(family),
                      chunk_size=chunk_size_of(family, algorithm))


def require_sizes(fam: SSMFamily, what: str, how: str) -> None:
    """A SpecError naming the sizes ``fam`` leaves open, where ``what`` needs every size;
    ``how`` says how to give them."""
    if fam.dims.open:
        names = ", ".join(fam.dims.open)
        example = ", ".join(f"{n}={_EXAMPLE_SIZE[n]}" for n in fam.dims.open)
        raise SpecError(f"{fam.name} leaves {names} open (each call's tensors give "
                        f"{'it' if len(fam.dims.open) == 1 else 'them'}), so {what} needs "
                        f"{'it' if len(fam.dims.open) == 1 else 'them'}", fam.dims.loc,
                        how.format(sizes=example, cli=example.replace(", ", ",")))


_EXAMPLE_SIZE = {"heads": 80, "head_dim": 64, "channels": 1536, "state": 16, "groups": 1}


TRAPEZOIDAL_STEP = ("the trapezoidal method's decode step needs the previous token's B x, which "
                    "the state_update convention does not carry")


def plan_limits(plan: KernelPlan) -> Optional[str]:
    """Why no target can run ``plan`` (None if the plan itself is fine): facts of the math and
    the calling convention, so every backend's ``supports`` starts here instead of restating them."""
    if plan.algorithm is Algorithm.STEP and plan.family.method is Method.TRAPEZOIDAL:
        return TRAPEZOIDAL_STEP
    if plan.algorithm is Algorithm.CONV and not plan.family.is_lti:
        return "the conv algorithm needs a time-invariant (LTI) family (no selective Delta, A, B or C)"
    return None


def convention_of(plan: KernelPlan) -> Convention:
    """The mamba_ssm signature a plan's callable follows (docs/calling_convention.md)."""
    return plan.convention


def _canonical(node):
    """A JSON-able form of an IR node without source locations (they do not change the kernel)."""
    if isinstance(node, Loc):
        return None
    if dataclasses.is_dataclass(node):
        return {f.name: _canonical(getattr(node, f.name)) for f in dataclasses.fields(node)
                if f.name != "loc"}
    if isinstance(node, enum.Enum):
        return node.value
    if isinstance(node, (list, tuple)):
        return [_canonical(x) for x in node]
    if isinstance(node, float) and node == float("inf"):
        return "inf"
    return node


def ir_hash(node) -> str:
    """Content hash of an IR node (family, model or plan minus its sympy expressions)."""
    if isinstance(node, KernelPlan):
        payload = {"family": _canonical(node.family), "algorithm": node.algorithm.value,
                   "chunk_size": node.chunk_size,
                   "disc": [str(node.disc.abar), str(node.disc.bbar), str(node.disc.bbar_prev)]}
    else:
        payload = _canonical(node)
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
