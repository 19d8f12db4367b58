"""Timing and error helpers shared by the GPU benchmarks (bench/gpu.py, bench/gpu_scan.py)."""
from __future__ import annotations

import torch
import triton.testing


def ms(fn, rep=200) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def copy_bandwidth(device="cuda") -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy, measured now."""
    nbytes = 1 << 30
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (ms(lambda: dst.copy_(src)) * 1e-3)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN when ``out`` has a NaN or inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def kernel_breakdown(fn, iters=10) -> dict:
    """Device time per kernel name (ms per call), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key:
            out[ev.key] = out.get(ev.key, 0.0) + t / 1e3 / iters
    return out


def time_anchor(row: dict, run, error_of, why: str = "", prefix: str = "mamba",
                note_chars: int = 160):
    """Time an anchor into ``row``: ``{prefix}_err`` (``error_of(run())``, unless ``error_of`` is
    None) and ``{prefix}_ms``, or ``{prefix}_note`` saying why not (``run`` is None: unavailable
    for ``why``; or it raised), so a missing anchor is an explained empty cell, not a failed
    benchmark."""
    if run is None:
        row[f"{prefix}_note"] = why
        return
    try:
        if error_of is not None:
            row[f"{prefix}_err"] = error_of(run())
        row[f"{prefix}_ms"] = ms(run)
    except Exception as e:  # noqa: BLE001
        row[f"{prefix}_note"] = f"{type(e).__name__}: {str(e)[:note_chars]}"


def build(backend, plan, config=None):
    """A backend kernel as ``ssmc.compile`` builds it: the config resolved once (defaults, then
    ``config``; support checked), the artifact cache passed in."""
    from ssmc import backends
    from ssmc.runtime.cache import default_cache
    return backend.build(plan, backends.resolve_config(backend, plan, config), default_cache())


def resolved(backend, plan, config=None) -> dict:
    """The config ``build`` runs with (for the table)."""
    from ssmc import backends
    return backends.resolve_config(backend, plan, config)
