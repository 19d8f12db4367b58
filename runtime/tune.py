"""The autotuner: every candidate config is checked against the oracle, then timed.

For one plan, target and shape: the backend lists ``candidates(plan)``; each is built, run at a
small odd shape and compared with the float64 reference (the ``reference`` backend) — a
candidate that errors or disagrees is reported and recorded as failed, and can never become the
best — then timed at the requested shape (GPU: the backend's ``time_kernel``, a median of device
timings; CPU: wall clock median after warm-up). Each result is written to the tuning database at once, so an
interrupted run resumes: already recorded candidates are skipped unless ``retune``.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ssmc.errors import TargetError
from ssmc.ir import Algorithm, Convention

from . import tuning_db

# Relative error allowed against the float64 oracle, by input dtype (as the test suite's TOL).
CHECK_TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}
_FINAL_FLAG = {Convention.SSD: "return_final_states", Convention.SELECTIVE_SCAN: "return_last_state"}


@dataclass
class CandidateResult:
    config: dict
    status: str                 # ok | wrong | error | cached (recorded by an earlier run)
    ms: Optional[float] = None
    detail: str = ""


@dataclass
class TuneResult:
    family: str
    algorithm: str
    target: str
    device: str
    shape: Dict[str, int]
    key: str
    best: Optional[dict]
    best_ms: Optional[float]
    results: List[CandidateResult] = field(default_factory=list)

    @property
    def failures(self) -> List[CandidateResult]:
        return [r for r in self.results if r.status in ("wrong", "error")]


# --------------------------------------------------------------------------------------------
# Checking against the oracle

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().to(torch.complex128 if out.is_complex() else torch.float64)
    ref = ref.detach().cpu().to(out.dtype)
    if out.shape != ref.shape:
        return math.inf
    if not torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all():
        return math.nan
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _clone(inputs: dict, device) -> dict:
    return {k: v.detach().clone().to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def _outputs(kernel, inputs: dict, convention: Convention) -> List[torch.Tensor]:
    """The tensors a call produces: y and the final state (the updated state for a step)."""
    if convention is Convention.STATE_UPDATE:
        y = kernel(**inputs)
        return [y, inputs["state"]]
    out = kernel(**inputs, **{_FINAL_FLAG[convention]: True})
    return list(out)


def check_shape_for(plan) -> Dict[str, int]:
    """A small, odd shape: not a multiple of the chunk, so partial chunks are exercised."""
    if plan.algorithm is Algorithm.STEP:
        return {"b": 3}
    chunk = plan.chunk_size or 16
    return {"b": 2, "l": 2 * chunk + 3 if plan.algorithm is Algorithm.CHUNKED else 37}


class Oracle:
    """Expected outputs of the float64 reference at the check shape, for each dtype."""

    def __init__(self, plan, convention: Convention, shape: Dict[str, int], seed: int = 0):
        from ssmc import backends, signature
        reference = backends.get("reference")
        self.plan, self.convention, self.shape, self.seed = plan, convention, shape, seed
        self._signature = signature
        self._reference = reference.build(plan, backends.resolve_config(reference, plan))
        self._cache: Dict[str, tuple] = {}

    def inputs(self, dtype: str) -> dict:
        return self._signature.example_inputs(self.plan.family, self.convention,
                                              self.shape["b"], self.shape.get("l", 1),
                                              dtype=dtype, device="cpu", seed=self.seed)

    def expected(self, dtype: str):
        if dtype not in self._cache:
            from ssmc.api import CompiledKernel, parse_target
            inputs = self.inputs(dtype)
            ref = CompiledKernel(self.plan, parse_target("reference"), {}, self._reference)
            self._cache[dtype] = (inputs, _outputs(ref, _clone(inputs, "cpu"), self.convention))
        return self._cache[dtype]

    def check(self, kernel, dtype: str, device, tol: float) -> Optional[str]:
        """None when the kernel agrees with the oracle, else what was wrong."""
        inputs, expected = self.expected(dtype)
        got = _outputs(kernel, _clone(inputs, device), self.convention)
        names = ["y", "state"]
        for name, out, ref in zip(names, got, expected):
            err = rel_err(out, ref)
            if not err <= tol:   # NaN fails too
                shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
                return f"{name}: relative error {err:.2e} > {tol:.0e} ({dtype}, {shape})"
        return None


# --------------------------------------------------------------------------------------------
# Timing

def time_cpu(fn: Callable[[], object], warmup: int = 2, min_repeats: int = 5,
             max_repeats: int = 50, min_seconds: float = 0.2) -> float:
    """Median wall-clock milliseconds after warm-up."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats
                                       and time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Progress

class Progress:
    """Candidates done, failures and the best time so far, on one line of stderr."""

    def __init__(self, title: str, total: int, stream=None, enabled: bool = True):
        self.title, self.total = title, total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.failed = 0
        self.best: Optional[float] = None

    def update(self, result: CandidateResult):
        self.done += 1
        self.failed += result.status in ("wrong", "error")
        if result.status in ("ok", "cached") and result.ms is not None:
            self.best = result.ms if self.best is None else min(self.best, result.ms)
        if not self.enabled:
            return
        width = 20
        filled = int(width * self.done / max(1, self.total))
        best = f"{self.best:.3f} ms" if self.best is not None else "-"
        line = (f"{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"done, {self.failed} failed, best {best}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
        else:
            note = f"  {result.status}" + (f" {result.ms:.3f} ms" if result.ms is not None else "")
            detail = f" ({result.detail})" if result.detail else ""
            self.stream.write(f"{line}  | {result.config}{note}{detail}\n")
        self.stream.flush()

    def report_failure(self, result: CandidateResult):
        if self.enabled and self.tty:
            self.stream.write(f"\r  rejected {result.config}: {result.status}: {result.detail}\n")


# --------------------------------------------------------------------------------------------
# The tuner

def tune(spec_or_family, target: str = "cuda", shape: Optional[Dict[str, int]] = None, *,
         family: Optional[str] = None, algorithm=None, dtype: Optional[str] = None,
         backend=None, root: Optional[os.PathLike] = None, retune: bool = False,
         tolerance: Optional[Dict[str, float]] = None, progress: bool = True, stream=None,
         timer: Optional[Callable[[Callable], float]] = None, seed: int = 0) -> TuneResult:
    """Tune one family for ``target`` at ``shape`` ({'b': 4, 'l': 4096}); see the module doc.

    ``backend`` replaces the target's backend module (tests inject candidates this way);
    ``root`` is the cache directory holding the database (default: $SSMC_CACHE_DIR).
    """
    from ssmc.api import _family, artifact_cache, backend_module, parse_target
    from ssmc.plan import convention_of, ir_hash, make_plan
    from ssmc import backends, signature

    fam = _family(spec_or_family, family)
    tgt = parse_target(target)
    if not tgt.runs_here:
        raise TargetError(f"target {tgt.name} cross-compiles; its kernels cannot be timed here")
    tgt.require_device()
    backend = backend or backend_module(tgt)
    if isinstance(algorithm, str):
        algorithm = Algorithm(algorithm)
    plan = make_plan(fam, algorithm)
    # Support is decided once, here (a TargetError says why not); each candidate is then
    # resolved as a user config would be: the defaults it overrides, checked by the backend.
    backends.resolve_config(backend, plan)
    convention = convention_of(plan)
    device = tgt.device
    gpu = device == "cuda"
    dtype = dtype or ("bfloat16" if gpu else "float32")
    shape = dict(shape or (tuning_db.DEFAULT_STEP_SHAPE if plan.algorithm is Algorithm.STEP
                           else tuning_db.DEFAULT_SHAPE))
    if plan.algorithm is Algorithm.STEP:
        shape.pop("l", None)
    tol = dict(CHECK_TOL, **(tolerance or {}))
    # A device's own timer when the backend has one (a GPU's events), else the CPU's clock.
    timer = timer or (getattr(backend, "time_kernel", time_cpu) if gpu else time_cpu)

    device_label = tuning_db.device_name(tgt.backend)
    key = tuning_db.entry_key(device_label, tgt.name, ir_hash(plan), shape)
    db = tuning_db.TuningDB(root)
    header = {"family": fam.name, "algorithm": plan.algorithm.value, "target": tgt.name,
              "device": device_label, "shape": shape, "dtype": dtype}
    recorded = {} if retune else dict((db.entry(key) or {}).get("candidates", {}))

    candidates, seen = [], set()
    for cand in list(backend.candidates(plan)) or [dict(backend.default_config(plan))]:
        if tuning_db.config_key(cand) not in seen:
            seen.add(tuning_db.config_key(cand))
            candidates.append(dict(cand))

    oracle = Oracle(plan, convention, check_shape_for(plan), seed=seed)
    check_dtypes = ["float32"] + ([dtype] if dtype != "float32" else [])
    title = f"tune {fam.name} [{plan.algorithm.value}] {tgt.name} {tuning_db.bucket(shape)}"
    bar = Progress(title, len(candidates), stream=stream, enabled=progress)
    results: List[CandidateResult] = []
    made: Dict[str, dict] = {}

    def timing_inputs() -> dict:
        # Drawn once, and only when some candidate passed the check (they may be large).
        if "inputs" not in made:
            made["inputs"] = signature.example_inputs(fam, convention, shape["b"],
                                                      shape.get("l", 1), dtype=dtype,
                                                      device=device, seed=seed)
        return made["inputs"]

    for cand in candidates:
        previous = recorded.get(tuning_db.config_key(cand))
        if previous is not None:
            status = "cached" if previous.get("status") == "ok" else previous.get("status", "error")
            result = CandidateResult(cand, status, previous.get("ms"), previous.get("detail", ""))
            results.append(result)
            bar.update(result)
            continue
        try:
            # the backend's own check of a config, as for any user config
            config = backends.resolve_config(backend, plan, cand, tgt.options)
        except ValueError as e:     # ConfigError, or a generator's own check
            result = CandidateResult(cand, "error", None, f"config refused: {e}")
        else:
            result = _run_candidate(backend, plan, tgt, config, cand, oracle, check_dtypes, tol,
                                    device, timer, timing_inputs, artifact_cache())
        db.record(key, header, cand, {"status": result.status, "ms": result.ms,
                                      "detail": result.detail})
        results.append(result)
        if result.status in ("wrong", "error"):
            bar.report_failure(result)
        bar.update(result)

    entry = db.entry(key) or {}
    return TuneResult(fam.name, plan.algorithm.value, tgt.name, device_label, shape, key,
                      entry.get("best"), entry.get("best_ms"), results)


def _run_candidate(backend, plan, tgt, config, cand, oracle, check_dtypes, tol, device, timer,
                   get_inputs, cache) -> CandidateResult:
    from ssmc.api import CompiledKernel
    try:
        kernel = CompiledKernel(plan, tgt, config, backend.build(plan, config, cache))
    except Exception as e:  # a candidate the backend cannot build is a result, not a crash
        return CandidateResult(cand, "error", None, f"build failed: {type(e).__name__}: {e}")
    for dtype in check_dtypes:
        try:
            problem = oracle.check(kernel, dtype, device, tol.get(dtype, 1e-2))
        except Exception as e:
            return CandidateResult(cand, "error", None, f"run failed: {type(e).__name__}: {e}")
        if problem:
            return CandidateResult(cand, "wrong", None, problem)
    call_inputs = dict(get_inputs())
    try:
        ms = timer(lambda: kernel(**call_inputs))
    except Exception as e:
        return CandidateResult(cand, "error", None, f"timing failed: {type(e).__name__}: {e}")
    return CandidateResult(cand, "ok", float(ms))


# --------------------------------------------------------------------------------------------
# Reports

def write_report(result: TuneResult, path: os.PathLike, stream=None) -> Path:
    """A bar chart of time per candidate (PNG, matplotlib); without matplotlib, a CSV next to
    the requested path, and a note saying so."""
    path = Path(path)
    stream = stream or sys.stderr
    labels = [tuning_db.config_key(r.config) for r in result.results]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        csv_path = path.with_suffix(".csv")
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["config", "status", "ms", "detail"])
            for label, r in zip(labels, result.results):
                writer.writerow([label, r.status, "" if r.ms is None else f"{r.ms:.6f}", r.detail])
        stream.write(f"matplotlib is not installed: wrote {csv_path} instead of {path} "
                     "(pip install matplotlib for the plot)\n")
        return csv_path
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    times = [r.ms if r.ms is not None else 0.0 for r in result.results]
    colors = ["tab:green" if r.config == result.best else
              "tab:blue" if r.status in ("ok", "cached") else "tab:red" for r in result.results]
    ax.barh(range(len(labels)), times, color=colors)
    for i, r in enumerate(result.results):
        if r.status in ("wrong", "error"):
            ax.text(0, i, f" {r.status}", va="center", color="tab:red")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms)")
    ax.set_title(f"{result.family} [{result.algorithm}] on {result.device}, "
                 f"{tuning_db.bucket(result.shape)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["tune", "TuneResult", "CandidateResult", "Oracle", "write_report", "time_cpu",
           "CHECK_TOL", "rel_err"]
