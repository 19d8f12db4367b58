"""The convolution for matrix A (DPLR, dense) in C: K by power iteration over the host's Ā, B̄ B.

Ā (an n x n matrix function per channel) is not formed in C: ``ssmc.lti.host_coefficients``
evaluates the plan's discretized expressions in float64 on the host, per call, and the generated
functions only multiply: K_k = C Ā^k B̄ B (the trapezoid's B̄' B joins at lag 1), the initial
state's free response C Ā^(t+1) h0, and the final state's recurrence. The C entry of a matrix
conv plan takes the host's results (``abar``, ``bbar_B``, ...) in place of dt, A, B, P, Q:
``calling.marshal`` fills them in from the bound problem.
"""
from __future__ import annotations

from typing import List, Tuple

from ssmc.ir import KernelPlan
from ssmc.lti import has_prev_term


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
    Code, names = helpers.Code, helpers.tensor_names(L)
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

    code = helpers._conv_entry_start(L, kname, kparams)
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
