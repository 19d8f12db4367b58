"""The discretized Abar, Bbar (plan.disc) as TIR let-lines, with exp/expm1 made vectorizable.

The sympy expressions are taken as they are; only their transcendental atoms are replaced:
exp(w) by a fast 2^(w log2 e) (``fastmath.exp2``), expm1(w) (from ``stable_form``: zoh's
(exp(a dt) - 1)/a becomes expm1(a dt)/a, which keeps its digits for small a dt) by a polynomial
near 0. When w is a multiple of ``a`` the kernel passes a * log2(e) precomputed (``a_l2``), so
an exp costs no extra multiply. The rest is printed by ``ssmc.printers.print_expr(..., "tir")``
after a common-subexpression pass, so e.g. the trapezoidal rule's abar and bbar_prev share one
exp per (channel, state, token).

Complex-diagonal A is split into real and imaginary parts in the real symbols a_re, a_im:
exp(w) = e^{Re w} (cos Im w + i sin Im w) and expm1(w) = expm1(Re w) cos Im w - 2 sin^2(Im w / 2)
+ i e^{Re w} sin Im w (no cancellation for small |w|). cos/sin are libm calls (scalar): complex
families are not the CPU's hot path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import sympy as sp
from sympy.codegen.cfunctions import expm1

from ssmc.discretize import split_complex
from ssmc.printers import print_expr

from . import fastmath

try:  # the printers' own stable form (exp(x) - 1 -> expm1(x)) when present
    from ssmc.printers import stable_form as _stable_form
except ImportError:  # pragma: no cover - older printers
    from sympy.codegen.rewriting import expm1_opt as _stable_form

_K = sp.Symbol("ssmc_log2e", positive=True)
OUTPUTS = ("abar", "bbar", "bbar_prev")


@dataclass
class Atom:
    """One transcendental subexpression, replaced in the outputs by ``symbols``."""
    kind: str            # exp | expm1 (of a real w); cexp | cexpm1 (of a complex w)
    w: object            # real w, or (w_re, w_im)
    symbols: Tuple[sp.Symbol, ...]


@dataclass
class CoeffPlan:
    complex: bool
    # output name -> expression (real) or (re, im), in dt, a / a_re, a_im and atom symbols
    exprs: Dict[str, object]
    atoms: List[Atom] = field(default_factory=list)

    def is_zero(self, name: str) -> bool:
        e = self.exprs[name]
        return all(sp.sympify(x) == 0 for x in (e if isinstance(e, tuple) else (e,)))

    def depends_on_a(self, name: str) -> bool:
        """Whether the output varies with A (else it is per token: hoist it out of the state loop)."""
        syms = self._symbols(name)
        return any(s.name.startswith("a") for s in syms) or any(
            any(sym in syms for sym in at.symbols) and _atom_uses_a(at) for at in self.atoms)

    def _symbols(self, name):
        e = self.exprs[name]
        out = set()
        for x in (e if isinstance(e, tuple) else (e,)):
            out |= sp.sympify(x).free_symbols
        return out


def _atom_uses_a(at: Atom) -> bool:
    ws = at.w if isinstance(at.w, tuple) else (at.w,)
    return any(s.name.startswith("a") for w in ws for s in sp.sympify(w).free_symbols)


def plan_coefficients(disc) -> CoeffPlan:
    """Replace the exp/expm1 atoms of plan.disc's abar, bbar, bbar_prev by symbols."""
    from ssmc.ir import AStructure
    is_complex = disc.structure is AStructure.COMPLEX_DIAGONAL
    stable = {k: _stable_form(sp.sympify(getattr(disc, k))) for k in OUTPUTS}
    atoms: List[Atom] = []
    repl = {}
    found = set()
    for k in OUTPUTS:
        found |= stable[k].atoms(sp.exp) | stable[k].atoms(expm1)
    for i, f in enumerate(sorted(found, key=sp.default_sort_key)):
        kind = "exp" if isinstance(f, sp.exp) else "expm1"
        if not is_complex:
            s = sp.Symbol(f"ssmc_{kind}{i}", real=True)
            atoms.append(Atom(kind, f.args[0], (s,)))
            repl[f] = s
        else:
            sr, si = sp.Symbol(f"ssmc_{kind}{i}_re", real=True), sp.Symbol(f"ssmc_{kind}{i}_im", real=True)
            atoms.append(Atom("c" + kind, split_complex(f.args[0]), (sr, si)))
            repl[f] = sr + sp.I * si
    exprs = {}
    for k in OUTPUTS:
        e = stable[k].xreplace(repl)
        if is_complex:
            # The pass's split (a = a_re + i a_im); the atoms are real symbols by now.
            exprs[k] = split_complex(e)
        else:
            exprs[k] = sp.simplify(e)
    return CoeffPlan(is_complex, exprs, atoms)


def _log2_scaled(w, env: Dict[str, str]):
    """w * log2(e) with any a (a_re) replaced by the precomputed a * log2(e) when available."""
    syms = {s.name: s for s in sp.sympify(w).free_symbols}
    for name in ("a", "a_re"):
        if name in syms and f"{name}_l2" in env:
            y = sp.simplify(w.subs(syms[name], sp.Symbol(f"{name}_l2") / _K) * _K)
            if _K not in y.free_symbols:
                return y
    return w * sp.Float(fastmath.LOG2E, 17)


def _print(expr, env: Dict[str, str]) -> str:
    expr = sp.sympify(expr)
    names = {s.name: env.get(s.name, s.name) for s in expr.free_symbols}
    return "(" + print_expr(expr, "tir", names=names) + ")"


def emit(cp: CoeffPlan, outputs, lines: List[str], ind: str, names: fastmath.Namer,
         env: Dict[str, str], opts: fastmath.MathOptions = fastmath.DEFAULT) -> Dict[str, object]:
    """Emit let-lines for ``outputs`` (a subset of abar/bbar/bbar_prev).

    ``env`` maps the symbols dt, a (a_re, a_im for complex) and optionally a_l2 / a_re_l2 to TIR
    text. Returns output -> TIR text (real) or (re_text, im_text).
    """
    wanted = [o for o in outputs if not cp.is_zero(o)]
    used = set()
    for o in wanted:
        used |= cp._symbols(o)
    env = dict(env)
    memo: Dict[str, str] = {}   # one exp2 / cos / sin per distinct argument (zoh: exp and expm1)

    def once(key: str, make):
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def exp_of(w) -> str:
        y = _print(_log2_scaled(w, env), env)
        # a < 0 (Re a < 0) and Δ > 0 make the argument <= 0: no upper clamp needed
        hi = None if sp.sympify(w).is_nonpositive else 127.0
        return once("exp2 " + y, lambda: fastmath.exp2(lines, ind, names, y, stem="ex", hi=hi,
                                                       opts=opts))

    def let(stem: str, text: str) -> str:
        def make():
            v = names(stem)
            lines.append(f"{ind}{v}: T.let = {text}")
            return v
        return once(stem + " " + text, make)

    for at in cp.atoms:
        if not any(s in used for s in at.symbols):
            continue
        if at.kind in ("exp", "expm1"):
            e = exp_of(at.w)
            if at.kind == "exp":
                env[at.symbols[0].name] = e
            else:
                w = let("w", _print(at.w, env))
                env[at.symbols[0].name] = once("expm1 " + w, lambda: fastmath.expm1_from(
                    lines, ind, names, w, e))
            continue
        w_re, w_im = at.w
        e = exp_of(w_re)
        wi = let("wi", _print(w_im, env))
        cos_t, sin_t = let("cs", f"T.cos({wi})"), let("sn", f"T.sin({wi})")
        if at.kind == "cexp":
            re = let("cexp_re", f"{e} * {cos_t}")
        else:
            wr = let("wr", _print(w_re, env))
            m = once("expm1 " + wr, lambda: fastmath.expm1_from(lines, ind, names, wr, e))
            half = let("sh", f"T.sin({wi} * T.float32(0.5))")
            re = let("cexpm1_re", f"{m} * {cos_t} - T.float32(2.0) * {half} * {half}")
        env[at.symbols[0].name] = re
        env[at.symbols[1].name] = let("cexp_im", f"{e} * {sin_t}")
    flat, keys = [], []
    for o in wanted:
        parts = cp.exprs[o] if cp.complex else (cp.exprs[o],)
        for j, p in enumerate(parts):
            flat.append(sp.sympify(p))
            keys.append((o, j))
    tmp_syms = sp.numbered_symbols("ssmc_c")
    replacements, reduced = sp.cse(flat, symbols=tmp_syms) if flat else ([], [])
    for sym, sub in replacements:
        v = names("c")
        lines.append(f"{ind}{v}: T.let = {_print(sub, env)}")
        env[sym.name] = v
    out: Dict[str, object] = {}
    for (o, j), e in zip(keys, reduced):
        if e.is_Symbol or e.is_Number:
            text = _print(e, env)
        else:
            text = names(o + ("_im" if j else "_re" if cp.complex else ""))
            lines.append(f"{ind}{text}: T.let = {_print(e, env)}")
        out.setdefault(o, []).append(text)
    return {o: (tuple(v) if cp.complex else v[0]) for o, v in out.items()}
