"""LTI helpers shared by backends: the conv kernel coefficients of a linear time-invariant SSM
computed on the host.

A matrix family's Ā = abar(Δ, A) (DPLR, dense) is an n x n matrix function per channel (an
exponential or a solve), which neither a microcontroller C kernel nor a TIR kernel should carry.
So, per call, ``host_coefficients`` forms A (diag(Λ) − Pᵀ Q for DPLR, A for dense) and evaluates
the plan's discretized expressions in float64 with ``ssmc.discretize.evaluate`` (the oracle's
own matrix path); the generated conv kernels (C target, CPU target) then only multiply.

torch is imported inside the functions that take tensors: code generation (``ssmc compile``)
only needs ``is_matrix_conv`` and ``has_prev_term`` and should not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from ssmc.ir import Algorithm, AStructure, KernelPlan, Sharing

if TYPE_CHECKING:
    import torch

MATRIX = (AStructure.DPLR, AStructure.DENSE)


def is_matrix_conv(plan: KernelPlan) -> bool:
    return plan.algorithm is Algorithm.CONV and plan.family.A.structure in MATRIX


def has_prev_term(plan: KernelPlan) -> bool:
    """The trapezoidal method's B̄' (B_{t-1} x_{t-1}) term: zero (a ZeroMatrix) otherwise."""
    expr = plan.disc.bbar_prev
    return not (getattr(expr, "is_ZeroMatrix", False) or expr == 0)


def _delta(plan: KernelPlan, delta: torch.Tensor, bias: Optional[torch.Tensor]):
    """Δ per channel, float64 numpy, from the pass's Δ map (a None bias drops its term)."""
    import torch

    from ssmc.discretize import evaluate_delta

    def host(t):
        return None if t is None else t.detach().to("cpu", torch.float64).numpy()
    return evaluate_delta(plan.disc, host(delta), host(bias) if plan.family.delta.bias else None)


def _per_channel(t: torch.Tensor, spec, d: int) -> torch.Tensor:
    """A constant B/C as (d, n): a group's row repeated over its channels."""
    import torch
    t = t.detach().to("cpu", torch.float64)
    if spec.sharing is Sharing.GROUP and t.shape[0] != d:
        t = t.repeat_interleave(d // t.shape[0], dim=0)
    return t


def continuous_a(family, problem) -> torch.Tensor:
    """A (d, n, n) float64: diag(Λ) − Pᵀ Q for DPLR, the given matrices for dense."""
    import torch
    A = problem.A.detach().to("cpu", torch.float64)
    if family.A.structure is AStructure.DENSE:
        return A
    P = problem.P.detach().to("cpu", torch.float64)
    Q = problem.Q.detach().to("cpu", torch.float64)
    return torch.diag_embed(A) - torch.einsum("drn,drm->dnm", P, Q)


def host_coefficients(plan: KernelPlan, problem) -> Dict[str, torch.Tensor]:
    """float32 contiguous ``abar`` (d, n, n), ``bbar_B`` (d, n), ``bbar_prev_B`` (d, n; only when
    the method has that term) and ``C`` (d, n), computed in float64."""
    import torch

    from ssmc.discretize import evaluate
    fam = plan.family
    d = fam.dims.d_inner
    dt = _delta(plan, problem.delta, problem.delta_bias)
    abar, bbar, bbar_prev = evaluate(plan.disc, dt, continuous_a(fam, problem).numpy())
    B = _per_channel(problem.B, fam.B, d)
    out = {"abar": torch.from_numpy(abar),
           "bbar_B": torch.einsum("dij,dj->di", torch.from_numpy(bbar), B),
           "C": _per_channel(problem.C, fam.C, d)}
    if has_prev_term(plan):
        out["bbar_prev_B"] = torch.einsum("dij,dj->di", torch.from_numpy(bbar_prev), B)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}
