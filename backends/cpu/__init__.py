"""The CPU backend: KernelPlans lowered to TVM TIR (TVMScript text), compiled by LLVM.

    kernel = build(plan, {"llvm_target": "llvm -mcpu=native"})
    y, final_state = kernel(problem)        # problem: a bound ssmc.signature Problem
    kernel.compile_seconds, kernel.cached   # compile (or cache load) time; from the disk cache?

One generator per algorithm: ``scan`` (diagonal, complex-diagonal and scalar A), ``chunked``
(CHUNKED plans, computed by the scan: see chunked.py for why), ``conv`` (LTI: K in TIR, the
FFT in torch) and ``step`` (the decode step). Everything that differs between families comes
from the IR: the Δ map, Abar/Bbar printed from ``plan.disc``, groups, D, gate. Compiled
modules are cached on disk (``tvmbuild.py``: the ssmc artifact cache under $SSMC_CACHE_DIR, else
~/.cache/ssmc) keyed by the TIR text, the LLVM target and the TVM version. The generators write
text; ``launch.py`` (torch) binds a problem to a compiled kernel, and is imported only by
``build``, so that writing an artifact imports neither torch nor (when cached) TVM.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

from ssmc.backends import ALL_STRUCTURES, ELEMENTWISE, Capabilities
from ssmc.errors import TargetError
from ssmc.ir import Algorithm, AStructure, KernelPlan
from ssmc.plan import plan_limits

from . import tvmbuild as _build
from . import chunked, conv, scan, step

NAME = "cpu"
_GENERATORS = {Algorithm.SCAN: scan, Algorithm.CHUNKED: chunked, Algorithm.CONV: conv,
               Algorithm.STEP: step}
_CONFIG_KEYS = {"llvm_target", "target", "cache_dir", "num_threads", "lanes", "unroll_state",
                "kernel_lanes", "tile", "exp_degree", "row_tiles", "scalef", "readout_split"}


# A matrix A (DPLR, dense) only by conv, which forms Abar once on the host; state and
# accumulation in fp32.
CAPABILITIES = Capabilities("cpu", ((Algorithm.SCAN, ELEMENTWISE), (Algorithm.CHUNKED, ELEMENTWISE),
                                    (Algorithm.STEP, ELEMENTWISE),
                                    (Algorithm.CONV, ALL_STRUCTURES)), device="cpu")


def supports(plan: KernelPlan) -> Optional[str]:
    return CAPABILITIES.refuses(plan) or plan_limits(plan)


def _check(plan: KernelPlan) -> None:
    reason = supports(plan)
    if reason:
        raise TargetError(f"target cpu cannot compile {plan.family.name} "
                          f"({plan.algorithm.value}): {reason}", plan.family.compute.loc)


def default_config(plan: KernelPlan) -> dict:
    cfg = {"llvm_target": _build.DEFAULT_LLVM_TARGET}
    cfg.update(_GENERATORS[plan.algorithm].default_config(plan))
    return cfg


def candidates(plan: KernelPlan) -> List[dict]:
    """Configs the tuner may time: lane widths that divide the work, unrolled or not."""
    base = default_config(plan)
    fam = plan.family
    if plan.algorithm is Algorithm.STEP:
        return [base]
    if fam.A.structure is AStructure.SCALAR:
        unit, widths = fam.dims.head_dim, (8, 16, 32, 64)
    else:
        unit, widths = fam.dims.d_inner // fam.dims.groups, (4, 8, 16, 32)
    out = []
    for lanes in widths:
        if unit % lanes:
            continue
        for unroll in (True, False):
            out.append(dict(base, lanes=lanes, unroll_state=unroll))
    return out or [base]


def _target_spec(config: dict):
    """The LLVM target as the config gives it (unresolved)."""
    return config.get("llvm_target") or config.get("target") or _build.DEFAULT_LLVM_TARGET


def _target(config: Optional[dict]) -> dict:
    return _build.target_dict(_target_spec(config or {}))


def _shown(config: dict) -> dict:
    """The config keys the TIR depends on (the header prints them; the plan key hashes them)."""
    return {k: config[k] for k in sorted(config) if k in _CONFIG_KEYS and k != "cache_dir"}


def _plan_key(plan: KernelPlan, config: dict) -> str:
    from ssmc.plan import ir_hash
    return _build.plan_key(ir_hash(plan), _shown(config), _target_spec(config))


def _about(plan: KernelPlan, config: dict) -> dict:
    """What ``ssmc cache ls`` shows of an entry: the target as the user names it (``cpu`` is
    ssmc's name for the default ``llvm -mcpu=native``)."""
    spec = _target_spec(config)
    target = "cpu" if spec == _build.DEFAULT_LLVM_TARGET else str(spec)
    return {"family": plan.family.name, "algorithm": plan.algorithm.value, "target": target}


def _describe(plan: KernelPlan) -> str:
    try:
        from ssmc.discretize import describe
        return describe(plan.family)
    except Exception:  # an older discretize without describe(): the dataclass is still exact
        return repr(plan.family)


def lower(plan: KernelPlan, config: Optional[dict] = None) -> str:
    """The TVMScript text ``build`` compiles, with a header naming the spec and the config."""
    _check(plan)
    config = dict(default_config(plan), **(config or {}))
    from ssmc.plan import ir_hash
    body = _GENERATORS[plan.algorithm].generate(plan, config)
    shown = _shown(config)
    header = [f"# ssmc cpu kernel: {plan.family.name}, algorithm {plan.algorithm.value}, "
              f"plan {ir_hash(plan)}",
              f"# config: {json.dumps(shown, sort_keys=True)}",
              f"# llvm target: {json.dumps(_target(config), sort_keys=True)}"]
    if plan.algorithm is Algorithm.CHUNKED:
        header.append(f"# chunk_size {plan.chunk_size}: computed by the direct scan "
                      "(backends/cpu/chunked.py says why)")
    header += ["# " + ln if ln else "#" for ln in _describe(plan).splitlines()]
    return "\n".join(header) + "\n" + body


class CpuKernel:
    """A compiled plan: ``kernel(problem) -> (y, final_state_or_None)``."""

    def __init__(self, plan: KernelPlan, config: dict, source: str, built, runner):
        self.plan = plan
        self.config = config
        self.source = source
        self.compile_seconds = built.seconds
        self.cached = built.cached
        self.path = built.path
        self.module = built.module
        self._run = runner
        self._threads = config.get("num_threads")

    def __call__(self, problem):
        if self._threads:
            _build.set_num_threads(self._threads)
        return self._run(problem)

    def __repr__(self):
        return (f"<ssmc cpu kernel {self.plan.family.name} {self.plan.algorithm.value} "
                f"({'cached' if self.cached else 'compiled'} in {self.compile_seconds:.3f}s)>")


def build(plan: KernelPlan, config: Optional[dict] = None) -> CpuKernel:
    config = dict(default_config(plan), **(config or {}))
    tdict = _target(config)
    if not _build.runs_here(tdict):
        raise TargetError(f"the CPU target {tdict.get('mtriple')} does not run on this machine",
                          hint="use write_artifact (ssmc compile -o DIR) to get the shared object")
    pkey = _plan_key(plan, config)
    source = _build.cached_source(pkey, config) or lower(plan, config)
    built = _build.load(source, tdict, config, _about(plan, config))
    _build.remember_source(pkey, built.path.parent, config)
    from . import launch  # deferred: torch is needed to call a kernel, not to write one
    return CpuKernel(plan, config, source, built, launch.runner(plan, built.module))


def _host_entry(plan: KernelPlan, config: dict) -> Path:
    """The artifact-cache entry (kernel.so, kernel.tir.py) of a plan for this machine: through
    the plan key when it was built before (no TIR generated, TVM not imported, nothing loaded),
    else generated and compiled into the cache."""
    pkey = _plan_key(plan, config)
    entry = _build.cached_entry(pkey, config)
    if entry is None:
        library, _ = _build.library(lower(plan, config), _target(config), config,
                                    _about(plan, config))
        entry = library.parent
        _build.remember_source(pkey, entry, config)
    return entry


def write_artifact(plan: KernelPlan, config: Optional[dict], out_dir) -> List[str]:
    """The TVMScript text (``.tir.py``) and the compiled library (``.so``; ``.o`` when a cross
    target has no linker here) under ``out_dir``; returns their paths."""
    config = dict(default_config(plan), **(config or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{plan.family.name}_{plan.algorithm.value}_cpu"
    text_path, lib_path = out / f"{stem}.tir.py", out / f"{stem}.so"
    if _build.runs_here(_build.parse_target(_target_spec(config))):
        # A host library is the cached one: copying it keeps a repeated `ssmc compile` fast.
        entry = _host_entry(plan, config)
        shutil.copyfile(entry / "kernel.tir.py", text_path)
        shutil.copyfile(entry / "kernel.so", lib_path)
        return [str(text_path), str(lib_path)]
    source = lower(plan, config)
    text_path.write_text(source)
    return [str(text_path), str(_build.export_cross(source, _target(config), lib_path))]


__all__ = ["NAME", "supports", "default_config", "candidates", "lower", "build",
           "write_artifact", "CpuKernel"]
