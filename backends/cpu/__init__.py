"""The CPU backend: KernelPlans lowered to TVM TIR (TVMScript text), compiled by LLVM.

    kernel = build(plan, resolve_config(cpu, plan, {"llvm_target": "llvm -mcpu=native"}), cache)
    y, final_state = kernel(problem)        # problem: a bound ssmc.signature Problem
    kernel.compile_seconds, kernel.cached   # compile (or cache load) time; from the disk cache?

One generator per algorithm: ``scan`` (diagonal, complex-diagonal and scalar A), ``chunked``
(CHUNKED plans, computed by the scan: see chunked.py for why), ``conv`` (LTI: K in TIR, the
FFT in torch) and ``step`` (the decode step). Everything that differs between families comes
from the IR: the Δ map, Abar/Bbar printed from ``plan.disc``, groups, D, gate. Compiled
modules live in the artifact cache the caller passes to ``build`` / ``write_artifact``
(``tvmbuild.py``), keyed by the plan, config, LLVM target and TVM version. The generators write
text; ``launch.py`` (torch) binds a problem to a compiled kernel, and is imported only by
``build``, so that writing an artifact imports neither torch nor (when cached) TVM.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

from ssmc.backends import ALL_STRUCTURES, ELEMENTWISE, Capabilities, header
from ssmc.errors import TargetError
from ssmc.ir import Algorithm, AStructure, KernelPlan
from ssmc.plan import plan_limits

from . import tvmbuild as _build
from . import chunked, conv, conv_backward, scan, scan_backward, ssd_backward, step

NAME = "cpu"
_GENERATORS = {Algorithm.SCAN: scan, Algorithm.CHUNKED: chunked, Algorithm.CONV: conv,
               Algorithm.STEP: step}
_CONFIG_KEYS = {"llvm_target", "target", "num_threads", "lanes", "unroll_state",
                "kernel_lanes", "tile", "exp_degree", "row_tiles", "scalef", "readout_split",
                "ckpt", "bwd_rows"}


# A matrix A (DPLR, dense) only by conv, which forms Abar once on the host; state and
# accumulation in fp32.
CAPABILITIES = Capabilities("cpu", ((Algorithm.SCAN, ELEMENTWISE), (Algorithm.CHUNKED, ELEMENTWISE),
                                    (Algorithm.STEP, ELEMENTWISE),
                                    (Algorithm.CONV, ALL_STRUCTURES)), device="cpu")


def supports(plan: KernelPlan) -> Optional[str]:
    return CAPABILITIES.refuses(plan) or plan_limits(plan)


def check_config(plan: KernelPlan, config: dict) -> Optional[str]:
    """Why ``config`` cannot be used (a key no generator reads), None when it can."""
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        return (f"unknown cpu config key {unknown[0]!r}; known: {', '.join(sorted(_CONFIG_KEYS))}")
    return None


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
    return {k: config[k] for k in sorted(config) if k in _CONFIG_KEYS}


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


def lower(plan: KernelPlan, config: dict) -> str:
    """The TVMScript text ``build`` compiles, with a header naming the spec and the config."""
    body = _GENERATORS[plan.algorithm].generate(plan, config)
    notes = [f"llvm target: {json.dumps(_target(config), sort_keys=True)}"]
    if plan.algorithm is Algorithm.CHUNKED:
        notes.append(f"chunk_size {plan.chunk_size}: computed by the direct scan "
                     "(backends/cpu/chunked.py says why)")
    notes += [""] + _describe(plan).splitlines()
    return header(plan, _shown(config), _about(plan, config)["target"], "#", notes) + body


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


def build(plan: KernelPlan, config: dict, cache) -> CpuKernel:
    """The compiled plan, from its entry in the artifact ``cache`` (compiled into it on a miss)."""
    tdict = _target(config)
    if not _build.runs_here(tdict):
        raise TargetError(f"the CPU target {tdict.get('mtriple')} does not run on this machine",
                          hint="use write_artifact (ssmc compile -o DIR) to get the shared object")
    pkey = _plan_key(plan, config)
    built = _build.load(pkey, lambda: lower(plan, config), tdict, cache, _about(plan, config))
    source = (built.path.parent / "kernel.tir.py").read_text()
    from . import launch  # deferred: torch is needed to call a kernel, not to write one
    kernel = CpuKernel(plan, config, source, built, launch.runner(plan, built.module))
    kernel.backward_refusal = backward_refusal(plan)
    if kernel.backward_refusal is None:
        kernel.backward = _lazy_backward(plan, config, tdict, cache, built.module)
    return kernel


def backward_refusal(plan: KernelPlan) -> Optional[str]:
    """Why no backward kernel is generated for ``plan`` (None when one is)."""
    # CHUNKED plans are computed by the scan here (chunked.py), and so is their backward
    if plan.algorithm in (Algorithm.SCAN, Algorithm.CHUNKED):
        return scan_backward.supports_backward(plan)   # (scalar A: ssd_backward's)
    if plan.algorithm is Algorithm.CONV:
        return conv_backward.supports_backward(plan)
    return f"the cpu target's {plan.algorithm.value} generator has no backward kernel yet"


def lower_backward(plan: KernelPlan, config: dict) -> str:
    """The TVMScript of the plan's backward kernel (compiled on the first backward)."""
    notes = [f"llvm target: {json.dumps(_target(config), sort_keys=True)}", "backward kernel",
             ""] + _describe(plan).splitlines()
    generator = conv_backward if plan.algorithm is Algorithm.CONV else \
        ssd_backward if plan.family.A.structure is AStructure.SCALAR else scan_backward
    return (header(plan, _shown(config), _about(plan, config)["target"], "#", notes)
            + generator.generate(plan, config))


def _lazy_backward(plan: KernelPlan, config: dict, tdict: dict, cache, forward_module=None):
    """``backward(problem, dout, dfinal) -> {argument: gradient}``, its module compiled (or
    loaded from the cache) on the first call: most kernels never run a backward, and the
    forward's compile time is what `ssmc compile` and the tests pay. The convolution's
    backward also calls the forward module's K generator (``forward_module``)."""
    from ssmc.plan import ir_hash
    from . import launch
    runner = []

    def backward(problem, dout, dfinal):
        if not runner:
            pkey = _build.plan_key(ir_hash(plan) + ":backward", _shown(config),
                                   _target_spec(config))
            about = dict(_about(plan, config), algorithm=f"{plan.algorithm.value} backward")
            built = _build.load(pkey, lambda: lower_backward(plan, config), tdict, cache, about)
            if plan.algorithm is Algorithm.CONV:
                runner.append(launch.ConvBackwardRunner(plan, forward_module, built.module))
            elif plan.family.A.structure is AStructure.SCALAR:
                runner.append(launch.SSDBackwardRunner(plan, built.module[ssd_backward.FUNC],
                                                       config))
            else:
                runner.append(launch.ScanBackwardRunner(plan, built.module[scan_backward.FUNC],
                                                        int(config.get("ckpt",
                                                                       scan_backward.DEFAULT_CKPT))))
        return runner[0](problem, dout, dfinal)
    return backward


def write_artifact(plan: KernelPlan, config: dict, out_dir, cache) -> List[str]:
    """The TVMScript text (``.tir.py``) and the compiled library (``.so``; ``.o`` when a cross
    target has no linker here) under ``out_dir``; returns their paths. A host library is copied
    from its entry in ``cache`` (compiled into it on a miss): a repeated `ssmc compile` then
    generates no TIR and imports no TVM."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{plan.family.name}_{plan.algorithm.value}_cpu"
    text_path, lib_path = out / f"{stem}.tir.py", out / f"{stem}.so"
    backward_text = None if backward_refusal(plan) is not None else (
        lambda: lower_backward(plan, config))
    if _build.runs_here(_build.parse_target(_target_spec(config))):
        pkey = _plan_key(plan, config)
        entry = _build.cached_entry(pkey, cache)    # found without importing TVM
        if entry is None:
            library, _ = _build.library(pkey, lambda: lower(plan, config), _target(config),
                                        cache, _about(plan, config),
                                        {BACKWARD_TEXT: backward_text} if backward_text else None)
            entry = library.parent
        shutil.copyfile(entry / "kernel.tir.py", text_path)
        shutil.copyfile(entry / "kernel.so", lib_path)
        written = [str(text_path), str(lib_path)]
        if backward_text is not None and (entry / BACKWARD_TEXT).exists():
            backward_text = (entry / BACKWARD_TEXT).read_text
    else:
        source = lower(plan, config)
        text_path.write_text(source)
        written = [str(text_path), str(_build.export_cross(source, _target(config), lib_path))]
    if backward_text is not None:
        # the backward kernel's TVMScript, to read: it is compiled where it runs, on the first
        # backward
        path = out / f"{stem}_backward.tir.py"
        path.write_text(backward_text())
        written.append(str(path))
    return written


BACKWARD_TEXT = "backward.tir.py"   # a cache entry's copy of the backward's TVMScript


__all__ = ["NAME", "supports", "default_config", "check_config", "candidates", "lower", "build",
           "write_artifact", "CpuKernel"]
