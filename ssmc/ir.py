"""The ssmc IR: every node the compiler passes between stages, in one file.

Read this first. A spec file becomes a ``SpecFile`` holding ``SSMFamily`` and ``ModelSpec``
nodes; the discretization pass attaches a ``Discretized`` (sympy expressions); the planner
turns a family into ``KernelPlan`` s that backends lower. Every node is a frozen dataclass and
keeps the ``Loc`` it came from, so any later error can point at the spec line.

This module imports nothing else of ssmc (and no sympy): it is the vocabulary, not the logic.

Shapes, by convention (docs/calling_convention.md):
  b batch, l sequence length, h heads, p head_dim, d channels (= h*p), n state, g groups, r rank.
Families whose A is a scalar per head use mamba_ssm's SSD layout (x: b,l,h,p); every other
structure uses the selective-scan layout (u: b,d,l) with one state vector of size n per channel.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Optional, Tuple, Union


# --------------------------------------------------------------------------------------------
# Source locations

@dataclass(frozen=True)
class Loc:
    """Where a node came from: 1-based line and column, plus the source line for carets."""
    file: str = "<spec>"
    line: int = 0
    column: int = 0
    source_line: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NOLOC = Loc()


# --------------------------------------------------------------------------------------------
# Closed choices

class AStructure(Enum):
    SCALAR = "scalar"                    # one a per head, shared by head_dim and state (Mamba-2/SSD)
    DIAGONAL = "diagonal"                # a per channel x state (Mamba-1, S4D)
    COMPLEX_DIAGONAL = "complex_diagonal"  # complex a per channel x state (S4D-Lin, S5)
    DPLR = "dplr"                        # diag(Lambda) - P^T Q per channel, rank r (S4)
    DENSE = "dense"                      # small dense n x n per channel


class Method(Enum):
    """Discretization of h' = A h + B x over a step Delta."""
    ZOH = "zoh"                  # exact for piecewise-constant input
    BILINEAR = "bilinear"        # Tustin: trapezoid rule on the whole right-hand side
    EULER = "euler"              # forward Euler
    EXP_EULER = "exp_euler"      # Mamba's: Abar = exp(Delta A), Bbar = Delta B
    TRAPEZOIDAL = "trapezoidal"  # exponential-trapezoidal (Mamba-3): exact decay, trapezoid on input


class Algorithm(Enum):
    STEP = "step"        # one token, state updated in place (decode)
    SCAN = "scan"        # one pass over the sequence, state on chip
    CHUNKED = "chunked"  # SSD: quadratic within chunks, recurrence across chunks
    CONV = "conv"        # LTI only: y = K * x with K = (C Bbar, C Abar Bbar, ...)


class DType(Enum):
    FLOAT16 = "fp16"
    BFLOAT16 = "bf16"
    FLOAT32 = "fp32"
    FLOAT64 = "fp64"


class Sharing(Enum):
    """How a time-invariant or selective B/C (or D) is shared."""
    GROUP = "group"      # one per group of heads/channels (selective B/C default)
    HEAD = "head"        # one per head (scalar-A families) / channel (other families)
    HEAD_DIM = "head_dim"  # D only: one per head x head_dim element


class Convention(Enum):
    """Which mamba_ssm signature a compiled callable follows (docs/calling_convention.md)."""
    SSD = "ssd"                        # mamba_chunk_scan_combined
    SELECTIVE_SCAN = "selective_scan"  # selective_scan_fn
    STATE_UPDATE = "state_update"      # selective_state_update


# --------------------------------------------------------------------------------------------
# SSM families

@dataclass(frozen=True)
class Dims:
    """Sizes of a family. Scalar-A families use heads/head_dim; the others use channels.

    ``channels`` is the number of independent state vectors of size ``state`` (Mamba-1's d_inner).
    For scalar-A families channels == heads * head_dim.

    Every size is a default: a call runs a kernel specialized for its tensors' sizes. ``open``
    names the sizes the spec leaves to the call (``channels = any``); they hold 0 here, and a
    kernel is generated only once a call (or ``--size``) gives them.
    """
    state: int
    heads: int = 0
    head_dim: int = 1
    channels: int = 0
    groups: int = 1
    rank: int = 0          # DPLR only
    open: Tuple[str, ...] = ()
    loc: Loc = NOLOC

    @property
    def d_inner(self) -> int:
        return self.channels if self.channels else self.heads * self.head_dim


@dataclass(frozen=True)
class DeltaSpec:
    """Delta = clamp(softplus(dt + bias)); dt is (b,l,h)/(b,d,l) if selective else learned (h,)/(d,)."""
    selective: bool = True
    softplus: bool = True
    bias: bool = True
    clamp: Optional[Tuple[float, float]] = None   # (lo, hi); hi may be inf
    loc: Loc = NOLOC


@dataclass(frozen=True)
class ASpec:
    structure: AStructure
    selective: bool = False   # A_t a function of the input (per step); else a learned constant
    log_param: bool = True    # A = -exp(A_log): the module's parameterization, kernels take A itself
    loc: Loc = NOLOC


@dataclass(frozen=True)
class BCSpec:
    """B or C: selective (b,l,g,n)/(b,g,n,l), or a learned constant (g,n) / per head (h,n)/(d,n)."""
    selective: bool = True
    sharing: Sharing = Sharing.GROUP
    loc: Loc = NOLOC


@dataclass(frozen=True)
class DSpec:
    """The skip y += D x. sharing HEAD: (h,)/(d,); HEAD_DIM: (h,p) (SSD only)."""
    sharing: Sharing = Sharing.HEAD
    loc: Loc = NOLOC


@dataclass(frozen=True)
class GateSpec:
    """y *= silu(z), z shaped like x."""
    kind: str = "silu"
    loc: Loc = NOLOC


@dataclass(frozen=True)
class ComputeSpec:
    algorithm: Algorithm
    chunk_size: Optional[int] = None   # CHUNKED only
    loc: Loc = NOLOC


@dataclass(frozen=True)
class DTypes:
    inputs: Tuple[DType, ...] = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)
    state: DType = DType.FLOAT32
    accum: DType = DType.FLOAT32
    loc: Loc = NOLOC


@dataclass(frozen=True)
class SSMFamily:
    name: str
    dims: Dims
    A: ASpec
    delta: DeltaSpec
    B: BCSpec
    C: BCSpec
    method: Method
    compute: ComputeSpec
    D: Optional[DSpec] = None
    gate: Optional[GateSpec] = None
    dtypes: DTypes = field(default_factory=DTypes)
    loc: Loc = NOLOC

    def __hash__(self) -> int:
        # Kept after the first call: every call at a size other than the spec's looks its
        # family up by (family, sizes), and hashing the nested fields each time cost 5 us.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self):
        # str hashes differ between processes: a pickled family recomputes its own
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def is_lti(self) -> bool:
        """No parameter depends on the input: the convolutional mode is legal."""
        return not (self.delta.selective or self.A.selective or self.B.selective or self.C.selective)

    @property
    def convention(self) -> Convention:
        return Convention.SSD if self.A.structure is AStructure.SCALAR else Convention.SELECTIVE_SCAN


# --------------------------------------------------------------------------------------------
# Hybrid models

@dataclass(frozen=True)
class SSMBlock:
    family: str
    loc: Loc = NOLOC


@dataclass(frozen=True)
class AttentionBlock:
    heads: int
    kv_heads: int
    head_dim: Optional[int] = None     # default d_model // heads
    window: Optional[int] = None       # sliding window (tokens); None = full causal
    loc: Loc = NOLOC


@dataclass(frozen=True)
class MLPBlock:
    hidden: Optional[int] = None       # default 4 * d_model
    activation: str = "silu"           # gated (SwiGLU-style) when "silu"
    loc: Loc = NOLOC


@dataclass(frozen=True)
class MoEBlock:
    experts: int
    top_k: int
    hidden: Optional[int] = None
    loc: Loc = NOLOC


Block = Union[SSMBlock, AttentionBlock, MLPBlock, MoEBlock]


@dataclass(frozen=True)
class Repeat:
    """``[items] x count``: items may themselves be Repeats."""
    items: Tuple["LayoutItem", ...]
    count: int
    loc: Loc = NOLOC


LayoutItem = Union[Block, Repeat]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    d_model: int
    layout: Tuple[LayoutItem, ...]
    vocab: Optional[int] = None
    norm: str = "rmsnorm"
    loc: Loc = NOLOC

    def blocks(self) -> Tuple[Block, ...]:
        """The layout with every repetition unrolled, in execution order."""
        out = []

        def walk(items):
            for it in items:
                if isinstance(it, Repeat):
                    for _ in range(it.count):
                        walk(it.items)
                else:
                    out.append(it)

        walk(self.layout)
        return tuple(out)


@dataclass(frozen=True)
class SpecFile:
    families: Tuple[SSMFamily, ...]
    models: Tuple[ModelSpec, ...]
    file: str = "<spec>"
    text: str = ""

    def family(self, name: Optional[str] = None) -> SSMFamily:
        """The named family, or the only one. Raises KeyError/ValueError with the names known."""
        if name is None:
            if len(self.families) != 1:
                names = ", ".join(f.name for f in self.families) or "none"
                raise ValueError(f"{self.file} holds {len(self.families)} families ({names}); pick one with family=")
            return self.families[0]
        for f in self.families:
            if f.name == name:
                return f
        names = ", ".join(f.name for f in self.families) or "none"
        raise KeyError(f"{self.file} has no family {name!r} (it has: {names})")


# --------------------------------------------------------------------------------------------
# Discretization and plans

@dataclass(frozen=True)
class Discretized:
    """The discretized system, as sympy expressions (typed ``object`` so that ir needs no sympy).

    Scalar, diagonal and complex-diagonal A: elementwise expressions in the symbols ``dt`` (Delta
    after its parameterization) and ``a`` (one element of A):
        h_t = abar * h_{t-1} + bbar * B_t x_t + bbar_prev * B_{t-1} x_{t-1}
    ``bbar_prev`` is 0 except for the trapezoidal method.
    DPLR and dense A: the same three fields are matrix expressions in ``dt`` and the n x n
    MatrixSymbol ``a`` (for DPLR, a = diag(Lambda) - P^T Q is formed numerically first).

    Derived once here, so that backends only print:
    ``delta``: the Δ map, dt = clamp(softplus(dt_raw + dt_bias), lo, hi) with the terms the
    spec has (``ssmc.functions.Softplus``/``Clamp``), in the symbols ``dt_raw`` and ``dt_bias``.
    ``log_decay``: log(abar) (a*dt for every exp-type method; log(abar) itself where there is
    no closed form); ``prev_input``: bbar_prev / abar simplified, or None when bbar_prev is 0.
    Both None for matrix forms.
    ``split``: complex-diagonal A only, ((abar_re, abar_im), (bbar_re, bbar_im),
    (bbar_prev_re, bbar_prev_im)) in the real symbols ``a_re``, ``a_im``; None otherwise.
    """
    method: Method
    structure: AStructure
    dt: object
    a: object
    abar: object
    bbar: object
    bbar_prev: object
    delta: object = None
    dt_raw: object = None
    dt_bias: object = None
    log_decay: object = None
    prev_input: object = None
    split: object = None
    derivatives: Optional[Derivatives] = None


@dataclass(frozen=True)
class Derivatives:
    """The partial derivatives a backward kernel prints, as sympy expressions (elementwise A),
    differentiated once by the discretize pass from the very expressions the forward prints:
    ``abar_dt`` = ∂Ā/∂Δ, ``abar_a`` = ∂Ā/∂a, the same for ``bbar`` and ``bbar_prev``, and
    ``delta_raw`` = ∂Δ/∂dt_raw (= ∂Δ/∂dt_bias: the bias is added to dt_raw), with softplus'
    and the clamp's indicator.

    The adjoint recurrence they enter (per state element, λ_t = ∂L/∂h_t):
        λ_t = C_t dy_t + Ā_{t+1} λ_{t+1}
        ∂L/∂Δ_t += λ_t (∂Ā/∂Δ h_{t-1} + ∂B̄/∂Δ B_t x_t [+ ∂B̄₋/∂Δ B_{t-1} x_{t-1}])
        ∂L/∂a   += λ_t (∂Ā/∂a h_{t-1} + ∂B̄/∂a B_t x_t [+ ∂B̄₋/∂a B_{t-1} x_{t-1}])
        ∂L/∂B_t += λ_t B̄_t x_t,   ∂L/∂x_t += Σ_n λ_t B̄_t B_t [+ the next token's B̄₋ term]
    """
    abar_dt: object
    abar_a: object
    bbar_dt: object
    bbar_a: object
    bbar_prev_dt: object
    bbar_prev_a: object
    delta_raw: object = None
    # (∂Ā/∂Δ)/Ā and (∂Ā/∂a)/Ā where they have no pole (exp(aΔ): a and Δ). Then λ_t h_{t-1} ∂Ā
    # is λ_t (h_t - B̄_t B_t x_t) times the ratio: a backward kernel needs no h_{t-1} (a shift
    # of the states by one step). None where the ratio has a pole (Euler, bilinear: Ā = 0).
    abar_dt_over_abar: object = None
    abar_a_over_abar: object = None
    # The gate's output and ∂gate/∂z in the symbol ``gate_z`` (silu: z·Sigmoid(z) and
    # Sigmoid(z)(1 + z(1 − Sigmoid(z)))); None without a gate. y = (C h + D x)·gate(z), so
    # ∂L/∂z = dy·(C h + D x)·∂gate/∂z and the state sees dy·gate(z).
    gate: object = None
    gate_dz: object = None
    gate_z: object = None
    # Complex-diagonal A only: ((field name, (re, im)), ...) of every field above but
    # delta_raw (the ratios where not None), split by the pass (``ssmc.discretize.
    # split_complex``) into the real symbols a_re, a_im, for dialects without complex numbers
    # (pairs, not a dict: plans are hashed). None for real A.
    split: object = None
    # ∂/∂Δ and ∂/∂a of the previous-input weight B̄₋/Ā (``Discretized.prev_input``: what the
    # chunked algorithm applies at step t-1 for the term entering at t); None without one.
    prev_input_dt: object = None
    prev_input_a: object = None


@dataclass(frozen=True)
class KernelPlan:
    """One kernel to generate: a family, the algorithm, its discretized expressions, and the
    operand table of its calling convention (``ssmc.operands``: every argument's dims as size
    letters, role, need and dtypes), which validation, op schemas and every backend's
    parameters are read from."""
    family: SSMFamily
    algorithm: Algorithm
    disc: Discretized
    chunk_size: Optional[int] = None
    # Derived from (family, algorithm) when the plan is made: equal plans have equal tables.
    operands: object = field(default=None, compare=False, repr=False)

    @property
    def convention(self) -> Convention:
        """The mamba_ssm signature this plan's callable follows (docs/calling_convention.md)."""
        if self.algorithm is Algorithm.STEP:
            return Convention.STATE_UPDATE
        return self.family.convention

    def __post_init__(self):
        if self.operands is None:
            from .operands import operand_table
            object.__setattr__(self, "operands", operand_table(self.family, self.convention))
