"""Small helpers to write TVMScript text: indentation, buffers, the Δ map, the output epilogue.

Shared by every CPU generator (scan, step, conv). Everything emitted here is per family: the
Δ map (bias, softplus, clamp) and the epilogue (D skip, silu gate) read the IR, never a
hard-coded model.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

from ssmc.discretize import without_bias
from ssmc.ir import SSMFamily
from ssmc.printers import TIRPrinter

from . import fastmath
from .fastmath import Namer


class Writer:
    """Lines of TVMScript with an indentation stack."""

    def __init__(self):
        self.lines: List[str] = []
        self.depth = 0
        self.names = Namer()
        self.math = fastmath.DEFAULT   # set by the generator from the config/target

    @property
    def ind(self) -> str:
        return "    " * self.depth

    def __call__(self, text: str = "") -> None:
        self.lines.append((self.ind + text) if text else "")

    def block(self, header: str):
        writer = self

        class _Block:
            def __enter__(self):
                writer(header)
                writer.depth += 1

            def __exit__(self, *exc):
                writer.depth -= 1
        return _Block()

    def let(self, stem: str, expr: str) -> str:
        name = self.names(stem)
        self(f"{name}: T.let = {expr}")
        return name

    def extend(self, lines: Sequence[str]) -> None:
        self.lines.extend(lines)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def match_buffer(w: Writer, name: str, handle: str, shape: Sequence, dtype: str = "float32"):
    dims = ", ".join(str(s) for s in shape)
    if len(shape) == 1:
        dims += ","
    # align=4: torch tensors are only element-aligned (slices, small allocations); TVM's
    # default of 64 would make LLVM emit aligned vector loads.
    w(f'{name} = T.match_buffer({handle}, ({dims}), "{dtype}", align=4)')


class DeltaPrinter(TIRPrinter):
    """TIR printer whose softplus is fastmath's vectorizable one, emitted as let-lines."""

    def __init__(self, w: Writer, names):
        super().__init__(names=names)
        self._w = w

    def _print_Softplus(self, expr):
        lines: List[str] = []
        out = fastmath.softplus(lines, self._w.ind, self._w.names, self._print(expr.args[0]),
                                stem="sp", opts=self._w.math)
        self._w.extend(lines)
        return out


def delta_expr(w: Writer, disc, raw: str, bias: Optional[str]) -> str:
    """Δ from the raw dt text, printed from the pass's Δ map (``disc.delta``: bias, softplus,
    clamp as the spec says); ``bias`` None drops the bias term. Returns a let name."""
    expr = disc.delta if bias is not None else without_bias(disc.delta)
    x = DeltaPrinter(w, {disc.dt_raw.name: raw, disc.dt_bias.name: bias or ""}).doprint(expr)
    return w.let("delta", x)


def epilogue(w: Writer, family: SSMFamily, y: str, x: str, d: Optional[str],
             z: Optional[str]) -> str:
    """y + D x, then y * silu(z), as the spec says. Returns the text of the output value."""
    out = y
    if family.D is not None and d is not None:
        out = f"({out} + {d} * {x})"
    if family.gate is not None and z is not None:
        lines: List[str] = []
        g = fastmath.silu(lines, w.ind, w.names, z, stem="gate", opts=w.math)
        w.extend(lines)
        out = f"{out} * {g}"
    return out


def lanes_for(count: int, max_lanes: int = 16) -> int:
    """The widest power of two <= max_lanes dividing ``count`` (so no lane block straddles)."""
    lanes = 1
    while lanes * 2 <= max_lanes and count % (lanes * 2) == 0:
        lanes *= 2
    return lanes


_LET = re.compile(r"^(\s*)([A-Za-z_][A-Za-z_0-9]*): T\.let = (.*)$")


def scalar_temporaries(lines: List[str], declare) -> List[str]:
    """Scalar ``x: T.let = e`` lines as stores to one-element local buffers.

    TVM's simplifier substitutes scalar let-bindings into their uses; a fast-exp chain (each
    step used 2-3 times) then grows exponentially and CSE spends seconds undoing it. Stores
    are left alone (and LLVM's mem2reg makes them registers again). Vector lets are kept by
    TVM, so only scalar code needs this. ``declare(name)`` allocates the buffer."""
    names = []
    out = []
    for ln in lines:
        m = _LET.match(ln)
        text = ln
        for nm in names:
            text = re.sub(rf"\b{nm}\b(?!\[)", f"{nm}[0]", text)
        if m:
            ind, name, _ = m.groups()
            declare(name)
            names.append(name)
            expr = _LET.match(text).group(3)
            text = f"{ind}{name}[0] = {expr}"
        out.append(text)
    return out
