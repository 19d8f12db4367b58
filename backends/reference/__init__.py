"""The reference backend: the float64 oracle every generated kernel is checked against.

Written straight from the recurrence h_t = Ā_t h_{t-1} + B̄_t x_t (+ B̄'_t x_{t-1}),
y_t = C_t h_t + D x_t, y *= silu(z), one code path for every family: ``codegen`` prints the
family's Δ map and its discretized Ā, B̄ (from ``ssmc.discretize``) into a small numpy
module, ``layout`` brings any convention to that module's one layout. It calls no other
backend and shares no code path with the kernels it checks.

    kernel = build(plan, {})
    y, final_state = kernel(problem)      # y in the input dtype, states fp32, like the others
    y64, state64 = run_float64(problem)   # float64 / complex128 torch tensors on the CPU
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

import torch

from ssmc.backends import ALL_STRUCTURES, Capabilities, header
from ssmc.discretize import discretize
from ssmc.errors import CallError
from ssmc.ir import Algorithm, DType, KernelPlan, SSMFamily
from ssmc.plan import chunk_size_of, plan_limits
from ssmc.signature import COMPLEX_OF, TORCH_DTYPE, StateUpdateProblem

from . import layout
from .codegen import MATRIX_STRUCTURES, generate

NAME = "reference"
# Every family, in float64 whatever the spec's dtypes; tensors on any device (moved to the CPU
# and back).
CAPABILITIES = Capabilities("reference", tuple((a, ALL_STRUCTURES) for a in Algorithm),
                            state_dtypes=frozenset(DType), device="any")


def supports(plan: KernelPlan) -> Optional[str]:
    return CAPABILITIES.refuses(plan) or plan_limits(plan)


def default_config(plan: KernelPlan) -> dict:
    return {}


def candidates(plan: KernelPlan) -> List[dict]:
    return [{}]


def lower(plan: KernelPlan, config: dict, dialect: str = "numpy") -> str:
    """The generated numpy module (readable; ``build`` runs exactly this text); in the torch
    dialect, the gradient oracle's."""
    return header(plan, config, "reference") + generate(plan, config, dialect)


def _load(plan: KernelPlan, source: str) -> dict:
    namespace = {"__name__": f"ssmc_reference_{plan.family.name}"}
    exec(compile(source, f"<ssmc reference {plan.family.name}>", "exec"), namespace)
    if "DISC" in namespace:
        namespace["DISC"] = plan.disc if plan.disc is not None else discretize(plan.family)
    return namespace


def build(plan: KernelPlan, config: dict, cache=None):
    """kernel(problem) -> (y, final_state_or_None), like every backend; the decode step updates
    ``problem.state`` in place (cast back to its dtype) and returns (y, None)."""
    source = lower(plan, config)
    recurrence = _load(plan, source)["recurrence"]

    def run_float64(problem):
        y, state = layout.run(recurrence, problem)
        return torch.from_numpy(y), torch.from_numpy(state)

    def kernel(problem):
        if problem.family != plan.family:
            raise CallError(f"this reference kernel was built for family {plan.family.name}; "
                            f"the problem was bound for {problem.family.name}")
        y64, state64 = run_float64(problem)
        y = y64.to(device=problem.device, dtype=problem.dtype)
        if isinstance(problem, StateUpdateProblem):
            problem.state.copy_(state64)
            return y, None
        if not problem.wants_final_state:
            return y, None
        state_dtype = TORCH_DTYPE[problem.family.dtypes.state]
        if state64.is_complex():
            state_dtype = COMPLEX_OF[state_dtype]
        return y, state64.to(device=problem.device, dtype=state_dtype)

    kernel.plan, kernel.source, kernel.run_float64 = plan, source, run_float64
    return kernel


def write_artifact(plan: KernelPlan, config: dict, out_dir, cache=None) -> List[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{plan.family.name}_reference.py"
    path.write_text(lower(plan, config))
    return [os.fspath(path)]


def plan_for(family: SSMFamily, algorithm: Optional[Algorithm] = None) -> KernelPlan:
    """The plan the oracle runs for a family (the algorithm does not change what it computes)."""
    algorithm = algorithm or family.compute.algorithm
    return KernelPlan(family, algorithm, discretize(family), chunk_size_of(family, algorithm))


@functools.lru_cache(maxsize=64)
def _kernel_for(family: SSMFamily):
    return build(plan_for(family), {})


def run_float64(problem):
    """float64 y and final state (complex128 for complex A) of a bound problem, on the CPU.

    The final state is always returned (the decode step's new state, without touching
    ``problem.state``), whatever the problem's return flags say.
    """
    return _kernel_for(problem.family).run_float64(problem)


@functools.lru_cache(maxsize=64)
def _differentiable_recurrence(family: SSMFamily):
    plan = plan_for(family)
    if plan.family.A.structure in MATRIX_STRUCTURES:
        raise CallError(f"the gradient oracle covers elementwise A (scalar, diagonal, complex "
                        f"diagonal); {family.name}'s A is {family.A.structure.value}")
    return _load(plan, lower(plan, {}, "torch"))["recurrence"]


def run_float64_differentiable(problem):
    """The gradient oracle: float64 (complex128) y and final state as torch tensors on the
    CPU, in autograd's graph of the problem's tensors. The same recurrence as ``run_float64``,
    printed in the torch dialect; ``torch.autograd.grad`` through it is the reference every
    generated backward kernel is checked against (tests/test_gradients.py checks it with
    gradcheck and finite differences)."""
    return layout.run(_differentiable_recurrence(problem.family), problem, layout.Arrays.TORCH)


def reference(problem):
    """The oracle as a kernel: (y in the input dtype, final state fp32 or None)."""
    return _kernel_for(problem.family)(problem)


__all__ = ["supports", "default_config", "candidates", "lower", "build", "write_artifact",
           "run_float64", "run_float64_differentiable", "reference", "plan_for", "NAME"]
