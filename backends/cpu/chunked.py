"""CHUNKED plans on the CPU: computed by the direct scan over each head's (p, n) state.

Why not SSD's chunked form here: on a GPU the chunked form turns the recurrence into matmuls
for the tensor cores; on a CPU core both forms are bound by the same per-token term, the
2 p n multiply-adds of the state update and readout (SSD: Q n + Q p + 2 p n per token for
chunk Q, i.e. more work than the scan's 2 p n), and the scan keeps a head's state in L1 with
no intermediate (Q x Q) tiles in memory. Measured on the development machine
(bench/NOTES_cpu.md): the scan with the whole head_dim in one vector loop runs Mamba-2
b1 l2048 h24 p64 n128 faster than torch's chunked SSD (MKL matmuls). So a CHUNKED plan is
accepted, its chunk size is irrelevant to the result (the math is the same recurrence), and
the kernel is ``scan.generate``'s.
"""
from __future__ import annotations

from ssmc.ir import KernelPlan

from . import scan


def default_config(plan: KernelPlan) -> dict:
    return scan.default_config(plan)


def generate(plan: KernelPlan, config: dict) -> str:
    return scan.generate(plan, config)
