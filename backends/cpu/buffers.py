"""The TIR kernels' tensor parameters, read off the plan's operand table (ssmc/operands.py).

The scan and the decode step take, in the table's order, every input tensor the family has
(the state first for the step, the initial state last for the scan), then the scan's segment
table, then the outputs. ``buffers`` writes their ``T.match_buffer`` lines and ``arguments``
lists them for the launcher (launch.py), so the generated signature and the call cannot
disagree. The TIR uses short buffer names (h0, hT, bias) for what the convention spells
initial_states / initial_state, final_states / last_state and dt_bias / delta_bias.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ssmc.ir import KernelPlan
from ssmc.operands import Operand, Role

from .tir import Writer, match_buffer

_SHORT = {"initial": "h0", "final": "hT", "dt_bias": "bias", "dt": "dt", "x": "x", "y": "y"}


def _name(plan: KernelPlan, op: Operand) -> str:
    for key, keyword in plan.operands.keyword.items():
        if keyword == op.name:
            return _SHORT[key]
    return op.name


def inputs(plan: KernelPlan) -> List[Tuple[str, Operand]]:
    """(buffer name, operand) of the tensors a kernel reads. Sequence boundaries reach the
    kernel as the segment table; DPLR factors are not taken (elementwise A only)."""
    return [(_name(plan, op), op) for op in plan.operands.tensors()
            if op.role is not Role.INDEX and op.name not in ("P", "Q")]


def outputs(plan: KernelPlan) -> List[Tuple[str, Operand]]:
    return [(_name(plan, op), op) for op in plan.operands.outputs]


def sizes_of(fam, **variables) -> Dict[str, object]:
    """The family's sizes by letter, with ``variables`` (TIR names or ints) for the sizes a
    kernel takes at run time (b, l, ...)."""
    return dict({"h": fam.dims.heads, "p": fam.dims.head_dim, "d": fam.dims.d_inner,
                 "n": fam.dims.state, "g": fam.dims.groups}, **variables)


def shape(op: Operand, sizes: Dict[str, object], token_major: bool = False) -> Tuple[object, ...]:
    """The buffer's shape: the operand's normalized dims at ``sizes`` (letter -> int or TIR
    variable name), complex values as a trailing (re, im) axis. ``token_major``: the
    selective scan's (b, g, n, l) B/C as the launcher hands them, (b, g, l, n)."""
    dims = list(op.dims)
    if token_major and dims[-2:] == ["n", "l"]:
        dims[-2:] = ["l", "n"]
    return tuple(sizes[d] for d in dims) + ((2,) if op.complex else ())


def buffers(w: Writer, plan: KernelPlan, sizes: Dict[str, object], token_major: bool = False,
            state_rows: Dict[str, str] = None):
    """One ``T.match_buffer`` per tensor of ``inputs`` and ``outputs``. ``state_rows``: the
    variable sizing the sequences axis of the initial and final states (they may be 0-row
    placeholders when not given / not wanted)."""
    rows = state_rows or {}
    for name, op in inputs(plan) + outputs(plan):
        at = dict(sizes, s=rows.get(name, sizes.get("s")))
        bc = token_major and op.name in ("B", "C") and op.selective
        match_buffer(w, name, f"{name}_h", shape(op, at, bc))
