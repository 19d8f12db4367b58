"""Shared pieces of the Triton generators: printing IR math, emitting code, loading modules.

Every generator (scan, step, conv, chunked) renders one self-contained Python module that
imports only torch and triton: a header comment naming the family, its hash and the config, the
``@triton.jit`` kernel(s), and a ``forward(...)`` launcher. Everything that differs between
families is printed from the IR here:

- ``ExprPrinter``: ``ssmc.printers.TritonPrinter`` plus what the scan kernels need: sin/cos
  (complex A split into real parts), exp2 with log2(e) folded into a precomputed variable
  (``exp(a*dt)`` costs one multiply and one MUFU.EX2, not two multiplies), and expm1 through
  Kahan's formula so that zoh's B = expm1(a dt)/a keeps its precision in fp32.
- ``print_block``: several expressions printed with shared subexpressions (sympy cse).
- ``Lines``: an indented source buffer; ``header``; ``load_module``: put the source in an entry
  of the artifact cache it is given (Triton's @jit reads a kernel's source through
  ``inspect``, so it must be a real file) and import it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import sympy as sp

from ssmc import backends, printers
from ssmc.ir import AStructure, KernelPlan, SSMFamily

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Printing IR expressions

class KahanExpm1(sp.Function):
    """expm1(x) given e = exp(x) as well: (e - 1) * x / log(e), exact where e - 1 cancels.

    Written as a function of (exp(x), x) so that sympy's cse shares exp(x) with abar = exp(x).
    """
    nargs = 2


class ExprPrinter(printers.TritonPrinter):
    """Triton expressions with trig, exp2 and a precise expm1 (see the module docstring).

    ``log2e_names`` maps a symbol name (``a``, ``a_re``) to a variable holding that symbol times
    log2(e); an ``exp(sym * rest)`` then prints as ``tl.exp2(scaled * rest)``.
    """

    def __init__(self, names: Optional[Dict[str, str]] = None,
                 log2e_names: Optional[Dict[str, str]] = None):
        super().__init__(names=names)
        self._log2e = dict(log2e_names or {})

    def _print_exp(self, expr):
        arg = expr.args[0]
        factors = sp.Mul.make_args(arg)
        for i, f in enumerate(factors):
            if isinstance(f, sp.Symbol) and f.name in self._log2e:
                rest = [self._print(g) for j, g in enumerate(factors) if j != i]
                return f"tl.exp2({' * '.join([self._log2e[f.name]] + rest)})"
        return f"tl.exp({self._print(arg)})"

    def _print_cos(self, expr):
        return f"_cos({self._print(expr.args[0])})"

    def _print_sin(self, expr):
        return f"_sin({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"tl.log({self._print(expr.args[0])})"

    has_expm1 = True

    def _print_KahanExpm1(self, expr):
        return f"_expm1_from({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_expm1(self, expr):
        # Only where no exp(x) is there to share (print_one(..., share_exp=False)).
        return f"_expm1({self._print(expr.args[0])})"


def _precise(expr):
    """exp(x) - 1 as expm1 (printers.stable_form), then expm1(x) as KahanExpm1(exp(x), x)."""
    expr = printers.stable_form(sp.sympify(expr))
    return expr.replace(lambda e: isinstance(e, printers.expm1),
                        lambda e: KahanExpm1(sp.exp(e.args[0]), e.args[0]))


def print_one(expr, names: Dict[str, str], log2e_names: Optional[Dict[str, str]] = None,
              share_exp: bool = True) -> str:
    """``expr`` as Triton text. ``share_exp``: expm1(x) as _expm1_from(exp(x), x), so that a
    block printed with cse computes exp(x) once for abar and bbar; else _expm1(x)."""
    printer = ExprPrinter(names, log2e_names)
    expr = _precise(expr) if share_exp else printers.stable_form(sp.sympify(expr))
    printer.check(expr)
    return printer.doprint(expr)


def print_block(exprs: Dict[str, object], names: Dict[str, str], tmp_prefix: str,
                log2e_names: Optional[Dict[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """``exprs`` printed with shared subexpressions: (assignment lines, {key: final text})."""
    printer = ExprPrinter(names, log2e_names)
    keys = list(exprs)
    prepared = [_precise(exprs[k]) for k in keys]
    for e in prepared:
        printer.check(e)
    symbols = sp.numbered_symbols(tmp_prefix)
    replacements, reduced = sp.cse(prepared, symbols=symbols)
    lines = [f"{sym.name} = {printer.doprint(sub)}" for sym, sub in replacements]
    return lines, {k: printer.doprint(e) for k, e in zip(keys, reduced)}


def uses(expr, symbol_name: str) -> bool:
    return any(s.name == symbol_name for s in sp.sympify(expr).free_symbols)


def is_zero(expr) -> bool:
    return sp.sympify(expr) == 0


def has_exp_of(expr, symbol_name: str) -> bool:
    """True when ``expr`` contains exp(symbol * ...) (so log2(e) * symbol is worth precomputing)."""
    for e in sp.preorder_traversal(_precise(expr)):
        if isinstance(e, sp.exp) and any(isinstance(f, sp.Symbol) and f.name == symbol_name
                                         for f in sp.Mul.make_args(e.args[0])):
            return True
    return False


def split_parts(plan: KernelPlan) -> Dict[str, object]:
    """The plan's Abar, Bbar, Bbar_prev as real expressions: keys abar, bbar, bbar_prev (real A)
    or abar_re, abar_im, ... (complex-diagonal A, in the real symbols a_re, a_im)."""
    d = plan.disc
    out = {}
    for i, key in enumerate(("abar", "bbar", "bbar_prev")):
        if plan.family.A.structure is AStructure.COMPLEX_DIAGONAL:
            out[key + "_re"], out[key + "_im"] = d.split[i]   # split once by the pass
        else:
            out[key] = sp.sympify(getattr(d, key))
    return out


# Complex arithmetic on printed operands: a value is (re, im) with None meaning an exact zero,
# so that real B (im None) or exp-Euler's real Bbar drop their terms at generation time.
Part = Optional[str]


def _prod(*factors: Part) -> Part:
    if any(f is None for f in factors):
        return None
    return " * ".join(factors)


def _sum(*terms: Tuple[str, Part]) -> Part:
    """Signed terms ("+" or "-", text); zero terms dropped."""
    text = ""
    for sign, t in terms:
        if t is None:
            continue
        if not text:
            text = t if sign == "+" else f"-{t}"
        else:
            text += f" {sign} {t}"
    return text or None


def cmul(x: Tuple[Part, Part], y: Tuple[Part, Part]) -> Tuple[Part, Part]:
    (xr, xi), (yr, yi) = x, y
    return (_sum(("+", _prod(xr, yr)), ("-", _prod(xi, yi))),
            _sum(("+", _prod(xr, yi)), ("+", _prod(xi, yr))))


def cadd(x: Tuple[Part, Part], y: Tuple[Part, Part]) -> Tuple[Part, Part]:
    return (_sum(("+", x[0]), ("+", y[0])), _sum(("+", x[1]), ("+", y[1])))


def as_text(p: Part) -> str:
    return "0.0" if p is None else p


# --------------------------------------------------------------------------------------------
# Emitting code

class Lines:
    """An indented source buffer."""

    def __init__(self, indent: int = 0):
        self.lines: List[str] = []
        self.level = indent

    def __call__(self, *texts: str):
        for text in texts:
            for line in text.split("\n"):
                self.lines.append(("    " * self.level + line) if line else "")
        return self

    def extend(self, texts: Iterable[str]):
        for t in texts:
            self(t)
        return self

    def indent(self):
        self.level += 1
        return self

    def dedent(self):
        self.level -= 1
        return self

    def jit_def(self, name: str, params: Iterable[str]):
        """``@triton.jit`` and ``def name(`` with one parameter per line; the body follows,
        indented."""
        self("@triton.jit", f"def {name}(")
        self.indent().extend(f"{p}," for p in params).dedent()
        return self("):").indent()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# Small numerics helpers every generated module carries (jit functions, inlined by Triton):
# scan, step and conv through ``module_source``, chunked SSD in its prelude. The printers above
# call them (_softplus, _expm1_from, _expm1, _cos, _sin); defined here and nowhere else.
HELPERS = '''
@triton.jit
def _softplus(x):
    # log(1 + exp(x)), identity past 20 like torch's (and e^x cannot overflow). log(u) with
    # u = fl(1 + e) is off by the rounding r = (u - 1) - e of u. For e < 1, u - 1 is exact
    # (Sterbenz), so subtracting r restores full precision (r / u would be exact; the difference,
    # r e, is below 1e-7 relative). For e >= 1, u - 1 rounds and r is noise, but log(u) >= 0.69
    # is already accurate. Relative error < 3e-7 over all x, with no division: this runs once
    # per (token, channel) ahead of the scan's state loop, where a division cost 8% (H200).
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    return tl.where(x > 20.0, x, tl.log(u) - tl.where(e < 1.0, (u - 1.0) - e, 0.0))


@triton.jit
def _expm1_from(e, x):
    # exp(x) - 1 given e = exp(x): (e - 1) x / log(e) keeps full precision where e - 1 cancels.
    em1 = e - 1.0
    safe = (e != 1.0) & (em1 != -1.0)
    q = em1 * x / tl.log(tl.where(safe, e, 2.0))
    return tl.where(e == 1.0, x, tl.where(em1 == -1.0, -1.0, q))


@triton.jit
def _expm1(x):
    return _expm1_from(tl.exp(x), x)


@triton.jit
def _half_angle(x):
    # x reduced to r in [-pi, pi] (Cody-Waite: 2 pi = HI + LO, k * HI exact for |k| < 4096),
    # then sin and cos of r / 2 by their Taylor series (|r / 2| <= pi / 2: error < 4e-7).
    # Polynomials instead of libdevice's sinf/cosf: a few FMAs, no slow-path branches, and the
    # interpreter runs the same arithmetic as the GPU.
    k = tl.floor(x * 0.15915494309189535 + 0.5)
    r = (x - k * 6.28125) - k * 0.0019353071795864769
    h = 0.5 * r
    h2 = h * h
    s = h * (1.0 + h2 * (-1.6666667e-01 + h2 * (8.3333333e-03 + h2 * (-1.9841270e-04 + h2 * (
        2.7557319e-06 + h2 * (-2.5052108e-08 + h2 * 1.6059044e-10))))))
    c = 1.0 + h2 * (-0.5 + h2 * (4.1666667e-02 + h2 * (-1.3888889e-03 + h2 * (
        2.4801587e-05 + h2 * (-2.7557319e-07 + h2 * 2.0876757e-09)))))
    return s, c


@triton.jit
def _cos(x):
    s, c = _half_angle(x)
    return 1.0 - 2.0 * s * s


@triton.jit
def _sin(x):
    s, c = _half_angle(x)
    return 2.0 * s * c


@triton.jit
def _silu(z):
    # approximate (2 ulp) division: one MUFU.RCP instead of an IEEE division sequence
    return tl.fdiv(z, 1.0 + tl.exp(-z), ieee_rounding=False)
'''


def delta_expr(plan: KernelPlan, raw: str, bias: Optional[str] = "dt_bias") -> str:
    """Δ from the raw dt text, printed from the plan's Δ map (``plan.disc.delta``).

    ``bias`` is the text of the bias (a variable the kernel sets to 0 when no bias was passed),
    or None where the generated code knows it is absent: the map without its bias term.
    """
    from ssmc.discretize import without_bias
    expr = plan.disc.delta if bias is not None else without_bias(plan.disc.delta)
    return print_one(expr, {"dt_raw": raw, "dt_bias": bias or "0.0"})


def describe_family(f: SSMFamily) -> List[str]:
    """Human-readable lines describing a family (for generated headers)."""
    d = f.delta
    delta = "selective" if d.selective else "constant"
    delta += ", softplus" if d.softplus else ""
    delta += ", bias" if d.bias else ""
    delta += f", clamp{tuple(d.clamp)}" if d.clamp else ""
    lines = [
        f"dims: state={f.dims.state} heads={f.dims.heads} head_dim={f.dims.head_dim} "
        f"channels={f.dims.channels} groups={f.dims.groups} rank={f.dims.rank}",
        f"A: {f.A.structure.value}, {'selective' if f.A.selective else 'constant'}",
        f"delta: {delta}",
        f"B: {'selective' if f.B.selective else 'constant'}, per {f.B.sharing.value}; "
        f"C: {'selective' if f.C.selective else 'constant'}, per {f.C.sharing.value}",
        f"D: {('per ' + f.D.sharing.value) if f.D else 'none'}; gate: {f.gate.kind if f.gate else 'none'}",
        f"method: {f.method.value}; inputs: {', '.join(t.value for t in f.dtypes.inputs)}; "
        f"state: {f.dtypes.state.value}",
    ]
    return lines


def header(plan: KernelPlan, config: dict, what: str, notes: Sequence[str] = ()) -> str:
    """The generated module's opening comment (``ssmc.backends.header``): what it is, the
    family, its hash, the config, then the family and its discretized math in words."""
    d = plan.disc
    lines = [f"Triton {what}", *notes, ""] + describe_family(plan.family)
    lines += [f"abar = {d.abar}", f"bbar = {d.bbar}", f"bbar_prev = {d.bbar_prev}"]
    return backends.header(plan, config, "cuda", "#", lines)


PRELUDE = "import torch\nimport triton\nimport triton.language as tl\n"

# Host-side helpers every generated launcher may use (plain torch).
LAUNCH_HELPERS = '''

SM_COUNT = None  # streaming multiprocessors of the device, read once (tests may override)


def _sm_count(device):
    global SM_COUNT
    if SM_COUNT is None:
        SM_COUNT = (torch.cuda.get_device_properties(device).multi_processor_count
                    if device.type == "cuda" else 0)
    return SM_COUNT


def _time_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _tokens(t, complex_, fp32=False):
    """A per-token tensor (..., l) as a kernel reads it, and the strides of its leading dims
    then of its re/im plane: complex as (2, ...) real planes; unit stride along l."""
    if complex_:
        t = torch.view_as_real(t.to(torch.complex64)).movedim(-1, 0).contiguous()
        return t, [*t.stride()[1:-1], t.stride(0)]
    t = _time_contiguous(t.to(torch.float32) if fp32 else t)
    return t, [*t.stride()[:-1], 0]


def _param(t, complex_):
    """A parameter as a kernel reads it: fp32 contiguous, complex as (..., 2) real pairs."""
    if complex_:
        return torch.view_as_real(t.to(torch.complex64)).contiguous()
    # already so (the usual case, and every decode step's): no torch call at all
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
'''


def module_source(plan: KernelPlan, config: dict, what: str, body: str,
                  notes: Sequence[str] = ()) -> str:
    return (header(plan, config, what, notes) + "\n" + PRELUDE + HELPERS + LAUNCH_HELPERS + "\n"
            + body)


# --------------------------------------------------------------------------------------------
# Loading generated modules

def load_module(source: str, cache, stem: str = "ssmc_kernel"):
    """Import generated ``source`` from a file in an entry of the artifact ``cache`` (keyed by the
    source text), so that it is written once, atomically, and listed by ``ssmc cache ls``.

    Triton's @jit reads each kernel's source back through ``inspect`` (and the interpreter
    re-parses it), so the module must live in a file, not in an ``exec`` string.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()
    name = f"{stem}_{digest[:20]}"
    if name in sys.modules:
        return sys.modules[name]
    parts = {"backend": "triton", "source_sha256": digest}
    description = dict(parts, module=name, target="cuda")

    def write(folder: Path) -> None:
        (folder / "kernel.py").write_text(source)

    path = cache.get_or_build(cache.key(**parts), write, description) / "kernel.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def write_module(source: str, out_dir, filename: str = "kernel.py") -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / filename
    target.write_text(source)
    return target


def pow2_at_least(n: int) -> int:
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))
