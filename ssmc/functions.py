"""The sympy functions ssmc's derived expressions use beyond sympy's own: Softplus, Clamp and
Sigmoid (the silu gate's, whose derivative the backward kernels print).

They stay unevaluated symbols in the expressions (so every dialect prints its own numerically
stable form, see ``ssmc.printers``) and still evaluate numerically: ``evalf`` through their
definitions, and ``sympy.lambdify(..., "numpy")`` through ``_numpycode`` (what the float64
oracle uses). Defined here once; the discretize pass builds the Δ map from them.
"""
from __future__ import annotations

import sympy as sp


class Softplus(sp.Function):
    """softplus(x) = log(1 + e^x)."""
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / (1 + sp.exp(-self.args[0]))

    def _eval_rewrite_as_log(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_evalf(self, prec):
        if self.args[0].is_Number:
            return self.rewrite(sp.log)._eval_evalf(prec)
        return None

    def _numpycode(self, printer):
        # logaddexp(0, x): exact for every x, no overflow of e^x.
        return f"{printer._module_format('numpy.logaddexp')}(0.0, {printer._print(self.args[0])})"


class Clamp(sp.Function):
    """clamp(x, lo, hi) = min(max(x, lo), hi); hi may be +oo (then only the lower bound)."""
    nargs = 3

    def fdiff(self, argindex=1):
        x, lo, hi = self.args
        if argindex != 1:
            raise sp.ArgumentIndexError(self, argindex)
        return sp.Piecewise((1, (x > lo) & (x < hi)), (0, True))

    def _eval_rewrite_as_Max(self, x, lo, hi, **kwargs):
        return sp.Min(sp.Max(x, lo), hi)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):
        if all(a.is_Number for a in self.args):
            return self.rewrite(sp.Max)._eval_evalf(prec)
        return None

    def _numpycode(self, printer):
        x, lo, hi = (printer._print(a) for a in self.args)
        return f"{printer._module_format('numpy.clip')}({x}, {lo}, {hi})"


class Sigmoid(sp.Function):
    """sigmoid(x) = 1 / (1 + e^-x); silu(z) = z sigmoid(z). Kept as a function (not expanded)
    so that sympy's derivative of the gate stays in sigmoids: sigmoid' = sigmoid (1 - sigmoid)
    has no e^-x / (1 + e^-x)^2, which is inf / inf in fp32 for x < -88."""
    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):
        if self.args[0].is_Number:
            return self.rewrite(sp.exp)._eval_evalf(prec)
        return None

    def _numpycode(self, printer):
        x = printer._print(self.args[0])
        return f"(0.5 * (1.0 + {printer._module_format('numpy.tanh')}(0.5 * {x})))"


def clamp_bounds(expr):
    """(lo, hi) of a Clamp as Python floats (hi = inf when unbounded above)."""
    return float(expr.args[1]), float(expr.args[2])
