"""What ``SSMC_DEBUG=1`` shows: every stage of one compile (IR, discretization, plan, source).

The environment variable is read once, at the edge (``ssmc.compile`` or the CLI's ``main``),
by ``enabled()``; everything below takes the resulting bool, so the same stages print whichever
way the compiler was entered.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from typing import Optional, TextIO

ENV = "SSMC_DEBUG"


def enabled(explicit: Optional[bool] = None) -> bool:
    """``explicit`` when given, else whether ``SSMC_DEBUG=1`` is set."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get(ENV) == "1"


def format_ir(node, indent: int = 0) -> str:
    """An indented, loc-free rendering of an IR node (what `ssmc show ir` prints)."""
    pad = "  " * indent
    if dataclasses.is_dataclass(node):
        lines = [f"{type(node).__name__}"]
        for f in dataclasses.fields(node):
            if f.name in ("loc", "text"):
                continue
            value = getattr(node, f.name)
            lines.append(f"{pad}  {f.name}: {format_ir(value, indent + 1)}")
        return "\n".join(lines)
    if isinstance(node, enum.Enum):
        return node.value
    if isinstance(node, tuple) and node and dataclasses.is_dataclass(node[0]):
        return "\n".join([""] + [f"{pad}  - {format_ir(x, indent + 2)}" for x in node])
    return repr(node)


def print_stages(plan, target_name: str, config: dict, source: Optional[str],
                 stream: Optional[TextIO] = None) -> None:
    """The IR, the derived discretization, the plan with its resolved config, and the source."""
    from .discretize import describe
    out = stream or sys.stderr
    fam = plan.family
    rule = "-" * 24
    out.write(f"{rule} ssmc debug: {fam.name} [{plan.algorithm.value}] for {target_name}\n")
    out.write(f"{rule} IR\n{format_ir(fam)}\n")
    out.write(f"{rule} discretization\n{describe(fam)}\n")
    out.write(f"{rule} plan\nalgorithm={plan.algorithm.value} chunk={plan.chunk_size} "
              f"config={json.dumps(config, sort_keys=True, default=str)}\n")
    if source is not None:
        out.write(f"{rule} source\n{source}\n")
    out.flush()


__all__ = ["enabled", "format_ir", "print_stages", "ENV"]
