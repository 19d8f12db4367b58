"""Ā, B̄ and Δ as C statements, printed from the plan's sympy expressions.

The math comes from ``plan.disc`` (derived by ``ssmc.discretize``) through the sympy C printer
of ``ssmc.printers``; this module only chooses float spellings, rewrites ``exp(x) - 1`` as
``expm1`` (without it, ZOH's B̄ = (e^{aΔ} - 1)/a loses all its digits when |aΔ| ~ 1e-4 in
float), takes complex expressions as real and imaginary parts (``ssmc.discretize.split_complex``:
the generated C keeps complex numbers as re/im float pairs), and shares common subexpressions
between Ā, B̄ and B̄_prev.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import sympy as sp
from sympy.codegen.ast import float32, real

from ssmc.discretize import A_IM, A_RE
from ssmc.ir import AStructure, KernelPlan
from ssmc.printers import CPrinter, stable_form

COEF_NAMES = ("abar", "bbar", "bbar_prev")


def c_float(expr, names: Dict[str, str]) -> str:
    """A real sympy expression as a C float expression (cosf, expm1f, 0.5f: nothing in double).

    ssmc's C printer with sympy's float32 type alias, so that the functions that only
    complex-diagonal A brings in (cos, sin) are printed in their float forms too.
    """
    return CPrinter(names=names, type_aliases={real: float32}).doprint(sp.sympify(expr))


# --------------------------------------------------------------------------------------------
# Statements for the coefficients

def _cse_statements(exprs: Sequence, out_names: Sequence[str], names: Dict[str, str],
                    prefix: str, indent: str) -> List[str]:
    """``const float`` statements: shared temporaries, then one per output name."""
    replacements, reduced = sp.cse(list(exprs), symbols=sp.numbered_symbols(f"{prefix}tmp"))
    lines = []
    local = dict(names)
    for sym, sub in replacements:
        local[sym.name] = sym.name
        lines.append(f"{indent}const float {sym.name} = {c_float(sub, local)};")
    for out, e in zip(out_names, reduced):
        lines.append(f"{indent}const float {out} = {c_float(e, local)};")
    return lines


def coefficient_terms(plan: KernelPlan) -> Tuple[str, ...]:
    """Which of abar, bbar, bbar_prev the plan's method needs (bbar_prev only when nonzero)."""
    d = plan.disc
    return tuple(n for n, e in zip(COEF_NAMES, (d.abar, d.bbar, d.bbar_prev))
                 if not (n == "bbar_prev" and sp.sympify(e) == 0))


def coefficient_statements(plan: KernelPlan, delta: str, a_name: str, suffix: str = "",
                           indent: str = "") -> List[str]:
    """C statements defining abar, bbar (and bbar_prev) from the Δ variable and the A element.

    Real A: ``const float abar<suffix> = ...;`` from the element ``a_name``.
    Complex A: ``abar<suffix>_re`` / ``_im`` from ``a_name_re`` / ``a_name_im``.
    """
    d = plan.disc
    wanted = coefficient_terms(plan)
    exprs = [stable_form(e) for n, e in zip(COEF_NAMES, (d.abar, d.bbar, d.bbar_prev))
             if n in wanted]
    names = {d.dt.name: delta}
    if plan.family.A.structure is AStructure.COMPLEX_DIAGONAL:
        names.update({A_RE.name: f"{a_name}_re", A_IM.name: f"{a_name}_im"})
        parts, outs = [], []
        for i, n in enumerate(COEF_NAMES):
            if n in wanted:
                parts += list(d.split[i])   # split once by the discretize pass
                outs += [f"{n}{suffix}_re", f"{n}{suffix}_im"]
        return _cse_statements(parts, outs, names, f"c{suffix}_", indent)
    names[d.a.name] = a_name
    return _cse_statements(exprs, [f"{n}{suffix}" for n in wanted], names, f"c{suffix}_", indent)


def delta_statements(plan: KernelPlan, raw: str, bias: str, indent: str) -> List[str]:
    """``float Delta`` from the raw dt element, printed from the plan's Δ map (bias, softplus,
    clamp as the spec says). ``bias`` is the text of the bias element (``0.0f`` when absent)."""
    names = {plan.disc.dt_raw.name: raw, plan.disc.dt_bias.name: bias}
    return [f"{indent}float Delta = {c_float(plan.disc.delta, names)};"]
