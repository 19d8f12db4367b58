"""Symbolic discretization: derive Abar, Bbar from the continuous system h' = a h + b u.

Each method is a statement about one step of length dt (the input u held or interpolated over
the step); sympy solves or integrates it, and the coefficients of h_{t-1}, u_t and u_{t-1} are
read off. Nothing here is a hand-typed table: change a method's statement and every backend's
kernel follows, since backends only print these expressions.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .ir import AStructure, Discretized, Method, SSMFamily

# dt > 0 is Delta after softplus/bias/clamp; a != 0 is one element of A (negative real, or complex
# with negative real part). Declaring a nonzero lets sympy integrate exp(a s) without a Piecewise.
DT = sp.Symbol("dt", positive=True)
A_REAL = sp.Symbol("a", negative=True)
A_COMPLEX = sp.Symbol("a", nonzero=True)

_h0, _h1, _u0, _u1, _s = sp.symbols("h_prev h_next u_prev u_next s")


def _one_step(method: Method, a, dt):
    """h_next as an expression of h_prev, u_next (the step's input) and u_prev (the last one)."""
    if method is Method.EULER:
        return _h0 + dt * (a * _h0 + _u1)
    if method is Method.BILINEAR:
        # Trapezoid rule on the whole right-hand side with the input held over the step: implicit.
        eq = sp.Eq(_h1, _h0 + dt / 2 * ((a * _h0 + _u1) + (a * _h1 + _u1)))
        return sp.solve(eq, _h1)[0]
    if method is Method.ZOH:
        # Variation of constants with u held: h(dt) = e^{a dt} h0 + int_0^dt e^{a (dt - s)} u ds.
        return sp.exp(a * dt) * _h0 + sp.integrate(sp.exp(a * (dt - _s)), (_s, 0, dt)) * _u1
    if method is Method.EXP_EULER:
        # Exact decay, input integral approximated by dt * u (Mamba's discretization).
        return sp.exp(a * dt) * _h0 + dt * _u1
    if method is Method.TRAPEZOIDAL:
        # Exact decay; trapezoid rule on the input integral int_0^dt e^{a (dt - s)} u(s) ds,
        # with u(0) = u_prev and u(dt) = u_next.
        f0 = sp.exp(a * dt) * _u0
        f1 = _u1
        return sp.exp(a * dt) * _h0 + dt / 2 * (f0 + f1)
    raise ValueError(method)


@lru_cache(maxsize=None)
def derive_elementwise(method: Method, complex_a: bool = False) -> Discretized:
    """Abar, Bbar for one element of a scalar/diagonal/complex-diagonal A."""
    a = A_COMPLEX if complex_a else A_REAL
    step = sp.expand(_one_step(method, a, DT))
    abar = sp.simplify(sp.diff(step, _h0))
    bbar = sp.simplify(sp.diff(step, _u1))
    bbar_prev = sp.simplify(sp.diff(step, _u0))
    structure = AStructure.COMPLEX_DIAGONAL if complex_a else AStructure.DIAGONAL
    return Discretized(method=method, structure=structure, dt=DT, a=a,
                       abar=abar, bbar=bbar, bbar_prev=bbar_prev)


def discretize(family: SSMFamily) -> Discretized:
    """The discretized system for a family's A structure and method."""
    st = family.A.structure
    if st in (AStructure.SCALAR, AStructure.DIAGONAL):
        d = derive_elementwise(family.method, complex_a=False)
        return Discretized(family.method, st, d.dt, d.a, d.abar, d.bbar, d.bbar_prev)
    if st is AStructure.COMPLEX_DIAGONAL:
        return derive_elementwise(family.method, complex_a=True)
    raise NotImplementedError(f"matrix discretization for {st.value}")  # filled in by the matrix pass
