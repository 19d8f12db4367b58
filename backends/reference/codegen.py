"""Generate the oracle's numpy source for one plan.

The source is the whole per-token math of the family: Δ's parameterization, the discretized
Ā, B̄ (elementwise A: printed from the sympy expressions of ``ssmc.discretize``, never retyped;
dense/DPLR A: evaluated by ``ssmc.discretize.evaluate``, the expressions quoted in the
docstring) and the recurrence with its output map. It is what ``build`` executes and ``write_artifact`` writes,
so the file a person reads is exactly what checked their kernel. Layout (which tensor axis is
a head, a group, a token) is not here: ``layout.py`` brings every convention to one
time-major, channel-flattened form first.
"""
from __future__ import annotations

import hashlib
import textwrap

from ssmc import discretize as _discretize_pass
from ssmc.ir import AStructure, KernelPlan
from ssmc.printers import print_expr

MATRIX_STRUCTURES = (AStructure.DENSE, AStructure.DPLR)
_NAMES = {"dt": "dt", "a": "a"}
# The two prints of the oracle: numpy (every forward kernel's oracle) and float64 torch (the
# gradient oracle: torch autograd differentiates this same recurrence). Only these spellings
# differ; the math lines come from the printers' dialect of the same name.
_LIBRARY = {
    "numpy": dict(imports="import numpy as np", initial="np.array(h0, dtype=np.{dtype})",
                  stack="np.stack", exp="np.exp", einsum="np.einsum"),
    "torch": dict(imports="import torch", initial="h0.to(torch.{dtype})",
                  stack="torch.stack", exp="torch.exp", einsum="torch.einsum"),
}


def _disc(plan: KernelPlan):
    return plan.disc if plan.disc is not None else _discretize_pass.discretize(plan.family)


def _coefficient_function(name: str, disc, doc: str, dialect: str) -> str:
    lines = [f"def {name}(dt, a):", f'    """{doc}"""']
    for field in ("abar", "bbar", "bbar_prev"):
        lines.append(f"    {field} = {print_expr(getattr(disc, field), dialect, _NAMES)}")
    lines.append("    return abar, bbar, bbar_prev")
    return "\n".join(lines)


def _discretize_source(plan: KernelPlan, dialect: str) -> str:
    disc = _disc(plan)
    if disc.structure not in MATRIX_STRUCTURES:
        return _coefficient_function(
            "discretize", disc, "Abar, Bbar, Bbar_prev of elements a of A over steps dt "
                                "(printed from ssmc.discretize).", dialect)
    # Matrix functions (expm, solves) have no one-line numpy print: the pass evaluates them.
    return textwrap.dedent(f'''\
        DISC = None  # the plan's Discretized (matrix expressions); build() sets it


        def discretize(dt, a):
            """Matrix Abar, Bbar, Bbar_prev of a (..., n, n) over dt (...), evaluated by
            ssmc.discretize.evaluate from:
                abar = {disc.abar}
                bbar = {disc.bbar}
                bbar_prev = {disc.bbar_prev}
            """
            return evaluate(DISC, dt, a)''')


def _delta_source(plan: KernelPlan, dialect: str) -> str:
    disc = _disc(plan)
    names = {disc.dt_raw.name: "dt", disc.dt_bias.name: "dt_bias"}
    lines = ["def delta_of(dt, dt_bias):",
             '    """Δ from the raw dt (the spec\'s bias, softplus, clamp), printed from the Δ map',
             f'    {disc.delta} of ssmc.discretize."""']
    if plan.family.delta.bias:
        plain = print_expr(_discretize_pass.without_bias(disc.delta), dialect, names)
        lines += ["    if dt_bias is None:", f"        return {plain}"]
    lines.append(f"    return {print_expr(disc.delta, dialect, names)}")
    return "\n".join(lines)


def _recurrence_source(plan: KernelPlan, lib: dict) -> str:
    fam = plan.family
    matrix = fam.A.structure in MATRIX_STRUCTURES
    complex_state = fam.A.structure is AStructure.COMPLEX_DIAGONAL
    trapezoid = _has_previous_input(plan)
    a_shape = "(L|1, R|1, c, n, n)" if matrix else "(L|1, R|1, c, n)"
    out = [
        "def recurrence(x, dt, dt_bias, a, B, C, D, z, h0):",
        '    """One stretch of tokens, float64, time-major with channels flattened:',
        "      x, z: (L, R, c)   dt: (L|1, R|1, c)   dt_bias, D: (c,) or None",
        f"      a: {a_shape}   B, C: (L|1, R|1, c, n)   h0: (R, c, n)",
        "    (an axis of size 1 broadcasts). Returns y (L, R, c) and the last state (R, c, n).",
        '    """',
        "    delta = delta_of(dt, dt_bias)",
    ]
    # Coefficients per token (memory O(R c n), not O(L R c n)); once when nothing varies in time.
    dt_axes = "" if matrix else "[..., None]"
    initial = lib["initial"].format(dtype="complex128" if complex_state else "float64")
    out += [f"    h = {initial}",
            "    y = []",
            "    time_invariant = delta.shape[0] == 1 and a.shape[0] == 1",
            "    if time_invariant:",
            f"        abar, bbar, bbar_prev = discretize(delta[0]{dt_axes}, a[0])"]
    if trapezoid:
        out.append("    bx_prev = 0.0 * h  # a stretch starts with no previous input (numpy or torch)")
    out += ["    for t in range(x.shape[0]):",
            "        if not time_invariant:",
            f"            abar, bbar, bbar_prev = discretize(at(delta, t){dt_axes}, at(a, t))",
            "        bx = at(B, t) * x[t][..., None]"]
    if matrix:
        update, prev = "mv(abar, h) + mv(bbar, bx)", " + mv(bbar_prev, bx_prev)"
    else:
        update, prev = "abar * h + bbar * bx", " + bbar_prev * bx_prev"
    out.append(f"        h = {update}{prev if trapezoid else ''}")
    if trapezoid:
        out.append("        bx_prev = bx")
    if complex_state:
        out.append("        y.append(2.0 * (at(C, t) * h).sum(-1).real)  # conjugate pairs")
    else:
        out.append("        y.append((at(C, t) * h).sum(-1))")
    out.append(f"    y = {lib['stack']}(y) if y else 0.0 * x")
    if fam.D is not None:
        out.append("    y = y + D * x")
    if fam.gate is not None:
        out.append(f"    y = y * (z / (1.0 + {lib['exp']}(-z)))  # silu(z)")
    out.append("    return y, h")
    return "\n".join(out)


_HELPERS = '''\
def at(v, t):
    """Token t of a time-major array whose time axis may be a broadcast of size 1."""
    return v[t] if v.shape[0] > 1 else v[0]


def mv(m, v):
    return {einsum}("...ij,...j->...i", m, v)'''


def _has_previous_input(plan: KernelPlan) -> bool:
    bbar_prev = _disc(plan).bbar_prev
    return not (getattr(bbar_prev, "is_zero", False) or getattr(bbar_prev, "is_ZeroMatrix", False))


def generate(plan: KernelPlan, config: dict, dialect: str = "numpy") -> str:
    """The oracle's module for ``plan`` (see the module docstring), in numpy or, for the
    gradient oracle, in float64 torch."""
    fam = plan.family
    lib = _LIBRARY[dialect]
    selective = [n for n, s in (("delta", fam.delta), ("A", fam.A), ("B", fam.B), ("C", fam.C))
                 if s.selective] or ["none (LTI)"]
    imports = lib["imports"]
    if fam.A.structure in MATRIX_STRUCTURES:
        imports += "\n\nfrom ssmc.discretize import evaluate"
    body = "\n\n\n".join([imports, _delta_source(plan, dialect), _discretize_source(plan, dialect),
                          _recurrence_source(plan, lib), _HELPERS.format(**lib)]) + "\n"
    d = fam.dims
    dims = (f"{d.heads} heads x {d.head_dim} head_dim" if fam.A.structure is AStructure.SCALAR
            else f"{d.d_inner} channels" + (f", rank {d.rank}" if d.rank else ""))
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    what = "float64, torch: the gradient oracle" if dialect == "torch" else "float64"
    header = (f'"""ssmc reference oracle ({what}) for family {fam.name}.\n\n'
              f"A {fam.A.structure.value}, discretized by {fam.method.value}; selective: "
              f"{', '.join(selective)}; D: {'yes' if fam.D else 'no'}; "
              f"gate: {fam.gate.kind if fam.gate else 'none'}.\n"
              f"dims: {dims}, state {fam.dims.state}, groups {fam.dims.groups}.\n"
              f"config: {config or {}}; source hash {digest}.\n"
              f'Generated by ssmc.backends.reference; the layout is ssmc/backends/reference/'
              f'layout.py\'s.\n"""\n')
    return header + body
