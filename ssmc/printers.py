"""Print sympy expressions into each backend's expression language.

One small printer subclass per dialect; backends never retype the math. ``names`` maps the
IR's symbol names (``dt``, ``a``, and for matrix forms ``n``) to the source text the generated
code uses for them (a variable, ``dt[i]``, ``dt[..., None, None]``...).

Dialects: ``numpy`` (``np.``), ``torch``, ``triton`` (``tl.``), ``c`` (C99 float math: ``expf``,
``0.5f``; nothing is promoted to double), ``tir`` (TVMScript: ``T.exp``, ``T.float32(...)``).
The Δ map's ``Softplus`` and ``Clamp`` and the gate's ``Sigmoid`` (``ssmc.functions``) print in
every dialect.
Complex and matrix expressions print only for numpy and torch; the other dialects raise a
``TargetError`` saying so (see ``ssmc.discretize.split_complex`` for complex-diagonal A there).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import sympy as sp
from sympy.codegen.cfunctions import expm1  # noqa: F401  (backends match nodes on printers.expm1)
from sympy.codegen.rewriting import expm1_opt
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from .errors import TargetError

DIALECTS = ("numpy", "torch", "triton", "c", "tir")


def stable_form(expr):
    """``expr`` with every exp(x) - 1 rewritten as expm1(x).

    exp(x) - 1 cancels catastrophically for small |x| (zoh's B = (exp(a dt) - 1)/a loses every
    digit at |a dt| ~ 1e-8 in fp32), while expm1 keeps full relative precision. Matrix
    expressions are returned unchanged (there is no matrix expm1 to map to).
    """
    expr = sp.sympify(expr)
    if isinstance(expr, sp.MatrixExpr):
        return expr
    return expm1_opt(expr)


def is_complex_expr(expr) -> bool:
    """True when ``expr`` involves the imaginary unit or a symbol that may be non-real.

    A symbol counts as complex when it is declared complex and not real (the discretize pass
    declares complex-diagonal ``a`` that way); symbols without assumptions count as real.
    """
    expr = sp.sympify(expr)
    if expr.has(sp.I):
        return True
    return any(s.is_complex and not s.is_real for s in expr.free_symbols)


def _is_matrix_expr(expr) -> bool:
    return isinstance(expr, sp.MatrixExpr) or any(isinstance(x, sp.MatrixExpr)
                                                  for x in sp.preorder_traversal(expr))


class _Dialect:
    """What every dialect shares: renaming, float literals, integer powers as products."""
    dialect = ""
    has_expm1 = True
    supports_complex = False
    supports_matrix = False
    fn_prefix = ""

    def __init__(self, names: Optional[Dict[str, str]] = None, dtype: str = "float32", **kw):
        super().__init__(settings=kw)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self._names = dict(names or {})
        self._dtype = dtype

    # ---- what each dialect fills in
    def _fn(self, name: str) -> str:
        return f"{self.fn_prefix}{name}"

    def _literal(self, value: float) -> str:
        return repr(float(value))

    # ---- checks before printing
    def check(self, expr):
        if is_complex_expr(expr) and not self.supports_complex:
            raise TargetError(
                f"{self.dialect} has no complex arithmetic; cannot print the complex form "
                f"{expr}", hint="split it with ssmc.discretize.split_complex(expr) into real and "
                "imaginary parts in the real symbols a_re, a_im")
        if _is_matrix_expr(expr) and not self.supports_matrix:
            raise TargetError(
                f"{self.dialect} cannot print the matrix form {expr}",
                hint="dense/DPLR discretizations are evaluated on the host (numpy/torch "
                     "printers, or ssmc.discretize.evaluate) and passed to kernels as matrices")

    # ---- leaves
    def _print_Symbol(self, expr):
        return self._names.get(expr.name, expr.name)

    def _print_Dummy(self, expr):
        return self._print_Symbol(expr)

    def _print_Integer(self, expr):
        return self._literal(int(expr))

    def _print_Rational(self, expr):
        return self._literal(float(expr.p) / float(expr.q))

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_Zero(self, expr):
        return self._literal(0)

    def _print_One(self, expr):
        return self._literal(1)

    def _print_NegativeOne(self, expr):
        return self._literal(-1)

    def _print_Half(self, expr):
        return self._literal(0.5)

    # ---- functions
    def _print_exp(self, expr):
        return f"{self._fn('exp')}({self._print(expr.args[0])})"

    def _print_cos(self, expr):
        return f"{self._fn('cos')}({self._print(expr.args[0])})"

    def _print_sin(self, expr):
        return f"{self._fn('sin')}({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"{self._fn('log')}({self._print(expr.args[0])})"

    def parenthesize(self, item, level, strict=False):
        # Nonnegative literals need no parentheses: 0.5*dt, not (0.5)*dt.
        if getattr(item, "is_Number", False) and item >= 0:
            return self._print(item)
        return super().parenthesize(item, level, strict)

    def _print_expm1(self, expr):
        if self.has_expm1:
            return f"{self._fn('expm1')}({self._print(expr.args[0])})"
        return f"({self._fn('exp')}({self._print(expr.args[0])}) - {self._literal(1)})"

    def _print_Pow(self, expr, rational=False):
        base, e = expr.base, expr.exp
        if e.is_Integer and e != 0 and abs(int(e)) <= 8:
            # Small integer powers as products: exact, and Triton tensors have no ``**``.
            factor = self.parenthesize(base, PRECEDENCE["Mul"])
            product = "*".join([factor] * abs(int(e)))
            if e > 0:
                return f"({product})" if int(e) > 1 else product
            return f"{self._literal(1)}/({product})"
        if e == sp.S.Half:
            return f"{self._fn('sqrt')}({self._print(base)})"
        return self._print_general_pow(base, e)

    def _print_general_pow(self, base, e):
        return f"{self._fn('pow')}({self._print(base)}, {self._print(e)})"

    # ---- the Δ map's functions (ssmc.functions): softplus and clamp
    def _print_Softplus(self, expr):
        # The threshold form (as torch and mamba_ssm): softplus(x) = x past 20, where
        # log(1 + e^x) equals x in fp32 and e^x would overflow soon after.
        x = self._print(expr.args[0])
        return self._softplus(x, self._literal(20.0))

    def _softplus(self, x: str, threshold: str) -> str:
        raise NotImplementedError

    def _print_Clamp(self, expr):
        x, lo, hi = expr.args
        out = f"{self._fn_max()}({self._print(x)}, {self._print(lo)})"
        if hi != sp.oo:
            out = f"{self._fn_min()}({out}, {self._print(hi)})"
        return out

    def _print_Sigmoid(self, expr):
        # 1 / (1 + e^-x) in the dialect's own exp: e^-x = inf past x < -88 in fp32 gives 0,
        # never NaN (the gate's derivative, ssmc.discretize.gate_derivative)
        return self._print(1 / (1 + sp.exp(-expr.args[0])))

    def _fn_max(self) -> str:
        return self._fn("max")

    def _fn_min(self) -> str:
        return self._fn("min")

    def _print_Function(self, expr):
        raise TargetError(f"{self.dialect} printer has no mapping for {expr.func.__name__}() "
                          f"in {expr}")


class _ElementwiseConditions:
    """A clamp's derivative is a Piecewise indicator. On tensors it must be an elementwise
    select over elementwise conditions, not Python's ``a if c else b`` and ``and``: each
    dialect names its select and its boolean operators."""
    select_fn = ""
    and_op = "&"
    or_op = "|"

    def _print_Piecewise(self, expr):
        *pairs, (last, cond) = expr.args
        if cond != sp.true:
            raise TargetError(f"{self.dialect} needs a Piecewise with a default branch: {expr}")
        out = self._print(last)
        for value, c in reversed(pairs):
            out = f"{self.select_fn}({self._print(c)}, {self._print(value)}, {out})"
        return out

    def _print_And(self, expr):
        return f" {self.and_op} ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return f" {self.or_op} ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Relational(self, expr):
        return f"{self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)}"


class NumpyPrinter(_ElementwiseConditions, _Dialect, PythonCodePrinter):
    dialect = "numpy"
    fn_prefix = "np."
    select_fn = "np.where"
    supports_complex = True
    supports_matrix = True
    _linalg = "np.linalg"
    _expm = "scipy.linalg.expm"

    def _print_ImaginaryUnit(self, expr):
        return "1j"

    def _print_Softplus(self, expr):
        # float64 oracle: logaddexp(0, x) is exact for every x (no threshold needed).
        return f"np.logaddexp(0.0, {self._print(expr.args[0])})"

    def _print_Clamp(self, expr):
        x, lo, hi = expr.args
        hi_text = "np.inf" if hi == sp.oo else self._print(hi)
        return f"np.clip({self._print(x)}, {self._print(lo)}, {hi_text})"

    # ---- matrix forms (dense / DPLR A): scalars broadcast through ``names`` (dt[..., None, None])
    def _a_name(self):
        return self._names.get("a", "a")

    def _print_MatrixSymbol(self, expr):
        return self._names.get(expr.name, expr.name)

    def _print_Identity(self, expr):
        n = self._names.get("n", f"{self._a_name()}.shape[-1]")
        return f"np.eye({n})"

    def _print_ZeroMatrix(self, expr):
        return f"np.zeros_like({self._a_name()})"

    def _print_MatAdd(self, expr):
        return "(" + " + ".join(self._print(t) for t in expr.args) + ")"

    def _print_MatrixExp(self, expr):
        return f"{self._expm}({self._print(expr.args[0])})"

    def _print_Inverse(self, expr):
        return f"{self._linalg}.inv({self._print(expr.args[0])})"

    def _print_MatPow(self, expr):
        base, e = expr.args
        if e == -1:
            return f"{self._linalg}.inv({self._print(base)})"
        if e.is_Integer and e > 0:
            return "(" + " @ ".join([self._print(base)] * int(e)) + ")"
        raise TargetError(f"{self.dialect} cannot print the matrix power {expr}")

    def _print_MatMul(self, expr):
        coeff, mats = expr.as_coeff_matrices()
        parts: List[str] = []
        i = 0
        mats = list(mats)
        while i < len(mats):
            m = mats[i]
            inv_base = m.arg if isinstance(m, sp.Inverse) else (
                m.base if isinstance(m, sp.MatPow) and m.exp == -1 else None)
            if inv_base is not None and i + 1 < len(mats):
                # inv(X) @ Y as a solve: cheaper and better conditioned than forming inv(X).
                rest = sp.MatMul(*mats[i + 1:]) if len(mats) > i + 2 else mats[i + 1]
                parts.append(f"{self._linalg}.solve({self._print(inv_base)}, {self._print(rest)})")
                break
            parts.append(self._print(m))
            i += 1
        text = " @ ".join(parts)
        if coeff == -1:
            return f"(-{text})"
        if coeff != 1:
            text = f"{self.parenthesize(coeff, PRECEDENCE['Mul'])}*{text}"
        return f"({text})"


class TorchPrinter(NumpyPrinter):
    dialect = "torch"
    fn_prefix = "torch."
    select_fn = "torch.where"
    _linalg = "torch.linalg"
    _expm = "torch.linalg.matrix_exp"

    def _print_Identity(self, expr):
        a = self._a_name()
        n = self._names.get("n", f"{a}.shape[-1]")
        return f"torch.eye({n}, dtype={a}.dtype, device={a}.device)"

    def _print_ZeroMatrix(self, expr):
        return f"torch.zeros_like({self._a_name()})"

    def _print_Softplus(self, expr):
        return f"torch.nn.functional.softplus({self._print(expr.args[0])})"

    def _print_Clamp(self, expr):
        x, lo, hi = expr.args
        bounds = f"min={self._print(lo)}" + ("" if hi == sp.oo else f", max={self._print(hi)}")
        return f"torch.clamp({self._print(x)}, {bounds})"


class TritonPrinter(_ElementwiseConditions, _Dialect, PythonCodePrinter):
    dialect = "triton"
    fn_prefix = "tl."
    select_fn = "tl.where"
    # Triton has no expm1 (tl.math lacks it and libdevice's is target-specific), so expm1(x)
    # prints as exp(x) - 1: fp32 kernels lose relative precision of zoh's B for |a dt| < ~1e-4.
    has_expm1 = False

    def _print_general_pow(self, base, e):
        raise TargetError(f"triton has no general power; cannot print {base}**{e}")

    def _print_Softplus(self, expr):
        # Triton has no log1p, and log(1 + e^x) loses the digits of small e^x: the generated
        # module defines the accurate threshold form once as the jit helper ``_softplus``
        # (backends/triton/codegen.HELPERS), called here.
        return f"_softplus({self._print(expr.args[0])})"

    def _fn_max(self):
        return "tl.maximum"

    def _fn_min(self):
        return "tl.minimum"


class CPrinter(_Dialect, C99CodePrinter):
    """C99 float (or double) math: expf/expm1f and 0.5f literals, so nothing promotes to double."""
    dialect = "c"

    def _suffix(self):
        return "f" if self._dtype == "float32" else ""

    def _fn(self, name: str) -> str:
        return f"{name}{self._suffix()}"

    def _literal(self, value: float) -> str:
        text = repr(float(value))
        if self._dtype == "float32":
            return text + "f"
        return text

    def _softplus(self, x, threshold):
        # log1p keeps the digits of small e^x.
        return f"({x} > {threshold} ? {x} : {self._fn('log1p')}({self._fn('exp')}({x})))"

    def _fn_max(self):
        return self._fn("fmax")

    def _fn_min(self):
        return self._fn("fmin")


class TIRPrinter(_ElementwiseConditions, _Dialect, PythonCodePrinter):
    dialect = "tir"
    fn_prefix = "T."
    # TVMScript parses Python's boolean operators into tir.And / tir.Or
    select_fn, and_op, or_op = "T.Select", "and", "or"
    # TIR has no expm1 intrinsic that every target lowers; print exp(x) - 1 (same precision
    # caveat as Triton).
    has_expm1 = False

    def _literal(self, value: float) -> str:
        return f"T.{self._dtype}({float(value)!r})"

    def _softplus(self, x, threshold):
        # Self-contained; the CPU backend emits its vectorizable fastmath softplus instead.
        return f"T.Select({x} > {threshold}, {x}, T.log1p(T.exp(T.min({x}, {threshold}))))"


PRINTERS = {
    "numpy": NumpyPrinter,
    "torch": TorchPrinter,
    "triton": TritonPrinter,
    "c": CPrinter,
    "tir": TIRPrinter,
}


def _printer(dialect: str, names, dtype: str):
    if dialect not in PRINTERS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    return PRINTERS[dialect](names=names, dtype=dtype)


def _prepare(expr, printer):
    expr = sp.sympify(expr)
    printer.check(expr)
    if printer.has_expm1:
        return stable_form(expr)
    # No expm1 here: spell it exp(x) - 1 before cse, so that exp(x) is shared with abar.
    return expr.replace(lambda e: isinstance(e, expm1), lambda e: sp.exp(e.args[0]) - 1)


def print_expr(expr, dialect: str, names: Optional[Dict[str, str]] = None,
               dtype: str = "float32") -> str:
    """``expr`` as source text in ``dialect`` (numpy, torch, triton, c, tir).

    Where the dialect has expm1, exp(x) - 1 is printed as expm1(x) (see ``stable_form``).
    ``dtype`` picks float or double math for c and tir (the others follow their operands).
    """
    printer = _printer(dialect, names, dtype)
    return printer.doprint(_prepare(expr, printer))


def cse_print(exprs: Dict[str, object], dialect: str, names: Optional[Dict[str, str]] = None,
              dtype: str = "float32", tmp_prefix: str = "ssmc_t") -> Tuple[List[str], Dict[str, str]]:
    """Print several expressions sharing their common subexpressions.

    Returns ``(lines, finals)``: ``lines`` assign the temporaries in order (``t = ...`` in the
    Python-like dialects and TIR, ``const float t = ...;`` in C), and ``finals`` maps each key of
    ``exprs`` to its printed expression in terms of them. So a trapezoidal kernel computes
    exp(a*dt) once for both abar and bbar_prev.
    """
    printer = _printer(dialect, names, dtype)
    keys = list(exprs)
    prepared = [_prepare(exprs[k], printer) for k in keys]
    taken = {s.name for e in prepared for s in e.free_symbols}
    taken |= set((names or {}).values())
    symbols = (sp.Symbol(f"{tmp_prefix}{i}") for i in range(10**6)
               if f"{tmp_prefix}{i}" not in taken)
    if any(_is_matrix_expr(e) for e in prepared):
        replacements, reduced = [], prepared   # sympy's cse does not see into MatrixExp
    else:
        # Powers print as products (x*x), so give cse every compound base of one as a
        # subexpression of its own: sin(y/2)**2 then computes sin once.
        bases = {p.base for e in prepared for p in e.atoms(sp.Pow)
                 if p.exp.is_Integer and abs(p.exp) >= 2 and not p.base.is_Atom}
        replacements, reduced = sp.cse(prepared + sorted(bases, key=sp.default_sort_key),
                                       symbols=symbols)
        reduced = reduced[:len(prepared)]
    lines = []
    ctype = "float" if dtype == "float32" else "double"
    for sym, sub in replacements:
        text = printer.doprint(sub)
        if dialect == "c":
            lines.append(f"const {ctype} {sym.name} = {text};")
        else:
            lines.append(f"{sym.name} = {text}")
    finals = {k: printer.doprint(e) for k, e in zip(keys, reduced)}
    return lines, finals
