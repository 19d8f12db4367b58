"""The kernel bodies: scan (also scalar A's chunked plan), the decode step, the convolution.

One generator per algorithm; the family's IR decides every variant through ``Layout`` (which
tensors exist, how they are indexed) and ``cexpr`` (Δ and the discretized coefficients).

Loop order: sequences, then the independent state rows ((head, head_dim) for scalar A,
channels otherwise), then time, then the state. The working state is one row of ``STATE``
floats on the stack: no heap, no workspace, so the kernels fit a microcontroller. For scalar A
this recomputes Δ and Ā once per head_dim row rather than once per head -- one expf against
the 3 * STATE multiply-adds of the row's update.
"""
from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from typing import List, Tuple

from ssmc.ir import Algorithm
from ssmc.lti import is_matrix_conv

from .cexpr import coefficient_statements, coefficient_terms, delta_statements
from .layout import INDEX_VAR, Layout, Param, tensor_names
from .matrix_conv import c_generator as matrix_c_generator
from .source import Code, prototype


def _time_invariant(L: Layout) -> bool:
    fam = L.plan.family
    return not (fam.delta.selective or fam.A.selective)


def _trapezoid(L: Layout) -> bool:
    return "bbar_prev" in coefficient_terms(L.plan)


def _uses_group(L: Layout, names) -> bool:
    return any(L.has(n) and "g" in L.param(n).dims for n in names)


def _parts(L: Layout) -> Tuple[str, ...]:
    return ("_re", "_im") if L.is_complex else ("",)


@contextmanager
def _row_loops(L: Layout, code: Code, need_group: bool):
    """Loops over the independent state rows, with the group index of each row."""
    with ExitStack() as stack:
        for dim in L.channel_dims:
            var = INDEX_VAR[dim]
            stack.enter_context(code.block(f"for (int64_t {var} = 0; {var} < {L.macro(dim)}; ++{var})"))
            if dim == L.coef_dim and need_group:
                per = f"({L.macro(dim)} / {L.macro('g')})"
                code(f"const int64_t gg = {INDEX_VAR[dim]} / {per};")
        yield


def _row_prelude(L: Layout, code: Code, hoisted: bool, with_D: bool = True) -> None:
    """Per-row constants: D, the Δ bias, a constant Δ and A, and time-invariant Ā, B̄."""
    fam, names = L.plan.family, _tensor_names(L)
    if with_D and L.has("D"):
        code(f"const float D_row = D ? {L.at('D')} : 0.0f;")
    if L.has(names["dt_bias"]):
        code(f"const float bias_row = {names['dt_bias']} ? {L.at(names['dt_bias'])} : 0.0f;")
    if not fam.delta.selective:
        code(*delta_statements(L.plan, L.at(names["dt"]), "bias_row", ""))
    if not L.per_state_coefs and not fam.A.selective:
        code(f"const float a_h = {L.at('A')};")
    if not hoisted:
        return
    if not L.per_state_coefs:
        code(*coefficient_statements(L.plan, "Delta", "a_h"))
        return
    # Diagonal A with constant Δ and A: Ā, B̄ per state element, computed once per row.
    arrays = [f"{c}{part}" for c in coefficient_terms(L.plan) for part in _parts(L)]
    code("float " + ", ".join(f"{a}_n[{L.macro('n')}]" for a in arrays) + ";")
    with code.block(_n_loop(L)):
        _load_a_n(L, code)
        code(*coefficient_statements(L.plan, "Delta", "a_n"))
        code(*[f"{a}_n[nn] = {a};" for a in arrays])


def _n_loop(L: Layout) -> str:
    return f"for (int64_t nn = 0; nn < {L.macro('n')}; ++nn)"


def _load_a_n(L: Layout, code: Code) -> None:
    if L.is_complex:
        code(f"const float a_n_re = {L.at('A')}, a_n_im = {L.at_im('A')};")
    else:
        code(f"const float a_n = {L.at('A')};")


def _time_prelude(L: Layout, code: Code, hoisted: bool, with_x: bool = True) -> None:
    """Per-token values: a selective Δ and A, scalar A's Ā, B̄, the input (and the last one)."""
    fam, names = L.plan.family, _tensor_names(L)
    if fam.delta.selective:
        code(*delta_statements(L.plan, L.at(names["dt"]), "bias_row" if L.has(names["dt_bias"])
                               else "0.0f", ""))
    if not L.per_state_coefs:
        if fam.A.selective:
            code(f"const float a_h = {L.at('A')};")
        if not hoisted:
            code(*coefficient_statements(L.plan, "Delta", "a_h"))
    if with_x:
        code(f"const float x_t = {L.at(names['x'])};")
    if _trapezoid(L) and L.plan.algorithm is not Algorithm.STEP:
        code(f"const float x_prev = t > t_begin ? {L.at(names['x'], l='t - 1')} : 0.0f;")


def _coefs_n(L: Layout, code: Code, hoisted: bool, terms=None) -> None:
    """Ā, B̄ of state element nn (diagonal A), from the row's arrays or computed here.

    ``terms``: which of them the loop uses (unused locals would break -Werror).
    """
    if not L.per_state_coefs:
        return
    if hoisted:
        for c in terms or coefficient_terms(L.plan):
            for part in _parts(L):
                code(f"const float {c}{part} = {c}{part}_n[nn];")
        return
    _load_a_n(L, code)
    code(*coefficient_statements(L.plan, "Delta", "a_n"))


def _update(L: Layout, code: Code, old: Tuple[str, ...], new: Tuple[str, ...],
            with_output: bool) -> None:
    """h = Ā h + B̄ B x (+ B̄_prev B_prev x_prev); optionally acc += C h (re part if complex)."""
    trap = _trapezoid(L) and L.plan.algorithm is not Algorithm.STEP
    b_sel = L.plan.family.B.selective
    if not L.is_complex:
        code(f"const float B_n = {L.at('B')};")
        term = "bbar * B_n * x_t"
        if trap:
            b_prev = f"(t > t_begin ? {L.at('B', l='t - 1')} : 0.0f)" if b_sel else "B_n"
            term += f" + bbar_prev * {b_prev} * x_prev"
        code(f"const float h_new = abar * {old[0]} + {term};", f"{new[0]} = h_new;")
        if with_output:
            code(f"acc += {L.at('C')} * h_new;")
        return
    code(f"const float B_re = {L.at('B')}, B_im = {L.at_im('B')};",
         "float u_re = (bbar_re * B_re - bbar_im * B_im) * x_t;",
         "float u_im = (bbar_re * B_im + bbar_im * B_re) * x_t;")
    if trap:
        if b_sel:
            code(f"const float Bp_re = t > t_begin ? {L.at('B', l='t - 1')} : 0.0f;",
                 f"const float Bp_im = t > t_begin ? {L.at_im('B', l='t - 1')} : 0.0f;")
        else:
            code("const float Bp_re = B_re, Bp_im = B_im;")
        code("u_re += (bbar_prev_re * Bp_re - bbar_prev_im * Bp_im) * x_prev;",
             "u_im += (bbar_prev_re * Bp_im + bbar_prev_im * Bp_re) * x_prev;")
    code(f"const float old_re = {old[0]}, old_im = {old[1]};",
         "const float h_new_re = abar_re * old_re - abar_im * old_im + u_re;",
         "const float h_new_im = abar_re * old_im + abar_im * old_re + u_im;",
         f"{new[0]} = h_new_re;", f"{new[1]} = h_new_im;")
    if with_output:
        code(f"acc += {L.at('C')} * h_new_re - {L.at_im('C')} * h_new_im;")


def _output(L: Layout, code: Code, acc: str = "acc", halved: bool = True) -> None:
    """y = acc (2 acc for complex A, whose acc sums Re(C h) over half the conjugate pairs)."""
    names = _tensor_names(L)
    value = f"2.0f * {acc}" if L.is_complex and halved else acc
    if L.has("D"):
        value += " + D_row * x_t"
    code(f"float y_t = {value};")
    if L.has("z"):
        code(f"if (z) y_t *= ssmc_silu({L.at('z')});")
    code(f"{L.at(names['y'])} = y_t;")


def _local_state(L: Layout) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The row's state array names and their element at nn."""
    arrays = tuple(f"h{p}" for p in _parts(L))
    return arrays, tuple(f"{a}[nn]" for a in arrays)


def _load_state(L: Layout, code: Code, name: str) -> None:
    arrays, elems = _local_state(L)
    code("float " + ", ".join(f"{a}[{L.macro('n')}]" for a in arrays) + ";")
    with code.block(_n_loop(L)):
        code(f"{elems[0]} = {name} ? {L.at(name)} : 0.0f;")
        if L.is_complex:
            code(f"{elems[1]} = {name} ? {L.at_im(name)} : 0.0f;")


def _store_state(L: Layout, code: Code, name: str) -> None:
    _, elems = _local_state(L)
    with code.block(f"if ({name})"):
        with code.block(_n_loop(L)):
            code(f"{L.at(name)} = {elems[0]};")
            if L.is_complex:
                code(f"{L.at_im(name)} = {elems[1]};")


def _tensor_names(L: Layout):
    return tensor_names(L)


def _conv_entry_start(L: Layout, kname: str, kparams) -> Code:
    """A conv entry's first lines: the size checks, then K computed into the workspace by the
    generated K kernel ``kname`` (its parameters after the length, with their strides)."""
    code = Code(1)
    _sequence_checks(L, code)
    call = ["seqlen"]
    for p in kparams[1:]:
        call += [p.name] + p.stride_names()
    with code.block("/* K first, into the workspace */"):
        code(f"const int rc = {kname}({', '.join(call)});", "if (rc != SSMC_OK) return rc;")
    return code


def _sequence_checks(L: Layout, code: Code) -> None:
    code("if (batch < 0 || seqlen < 0) return SSMC_ERR_SIZE;")
    with code.block("if (cu_seqlens)"):
        code("if (batch != 1) return SSMC_ERR_VARLEN_BATCH;",
             "if (ssmc_check_offsets(cu_seqlens, nseq, seqlen) != SSMC_OK) return SSMC_ERR_OFFSETS;")


@contextmanager
def _sequence_loop(code: Code):
    """One iteration per sequence: a batch row, or a cu_seqlens range of row 0 (varlen)."""
    code("const int64_t nseqs = cu_seqlens ? nseq : batch;")
    with code.block("for (int64_t s = 0; s < nseqs; ++s)"):
        code("const int64_t bi = cu_seqlens ? 0 : s;",
             "const int64_t t_begin = cu_seqlens ? cu_seqlens[s] : 0;",
             "const int64_t t_end = cu_seqlens ? cu_seqlens[s + 1] : seqlen;")
        yield


def _function(L: Layout, name: str, params, body: Code) -> str:
    return prototype(L, name, params) + "\n{\n" + body.text() + "}\n"


# --------------------------------------------------------------------------------------------
# The three algorithms

def scan(L: Layout) -> List[Tuple[str, tuple, List[str], str]]:
    """h_t = Ā h_{t-1} + B̄ B x_t over the sequence, one state row at a time."""
    names = _tensor_names(L)
    hoisted = _time_invariant(L)
    code = Code(1)
    _sequence_checks(L, code)
    with _sequence_loop(code), _row_loops(L, code, _uses_group(L, ("B", "C"))):
        _row_prelude(L, code, hoisted)
        _load_state(L, code, names["initial"])
        with code.block("for (int64_t t = t_begin; t < t_end; ++t)"):
            _time_prelude(L, code, hoisted)
            code("float acc = 0.0f;")
            with code.block(_n_loop(L)):
                _coefs_n(L, code, hoisted)
                _update(L, code, _local_state(L)[1], _local_state(L)[1], with_output=True)
            _output(L, code)
        _store_state(L, code, names["final"])
    code("return SSMC_OK;")
    summary = ["the sequential scan over each sequence" + (
        " (the chunked plan's entry: in C a direct per-head recurrence)"
        if L.plan.algorithm is Algorithm.CHUNKED else ""),
        "y and the final state from x, Delta, A, B, C, the initial state."]
    return [(L.entry, L.params, summary, _function(L, L.entry, L.params, code))]


def step(L: Layout):
    """One token per batch row; the state is read and written in place."""
    code = Code(1)
    code("if (batch < 0) return SSMC_ERR_SIZE;")
    with code.block("for (int64_t bi = 0; bi < batch; ++bi)"), \
            _row_loops(L, code, _uses_group(L, ("B", "C"))):
        _row_prelude(L, code, hoisted=False)
        _time_prelude(L, code, hoisted=False)
        code("float acc = 0.0f;")
        with code.block(_n_loop(L)):
            _coefs_n(L, code, hoisted=False)
            old = (L.at("state"), L.at_im("state")) if L.is_complex else (L.at("state"),)
            _update(L, code, old, old, with_output=True)
        _output(L, code)
    code("return SSMC_OK;")
    summary = ["the decode step: one token per batch row, the state updated in place."]
    return [(L.entry, L.params, summary, _function(L, L.entry, L.params, code))]


def _conv_kernel_params(L: Layout) -> Tuple[Param, ...]:
    names = _tensor_names(L)
    keep = [names["dt"], "A", "B", "C", names["dt_bias"], "conv_kernel"]
    length = Param("length", "size", "number of lags of K to compute")
    return (length,) + tuple(L.param(n) for n in keep if L.has(n))


def conv(L: Layout):
    """LTI: K_k = C Ā^k B̄ B (2 Re for complex A), then y = K * x, a direct causal convolution.

    The initial state's free response (C Ā^{t+1} h0) is added to y, and the final state is the
    recurrence run over the sequence: O(l n) each, beside the O(l^2) convolution. Matrix A
    (DPLR, dense): matrix_conv.py, the same structure with n x n products.
    """
    if is_matrix_conv(L.plan):
        return matrix_c_generator(L, sys.modules[__name__])
    names = _tensor_names(L)
    kname = f"{L.prefix}_conv_kernel"
    kparams = _conv_kernel_params(L)
    trap = _trapezoid(L)

    # K, for every head/channel, into the caller's (or the entry's workspace) buffer.
    kc = Code(1)
    kc("if (length < 0) return SSMC_ERR_SIZE;")
    coef_var = INDEX_VAR[L.coef_dim]
    with kc.block(f"for (int64_t {coef_var} = 0; {coef_var} < {L.macro(L.coef_dim)}; ++{coef_var})"):
        if _uses_group(L, ("B", "C")):
            kc(f"const int64_t gg = {coef_var} / ({L.macro(L.coef_dim)} / {L.macro('g')});")
        _row_prelude(L, kc, hoisted=True, with_D=False)
        parts = _parts(L)
        arrays = [f"w{p}" for p in parts] + ([f"v{p}" for p in parts] if trap else [])
        kc("float " + ", ".join(f"{a}[{L.macro('n')}]" for a in arrays) + ";")
        kc("/* w = Abar^k Bbar B; the trapezoid's B_{t-1} term joins it from lag 1 on (v). */")
        with kc.block(_n_loop(L)):
            _coefs_n(L, kc, hoisted=True, terms=[c for c in coefficient_terms(L.plan) if c != "abar"])
            if L.is_complex:
                kc(f"const float B_re = {L.at('B')}, B_im = {L.at_im('B')};",
                   "w_re[nn] = bbar_re * B_re - bbar_im * B_im;",
                   "w_im[nn] = bbar_re * B_im + bbar_im * B_re;")
                if trap:
                    kc("v_re[nn] = bbar_prev_re * B_re - bbar_prev_im * B_im;",
                       "v_im[nn] = bbar_prev_re * B_im + bbar_prev_im * B_re;")
            else:
                kc(f"w[nn] = bbar * {L.at('B')};")
                if trap:
                    kc(f"v[nn] = bbar_prev * {L.at('B')};")
        with kc.block("for (int64_t k = 0; k < length; ++k)"):
            kc("float acc = 0.0f;")
            with kc.block(_n_loop(L)):
                if L.is_complex:
                    kc(f"acc += {L.at('C')} * w_re[nn] - {L.at_im('C')} * w_im[nn];")
                else:
                    kc(f"acc += {L.at('C')} * w[nn];")
            kc(f"{L.at('conv_kernel')} = {'2.0f * acc' if L.is_complex else 'acc'};")
            with kc.block(_n_loop(L)):
                _coefs_n(L, kc, hoisted=True, terms=["abar"])
                if L.is_complex:
                    kc("const float w_re_old = w_re[nn];",
                       "w_re[nn] = abar_re * w_re_old - abar_im * w_im[nn];",
                       "w_im[nn] = abar_re * w_im[nn] + abar_im * w_re_old;")
                    if trap:
                        kc("if (k == 0) { w_re[nn] += v_re[nn]; w_im[nn] += v_im[nn]; }")
                else:
                    kc("w[nn] = abar * w[nn];")
                    if trap:
                        kc("if (k == 0) w[nn] += v[nn];")
    kc("return SSMC_OK;")

    # The entry: K, then per row the convolution plus the initial state's free response.
    code = _conv_entry_start(L, kname, kparams)
    x, init, final = names["x"], names["initial"], names["final"]
    arrays, elems = _local_state(L)
    with _sequence_loop(code), _row_loops(L, code, _uses_group(L, ("B", "C"))):
        _row_prelude(L, code, hoisted=True)
        _load_state(L, code, init)
        with code.block("for (int64_t t = t_begin; t < t_end; ++t)"):
            code("float acc = 0.0f;")
            with code.block("for (int64_t j = t_begin; j <= t; ++j)"):
                code(f"acc += {L.at('conv_kernel', k='t - j')} * {L.at(x, l='j')};")
            with code.block(f"if ({init})"):
                code("/* the initial state's free response: h <- Abar h, y += C h */",
                     "float free_response = 0.0f;")
                with code.block(_n_loop(L)):
                    _coefs_n(L, code, hoisted=True, terms=["abar"])
                    if L.is_complex:
                        code("const float old_re = h_re[nn];",
                             "h_re[nn] = abar_re * old_re - abar_im * h_im[nn];",
                             "h_im[nn] = abar_re * h_im[nn] + abar_im * old_re;",
                             f"free_response += {L.at('C')} * h_re[nn] - {L.at_im('C')} * h_im[nn];")
                    else:
                        code("h[nn] = abar * h[nn];", f"free_response += {L.at('C')} * h[nn];")
                code(f"acc += {'2.0f * free_response' if L.is_complex else 'free_response'};")
            if L.has("D"):
                code(f"const float x_t = {L.at(x)};")
            _output(L, code, halved=False)  # K and the free response are already 2 Re(...)
        with code.block(f"if ({final})"):
            code("/* the final state: the recurrence over the sequence (no outputs) */")
            with code.block(_n_loop(L)):
                code(f"{elems[0]} = {init} ? {L.at(init)} : 0.0f;")
                if L.is_complex:
                    code(f"{elems[1]} = {init} ? {L.at_im(init)} : 0.0f;")
            with code.block("for (int64_t t = t_begin; t < t_end; ++t)"):
                code(f"const float x_t = {L.at(x)};")
                if trap:
                    code(f"const float x_prev = t > t_begin ? {L.at(x, l='t - 1')} : 0.0f;")
                with code.block(_n_loop(L)):
                    _coefs_n(L, code, hoisted=True)
                    _update(L, code, elems, elems, with_output=False)
            _store_state(L, code, final)
    code("return SSMC_OK;")
    ksummary = ["the convolution kernel K (heads or channels, length) of the LTI system:",
                "K_0 = C Bbar B, K_k = C Abar^(k-1) (Abar Bbar + Bbar_prev) B."]
    summary = ["the LTI system as a direct causal convolution y = K * x (no FFT library);",
               "conv_kernel is the workspace K is computed into (seqlen lags)."]
    return [(kname, kparams, ksummary, _function(L, kname, kparams, kc)),
            (L.entry, L.params, summary, _function(L, L.entry, L.params, code))]


GENERATORS = {Algorithm.SCAN: scan, Algorithm.CHUNKED: scan, Algorithm.STEP: step,
              Algorithm.CONV: conv}
