"""The CPU backend: KernelPlans lowered to TVM TIR (TVMScript text), compiled by LLVM.

    kernel = build(plan, {"llvm_target": "llvm -mcpu=native"})
    y, final_state = kernel(problem)        # problem: a bound ssmc.signature Problem
    kernel.compile_seconds, kernel.cached   # compile (or cache load) time; from the disk cache?

One generator per algorithm: ``scan`` (diagonal, complex-diagonal and scalar A), ``chunked``
(CHUNKED plans, computed by the scan: see chunked.py for why), ``conv`` (LTI: K in TIR, the
FFT in torch) and ``step`` (the decode step). Everything that differs between families comes
from the IR: the Δ map, Abar/Bbar printed from ``plan.disc``, groups, D, gate. Compiled
modules are cached on disk (``build.py``: $SSMC_CACHE_DIR/cpu, else ~/.cache/ssmc/cpu) keyed by
the TIR text, the LLVM target and the TVM version.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from ssmc.errors import TargetError
from ssmc.ir import Algorithm, AStructure, DType, KernelPlan
from ssmc.plan import plan_limits

from . import tvmbuild as _build
from . import chunked, conv, scan, step

NAME = "cpu"
_GENERATORS = {Algorithm.SCAN: scan, Algorithm.CHUNKED: chunked, Algorithm.CONV: conv,
               Algorithm.STEP: step}
_CONFIG_KEYS = {"llvm_target", "target", "cache_dir", "num_threads", "lanes", "unroll_state",
                "kernel_lanes", "tile", "exp_degree", "row_tiles", "scalef", "readout_split"}


def supports(plan: KernelPlan) -> Optional[str]:
    fam = plan.family
    st = fam.A.structure
    if st in (AStructure.DPLR, AStructure.DENSE) and plan.algorithm is not Algorithm.CONV:
        return (f"{st.value} A (a matrix per channel) is implemented by the CPU backend's conv "
                f"algorithm only (Abar formed once on the host), not {plan.algorithm.value}")
    if plan.algorithm not in _GENERATORS:
        return f"unknown algorithm {plan.algorithm}"
    limit = plan_limits(plan)
    if limit:
        return limit
    if fam.dtypes.state is not DType.FLOAT32 or fam.dtypes.accum is not DType.FLOAT32:
        return "the CPU kernels keep state and accumulation in fp32"
    return None


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


def _target(config: Optional[dict]) -> dict:
    config = config or {}
    return _build.target_dict(config.get("llvm_target") or config.get("target")
                              or _build.DEFAULT_LLVM_TARGET)


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
    shown = {k: config[k] for k in sorted(config) if k in _CONFIG_KEYS and k != "cache_dir"}
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
    from ssmc.plan import ir_hash
    shown = {k: config[k] for k in sorted(config) if k in _CONFIG_KEYS and k != "cache_dir"}
    pkey = _build.plan_key(ir_hash(plan), shown, tdict)
    source = _build.cached_source(pkey, config) or lower(plan, config)
    built = _build.load(source, tdict, config)
    _build.remember_source(pkey, built.path.parent, config)
    gen = _GENERATORS[plan.algorithm]
    if plan.algorithm is Algorithm.CONV:
        runner = gen.Runner(plan, built.module)
    else:
        name = "ssmc_step" if plan.algorithm is Algorithm.STEP else "ssmc_scan"
        runner = gen.Runner(plan, built.module[name])
    return CpuKernel(plan, config, source, built, runner)


def write_artifact(plan: KernelPlan, config: Optional[dict], out_dir) -> List[str]:
    """The TVMScript text (``.tir.py``) and the compiled library (``.so``; ``.o`` when a cross
    target has no linker here) under ``out_dir``; returns their paths."""
    config = dict(default_config(plan), **(config or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{plan.family.name}_{plan.algorithm.value}_cpu"
    source = lower(plan, config)
    text_path = out / f"{stem}.tir.py"
    text_path.write_text(source)
    lib = _build.export(source, _target(config), out / f"{stem}.so")
    return [str(text_path), str(lib)]


__all__ = ["NAME", "supports", "default_config", "candidates", "lower", "build",
           "write_artifact", "CpuKernel"]
