"""Vectorizable exp, expm1, softplus and silu for TIR, as polynomials printed from sympy.

TVM lowers ``T.exp``/``T.log`` for LLVM to calls of libm's ``expf``/``logf``, which LLVM cannot
vectorize: a 16-lane loop becomes 16 scalar calls (see NOTES_cpu.md). On the CPU the Mamba-1
scan is bound by one exp per (channel, state, token), so the first factor is an exp that stays
in vector registers. These are the textbook fast-math constructions:

* 2^y = 2^k * 2^r with k = round(y), r in [-1/2, 1/2]: 2^k is built in the exponent bits, 2^r is a
  degree-6 polynomial (max relative error 3e-9, below fp32 rounding).
* expm1(w) = w * q(w) for |w| < 1/2 (a polynomial, no cancellation), else exp(w) - 1.
* log1p(q) for q in [0, 1] = 2 atanh(s), s = q / (2 + q) in [0, 1/3]: s * P(s^2), degree 5.
* softplus(x) = max(x, 0) + log1p(exp(-|x|)); silu(x) = x / (1 + exp(-x)).

Every polynomial is fitted once (least squares on Chebyshev nodes, float64), made a sympy
expression in Horner form, and printed with ``ssmc.printers.print_expr(..., "tir")``. The
emitters write ``name: T.let = ...`` lines (immutable bindings, which TVM's vectorizer widens
per lane; a plain ``x = ...`` would become a one-element buffer that the vectorizer gets wrong).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional

import numpy as np
import sympy as sp

from ssmc.printers import print_expr

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
_R = sp.Symbol("r", real=True)


def _chebyshev_fit(f, lo: float, hi: float, degree: int, nodes: int = 256) -> np.ndarray:
    x = (np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes) + 1) / 2 * (hi - lo) + lo
    return np.polynomial.polynomial.polyfit(x, f(x), degree)


@lru_cache(maxsize=None)
def _poly(name: str, degree: int) -> sp.Expr:
    """The fitted polynomial ``name`` in the symbol r, Horner form."""
    if name == "exp2":        # 2^r on [-1/2, 1/2]
        c = _chebyshev_fit(lambda r: 2.0 ** r, -0.5, 0.5, degree)
    elif name == "expm1_over_x":  # expm1(r)/r on [-1/2, 1/2]
        c = _chebyshev_fit(lambda r: np.where(r == 0, 1.0, np.expm1(r) / np.where(r == 0, 1, r)),
                           -0.5, 0.5, degree)
    elif name == "atanh_over_sqrt":  # atanh(sqrt(w))/sqrt(w) on [0, 1/9]
        def f(w):
            s = np.sqrt(np.maximum(w, 1e-300))
            return np.where(w > 0, np.arctanh(s) / s, 1.0)
        c = _chebyshev_fit(f, 0.0, 1.0 / 9.0, degree)
    else:
        raise KeyError(name)
    expr = sum(sp.Float(float(ci), 17) * _R ** i for i, ci in enumerate(c))
    return sp.horner(expr, wrt=_R)


def poly_text(name: str, degree: int, var: str) -> str:
    return "(" + print_expr(_poly(name, degree), "tir", names={"r": var}) + ")"


class Namer:
    """Unique TIR variable names within one kernel."""

    # loop and index variables of the generators: never reused for a temporary
    RESERVED = {"task", "sq", "c0", "p0", "g", "bi", "hh", "t_begin", "t_len", "t", "tt", "tp",
                "s", "sc", "v", "c", "p", "pv", "k", "u0", "T",
                "j", "tile", "t0", "nt"}

    def __init__(self):
        self.count = {}

    def __call__(self, stem: str) -> str:
        while True:
            i = self.count.get(stem, 0)
            self.count[stem] = i + 1
            name = f"{stem}{i}" if i else stem
            if name not in self.RESERVED:
                return name


def f32(v: float) -> str:
    return f"T.float32({float(v)!r})"


@dataclass(frozen=True)
class MathOptions:
    """How the polynomial exp is finished: ``scalef`` applies 2^k with LLVM's ldexp, which on
    AVX-512 is one vscalefps (and handles under/overflow, so no clamps); elsewhere 2^k is built
    in the exponent bits. ``exp_degree``: 6 -> 3e-9 relative error, 5 -> 1e-7."""
    exp_degree: int = 6
    scalef: bool = False

    @staticmethod
    def for_config(config: dict) -> "MathOptions":
        from . import tvmbuild
        tdict = tvmbuild.target_dict(config.get("llvm_target") or config.get("target"))
        scalef = config.get("scalef")
        if scalef is None:
            scalef = tvmbuild.has_features(tdict, ["avx512f"])
        return MathOptions(int(config.get("exp_degree", 6)), bool(scalef))


DEFAULT = MathOptions()


def exp2(lines: List[str], ind: str, names: Namer, y: str, stem: str = "e",
         lo: float = -125.0, hi: Optional[float] = 127.0, opts: MathOptions = DEFAULT) -> str:
    """Emit 2^y; returns the name holding it.

    k = round(y), r = y - k, 2^r = P(r) in [0.70, 1.42], then 2^k: by ldexp (``opts.scalef``)
    or built in the exponent bits, with y clamped to [lo, hi] so that the result stays a
    normal float (lo = -125); ``hi=None`` when y is known to be <= 0 (a negative a times a
    positive Δ)."""
    yc, k, r, p, out = (names(f"{stem}_y"), names(f"{stem}_k"), names(f"{stem}_r"),
                        names(f"{stem}_p"), names(stem))
    if opts.scalef:
        lines.append(f"{ind}{yc}: T.let = {y}")
    else:
        clamp = y
        if hi is not None:
            clamp = f"T.min({clamp}, {f32(hi)})"
        clamp = f"T.max({clamp}, {f32(lo)})"
        lines.append(f"{ind}{yc}: T.let = {clamp}")
    lines.append(f"{ind}{k}: T.let = T.round({yc})")  # (T.nearbyint breaks TVM 0.27 lets)
    lines.append(f"{ind}{r}: T.let = {yc} - {k}")
    lines.append(f"{ind}{p}: T.let = {poly_text('exp2', opts.exp_degree, r)}")
    if opts.scalef:
        lines.append(f'{ind}{out}: T.let = T.call_llvm_pure_intrin("float32", "llvm.ldexp", '
                     f'{p}, T.Cast("int32", {k}))')
        return out
    # (Adding k to P's exponent bits would save the multiply, but TVM 0.27's vectorizer loses
    # let-bindings under a float->int reinterpret; building 2^k from int bits is safe.)
    scale = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {k}) + 127, 23))'
    lines.append(f"{ind}{out}: T.let = {scale} * {p}")
    return out


def exp(lines, ind, names, x: str, stem="e", **kw) -> str:
    return exp2(lines, ind, names, f"({x}) * {f32(LOG2E)}", stem, **kw)


def expm1_from(lines, ind, names, w: str, e: str, stem="em1") -> str:
    """expm1(w) given e = exp(w) already computed: a polynomial near 0, else e - 1."""
    out = names(stem)
    small = f"{w} * {poly_text('expm1_over_x', 7, w)}"
    lines.append(f"{ind}{out}: T.let = T.Select(T.fabs({w}) < T.float32(0.5), {small}, "
                 f"{e} - T.float32(1.0))")
    return out


def softplus(lines, ind, names, x: str, stem="sp", opts: MathOptions = DEFAULT) -> str:
    v = names(f"{stem}_x")
    lines.append(f"{ind}{v}: T.let = {x}")
    q = exp2(lines, ind, names, f"T.fabs({v}) * {f32(-LOG2E)}", f"{stem}_q", hi=None, opts=opts)
    s, out = names(f"{stem}_s"), names(stem)
    lines.append(f"{ind}{s}: T.let = {q} / (T.float32(2.0) + {q})")
    lines.append(f"{ind}{out}: T.let = T.max({v}, T.float32(0.0)) + T.float32(2.0) * {s} * "
                 f"{poly_text('atanh_over_sqrt', 5, f'({s} * {s})')}")
    return out


def silu(lines, ind, names, x: str, stem="g", opts: MathOptions = DEFAULT) -> str:
    v = names(f"{stem}_x")
    lines.append(f"{ind}{v}: T.let = {x}")
    e = exp2(lines, ind, names, f"{v} * {f32(-LOG2E)}", f"{stem}_e", opts=opts)
    out = names(stem)
    lines.append(f"{ind}{out}: T.let = {v} / (T.float32(1.0) + {e})")
    return out


def max_errors() -> dict:
    """Relative errors of the fitted polynomials over their ranges (float64), for the notes."""
    f = {k: sp.lambdify(_R, _poly(k, d), "numpy") for k, d in
         (("exp2", 6), ("expm1_over_x", 7), ("atanh_over_sqrt", 5))}
    r = np.linspace(-0.5, 0.5, 20001)
    w = np.linspace(1e-12, 1 / 9, 20001)
    s = np.sqrt(w)
    return {"exp2": float(np.max(np.abs(f["exp2"](r) / 2.0 ** r - 1))),
            "expm1": float(np.max(np.abs(f["expm1_over_x"](r) * r / np.where(r == 0, 1, np.expm1(r)) - 1)[r != 0])),
            "log1p": float(np.max(np.abs(f["atanh_over_sqrt"](w) * s / np.arctanh(s) - 1)))}
