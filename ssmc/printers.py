"""Print sympy expressions into each backend's expression language.

One small printer subclass per dialect; backends never retype the math. ``names`` maps the
IR's symbol names (``dt``, ``a``) to the variable names the generated code uses.
"""
from __future__ import annotations

from typing import Dict, Optional

import sympy as sp
from sympy.printing.c import C99CodePrinter
from sympy.printing.pycode import PythonCodePrinter


class _Renaming:
    def __init__(self, names: Optional[Dict[str, str]] = None, **kw):
        super().__init__(**kw)
        self._names = names or {}

    def _print_Symbol(self, expr):
        return self._names.get(expr.name, expr.name)


class NumpyPrinter(_Renaming, PythonCodePrinter):
    def _print_Function(self, expr):
        return super()._print_Function(expr)

    def _print_exp(self, expr):
        return f"np.exp({self._print(expr.args[0])})"

    def _print_Pow(self, expr, rational=False):
        if expr.exp == -1:
            return f"(1.0 / ({self._print(expr.base)}))"
        return f"(({self._print(expr.base)}) ** ({self._print(expr.exp)}))"


class TorchPrinter(NumpyPrinter):
    def _print_exp(self, expr):
        return f"torch.exp({self._print(expr.args[0])})"


class TritonPrinter(NumpyPrinter):
    def _print_exp(self, expr):
        return f"tl.exp({self._print(expr.args[0])})"


class CPrinter(_Renaming, C99CodePrinter):
    """float (not double) math: expf, and float literals."""

    def _print_exp(self, expr):
        return f"expf({self._print(expr.args[0])})"

    def _print_Float(self, expr):
        return f"{float(expr)!r}f"

    def _print_Rational(self, expr):
        return f"({float(expr.p)!r}f/{float(expr.q)!r}f)"

    def _print_Integer(self, expr):
        return f"{int(expr)}.0f"


class TIRPrinter(NumpyPrinter):
    def _print_exp(self, expr):
        return f"T.exp({self._print(expr.args[0])})"

    def _print_Float(self, expr):
        return f"T.float32({float(expr)!r})"

    def _print_Rational(self, expr):
        return f"T.float32({float(expr.p) / float(expr.q)!r})"

    def _print_Integer(self, expr):
        return f"T.float32({float(expr)!r})"


PRINTERS = {
    "numpy": NumpyPrinter,
    "torch": TorchPrinter,
    "triton": TritonPrinter,
    "c": CPrinter,
    "tir": TIRPrinter,
}


def print_expr(expr, dialect: str, names: Optional[Dict[str, str]] = None) -> str:
    """``expr`` as source text in ``dialect`` (numpy, torch, triton, c, tir)."""
    return PRINTERS[dialect](names=names).doprint(sp.sympify(expr))
