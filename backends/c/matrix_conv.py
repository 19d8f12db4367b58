"""The convolution for matrix A (DPLR, dense): Ā, B̄ B formed on the host, K by power iteration.

A matrix family's Ā = abar(Δ, A) is an n x n matrix function per channel (an exponential or a
solve), which neither a microcontroller C kernel nor the TIR kernel should carry. So, per call,
``host_coefficients`` forms A (diag(Λ) − Pᵀ Q for DPLR, A for dense) and evaluates the plan's
discretized expressions in float64 with ``ssmc.discretize.evaluate`` (the oracle's own matrix
path); the generated kernels then only multiply: K_k = C Ā^k B̄ B (the trapezoid's B̄' B joins at
lag 1), the initial state's free response C Ā^(t+1) h0, and the final state's recurrence.

This module has no TVM dependency: the CPU backend imports ``host_coefficients`` from here too.
The C entry of a matrix conv plan takes the host's results (``abar``, ``bbar_B``, ...) in place of
dt, A, B, P, Q: ``calling.marshal`` fills them in from the bound problem.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ssmc.discretize import evaluate
from ssmc.ir import Algorithm, AStructure, KernelPlan, Sharing

MATRIX = (AStructure.DPLR, AStructure.DENSE)


def is_matrix_conv(plan: KernelPlan) -> bool:
    return plan.algorithm is Algorithm.CONV and plan.family.A.structure in MATRIX


def _delta(family, delta: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Δ per channel in float64: + bias, softplus, clamp (the spec's order)."""
    dt = delta.detach().to("cpu", torch.float64)
    if family.delta.bias and bias is not None:
        dt = dt + bias.detach().to("cpu", torch.float64)
    if family.delta.softplus:
        dt = torch.nn.functional.softplus(dt)
    if family.delta.clamp is not None:
        lo, hi = (float(v) for v in family.delta.clamp)
        dt = dt.clamp(min=lo, max=hi if np.isfinite(hi) else None)
    return dt


def _per_channel(t: torch.Tensor, spec, d: int) -> torch.Tensor:
    """A constant B/C as (d, n): a group's row repeated over its channels."""
    t = t.detach().to("cpu", torch.float64)
    if spec.sharing is Sharing.GROUP and t.shape[0] != d:
        t = t.repeat_interleave(d // t.shape[0], dim=0)
    return t


def continuous_a(family, problem) -> torch.Tensor:
    """A (d, n, n) float64: diag(Λ) − Pᵀ Q for DPLR, the given matrices for dense."""
    A = problem.A.detach().to("cpu", torch.float64)
    if family.A.structure is AStructure.DENSE:
        return A
    P = problem.P.detach().to("cpu", torch.float64)
    Q = problem.Q.detach().to("cpu", torch.float64)
    return torch.diag_embed(A) - torch.einsum("drn,drm->dnm", P, Q)


def host_coefficients(plan: KernelPlan, problem) -> Dict[str, torch.Tensor]:
    """float32 contiguous ``abar`` (d, n, n), ``bbar_B`` (d, n), ``bbar_prev_B`` (d, n; only when
    the method has that term) and ``C`` (d, n), computed in float64."""
    fam = plan.family
    d = fam.dims.d_inner
    dt = _delta(fam, problem.delta, problem.delta_bias)
    abar, bbar, bbar_prev = evaluate(plan.disc, dt.numpy(), continuous_a(fam, problem).numpy())
    B = _per_channel(problem.B, fam.B, d)
    out = {"abar": torch.from_numpy(abar),
           "bbar_B": torch.einsum("dij,dj->di", torch.from_numpy(bbar), B),
           "C": _per_channel(problem.C, fam.C, d)}
    if has_prev_term(plan):
        out["bbar_prev_B"] = torch.einsum("dij,dj->di", torch.from_numpy(bbar_prev), B)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def has_prev_term(plan: KernelPlan) -> bool:
    """The trapezoidal method's B̄' (B_{t-1} x_{t-1}) term: zero (a ZeroMatrix) otherwise."""
    expr = plan.disc.bbar_prev
    return not (getattr(expr, "is_ZeroMatrix", False) or expr == 0)


# --------------------------------------------------------------------------------------------
# The C target: the entry's parameters and the generated functions

def c_params(plan: KernelPlan, params: List, param_cls) -> List:
    """The entry's parameters with dt, A, B, C and the Δ bias replaced by the host's results."""
    drop = {"delta", "A", "B", "C", "delta_bias"}
    out = []
    for p in params:
        if p.name in drop:
            if p.name == "A":
                out.append(param_cls("abar", "tensor", "discretized A (per channel, n x n), from "
                                     "the host's float64 evaluation", ("d", "n", "m")))
                out.append(param_cls("bbar_B", "tensor", "Bbar B (per channel)", ("d", "n")))
                if has_prev_term(plan):
                    out.append(param_cls("bbar_prev_B", "tensor", "Bbar_prev B: the previous "
                                         "input's term (trapezoid)", ("d", "n")))
                out.append(param_cls("C", "tensor", "C (per channel)", ("d", "n")))
            continue
        out.append(p)
    return out


def c_generator(L, helpers) -> List[Tuple[str, tuple, List[str], str]]:
    """The conv kernel K and the entry, in C. ``helpers``: kernels.py (its shared emitters)."""
    Code, names = helpers.Code, helpers.tensor_names(L.convention)
    prev = L.has("bbar_prev_B")
    n = L.macro("n")
    n_loop, m_loop = helpers._n_loop(L), f"for (int64_t mm = 0; mm < {L.macro('m')}; ++mm)"
    kname = f"{L.prefix}_conv_kernel"
    keep = ["abar", "bbar_B"] + (["bbar_prev_B"] if prev else []) + ["C", "conv_kernel"]
    kparams = (helpers.Param("length", "size", "number of lags of K to compute"),) + \
        tuple(L.param(k) for k in keep)

    def matvec(code, src, dst):
        with code.block(n_loop):
            code("float s = 0.0f;")
            with code.block(m_loop):
                code(f"s += {L.at('abar')} * {src}[mm];")
            code(f"{dst}[nn] = s;")

    kc = Code(1)
    kc("if (length < 0) return SSMC_ERR_SIZE;")
    with kc.block(f"for (int64_t ch = 0; ch < {L.macro('d')}; ++ch)"):
        kc(f"float v[{n}], v_next[{n}];")
        kc("/* v = Abar^k Bbar B (+ Abar^(k-1) Bbar_prev B from lag 1 on) */")
        with kc.block(n_loop):
            kc(f"v[nn] = {L.at('bbar_B')};")
        with kc.block("for (int64_t k = 0; k < length; ++k)"):
            kc("float acc = 0.0f;")
            with kc.block(n_loop):
                kc(f"acc += {L.at('C')} * v[nn];")
            kc(f"{L.at('conv_kernel')} = acc;")
            matvec(kc, "v", "v_next")
            with kc.block(n_loop):
                lag1 = f" + (k == 0 ? {L.at('bbar_prev_B')} : 0.0f)" if prev else ""
                kc(f"v[nn] = v_next[nn]{lag1};")
    kc("return SSMC_OK;")

    code = Code(1)
    helpers._sequence_checks(L, code)
    call = ["seqlen"]
    for p in kparams[1:]:
        call += [p.name] + p.stride_names()
    with code.block("/* K first, into the workspace */"):
        code(f"const int rc = {kname}({', '.join(call)});", "if (rc != SSMC_OK) return rc;")
    x, init, final = names["x"], names["initial"], names["final"]
    with helpers._sequence_loop(code), helpers._row_loops(L, code, False):
        if L.has("D"):
            code(f"const float D_row = D ? {L.at('D')} : 0.0f;")
        helpers._load_state(L, code, init)
        code(f"float h_next[{n}];")
        with code.block("for (int64_t t = t_begin; t < t_end; ++t)"):
            code("float acc = 0.0f;")
            with code.block("for (int64_t j = t_begin; j <= t; ++j)"):
                code(f"acc += {L.at('conv_kernel', k='t - j')} * {L.at(x, l='j')};")
            with code.block(f"if ({init})"):
                code("/* the initial state's free response: h <- Abar h, y += C h */")
                matvec(code, "h", "h_next")
                with code.block(n_loop):
                    code("h[nn] = h_next[nn];", f"acc += {L.at('C')} * h[nn];")
            if L.has("D"):
                code(f"const float x_t = {L.at(x)};")
            helpers._output(L, code, halved=False)
        with code.block(f"if ({final})"):
            code("/* the final state: h = Abar h + Bbar B x_t (+ Bbar_prev B x_{t-1}) */")
            with code.block(n_loop):
                code(f"h[nn] = {init} ? {L.at(init)} : 0.0f;")
            with code.block("for (int64_t t = t_begin; t < t_end; ++t)"):
                code(f"const float x_t = {L.at(x)};")
                if prev:
                    code(f"const float x_prev = t > t_begin ? {L.at(x, l='t - 1')} : 0.0f;")
                matvec(code, "h", "h_next")
                with code.block(n_loop):
                    term = f" + {L.at('bbar_prev_B')} * x_prev" if prev else ""
                    code(f"h[nn] = h_next[nn] + {L.at('bbar_B')} * x_t{term};")
            helpers._store_state(L, code, final)
    code("return SSMC_OK;")
    ksummary = ["the convolution kernel K (channels, length) of the LTI system (matrix A):",
                "K_0 = C Bbar B, K_k = C Abar^(k-1) (Abar Bbar + Bbar_prev) B (power iteration)."]
    summary = ["the LTI system (matrix A) as a direct causal convolution y = K * x;",
               "abar, bbar_B (bbar_prev_B) are the host's float64 discretization, in fp32;",
               "conv_kernel is the workspace K is computed into (seqlen lags)."]
    return [(kname, kparams, ksummary, helpers._function(L, kname, kparams, kc)),
            (L.entry, L.params, summary, helpers._function(L, L.entry, L.params, code))]
