"""The portable C target (``--target c``) and its cross targets (``aarch64``, ``riscv64``).

C99 source plus a header, depending on nothing but libm, generated from the same KernelPlans as
every other backend: the math is printed from the plan's sympy expressions by sympy's C printer
(``ssmc.printers``), the layouts come from the calling convention (``layout.py``), one generator
per algorithm (``kernels.py``). See docs/c_target.md.

Backend interface (the same for every target, ``ssmc.backends``): supports, default_config,
check_config, candidates, lower, build, write_artifact; plus lower_files, lower_header and
build_cross for the C target.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ssmc.backends import ALL_STRUCTURES, ELEMENTWISE, Capabilities
from ssmc.errors import TargetError
from ssmc.ir import Algorithm, AStructure, KernelPlan
from ssmc.plan import plan_limits

from .kernels import GENERATORS
from .layout import make_layout
from .source import header_file, source_file

CROSS_TARGETS = {"aarch64": "aarch64-linux-gnu", "riscv64": "riscv64-linux-gnu"}


# A matrix A (DPLR, dense) would need matrix exponentials or solves per step: only conv, which
# discretizes it once on the host. Chunked is SSD's, for scalar A. State and accumulation fp32.
CAPABILITIES = Capabilities("c", ((Algorithm.SCAN, ELEMENTWISE), (Algorithm.STEP, ELEMENTWISE),
                                  (Algorithm.CHUNKED, frozenset({AStructure.SCALAR})),
                                  (Algorithm.CONV, ALL_STRUCTURES)), device="cpu")


def backward_refusal(plan: KernelPlan) -> Optional[str]:
    """The c and cross targets generate inference kernels only (edge devices run no backward)."""
    return "the c and cross-compiled targets are forward-only (inference on edge devices)"


def supports(plan: KernelPlan) -> Optional[str]:
    """None when the C target can compile ``plan``, else the reason in words."""
    return CAPABILITIES.refuses(plan) or plan_limits(plan)


def default_config(plan: KernelPlan) -> dict:
    """Portable and exact by default: no -march=native (the .so may move), no -ffast-math."""
    return {"opt": "-O3", "native": False, "fast_math": False}


def candidates(plan: KernelPlan) -> List[dict]:
    """The only knobs a portable C kernel has are the compiler's (keys: opt, native, fast_math;
    ``cflags`` adds flags)."""
    return [{"opt": "-O3", "native": False, "fast_math": False},
            {"opt": "-O3", "native": True, "fast_math": False},
            {"opt": "-O3", "native": True, "fast_math": True},
            {"opt": "-O2", "native": True, "fast_math": True}]


_CONFIG_KEYS = ("opt", "native", "fast_math", "cflags", "triple")


def check_config(plan: KernelPlan, config: dict) -> Optional[str]:
    """Why ``config`` cannot be used (a key the C target does not read), None when it can."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        return f"unknown c config key {unknown[0]!r}; known: {', '.join(_CONFIG_KEYS)}"
    return None


def lower_files(plan: KernelPlan, config: dict) -> Dict[str, str]:
    """``{"<family>.h": header, "<family>.c": source}`` for the plan."""
    layout = make_layout(plan)
    functions = GENERATORS[plan.algorithm](layout)
    header_name = f"{layout.prefix}.h"
    header = header_file(layout, [(name, params, summary) for name, params, summary, _ in functions],
                         config)
    source = source_file(layout, header_name, [body for *_, body in functions], config)
    return {header_name: header, f"{layout.prefix}.c": source}


def lower(plan: KernelPlan, config: dict) -> str:
    """The generated C source (the .c file; ``lower_header`` gives the .h it includes)."""
    files = lower_files(plan, config)
    return next(text for name, text in files.items() if name.endswith(".c"))


def lower_header(plan: KernelPlan, config: dict) -> str:
    files = lower_files(plan, config)
    return next(text for name, text in files.items() if name.endswith(".h"))


def build(plan: KernelPlan, config: dict, cache):
    """Compile for this machine into ``cache`` and return ``kernel(problem) -> (y, final_or_None)``."""
    from .toolchain import build_host
    if config.get("triple"):
        raise TargetError(f"target {config['triple']} cross-compiles; use write_artifact or "
                          "build_cross to get its library")
    return build_host(plan, config, cache)


def build_cross(plan: KernelPlan, config: dict, triple: str, out_dir, cache) -> List[Path]:
    """Cross-compile the plan for ``triple`` (e.g. aarch64-linux-gnu) into ``out_dir``."""
    from .cross import build_cross as _build_cross
    return _build_cross(plan, config, triple, out_dir, cache)


def write_artifact(plan: KernelPlan, config: dict, out_dir, cache,
                   target: Optional[str] = None) -> List[Path]:
    """``<family>.c``, ``<family>.h``, ``main.c`` and a Makefile in ``out_dir``; for a cross
    target (``target`` aarch64/riscv64, or ``config["triple"]``) also the cross-built .so and
    static example executable (compiled into ``cache``)."""
    from .artifact import write_sources
    triple = CROSS_TARGETS.get(target, target) if target and target != "c" else config.get("triple")
    if triple:
        return build_cross(plan, config, triple, out_dir, cache)
    return write_sources(plan, config, out_dir)
