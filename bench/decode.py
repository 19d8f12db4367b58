"""Decode as a serving engine runs it: the compiled step called with mamba_ssm's arguments, eager
and inside a CUDA graph, beside mamba_ssm's ``selective_state_update`` in the same run.

    python bench/decode.py              # the rows alone; bench/gpu.py includes them

Mamba-2 decode, h80 p64 n128, fp32 state, bf16 x, D, silu(z), softplus(dt + dt_bias), at batch
1, 64 and 256. The call is the full public path (``ssmc.compile(...).step(state, x, dt, A, ...)``
with dt, A, D, dt_bias as mamba_ssm's stride-0 (h, p) expansions, as Hugging Face and vLLM pass
them), so eager times include validation and launch. Each row: per-call milliseconds (eager:
wall time of 200 back-to-back calls, the host's cost included; graph: one replay of a captured
call), the anchor the same way, the floor (state read + written once at the copy bandwidth
measured in this run), and the host microseconds per eager call (loops of 100 calls without a
synchronize, ours and mamba_ssm's alternating, the least of 7 rounds each). Errors against the float64 step of bench/gpu_scan.py.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

BATCHES = (1, 64, 256)
H, P, N = 80, 64, 128


def per_call(fn, iters=200):
    """(ms per call with the device's work, µs of host time per call) over back-to-back calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return 1e3 * wall / iters, 1e6 * host / iters


def host_costs(fns, rounds=7, iters=100):
    """µs of host time per call of each of ``fns``: the least over rounds that alternate between
    them (the host's speed drifts within a run; alternating gives each the same conditions),
    each round after a synchronize so that no queue of earlier launches is waited on."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best[i] = min(best[i], 1e6 * (time.perf_counter() - t0) / iters)
    torch.cuda.synchronize()
    return best


def graphed(fn, iters=200):
    """ms per replay of ``fn`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def mamba_style(p):
    """mamba_ssm's per-head-dim arguments of the decode step, as stride-0 views."""
    return dict(x=p.x, dt=p.dt[..., None].expand(-1, -1, P), A=p.A[:, None, None].expand(-1, P, N),
                B=p.B, C=p.C, D=p.D[:, None].expand(-1, P), z=p.z,
                dt_bias=p.dt_bias[:, None].expand(-1, P), dt_softplus=True)


def rows(ceil):
    import anchors
    import gpu_scan
    import ssmc
    from measure import rel_err
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    step = ssmc.compile(gpu_scan.ssd_family(), target="cuda", algorithm="step")
    plan = make_plan(step.family, Algorithm.STEP)
    mamba, why = anchors.mamba_state_update_anchor()
    out = []
    for batch in BATCHES:
        fam, p = gpu_scan.step_problem(batch)
        state0 = p.state.clone()
        y_ref, h_ref = gpu_scan.step_reference(plan, p)
        args = mamba_style(p)
        ours_state, anchor_state = state0.clone(), state0.clone()
        y = step(ours_state, **args)
        errs = {"rel_err": rel_err(y, y_ref), "state_err": rel_err(ours_state, h_ref)}
        if mamba is not None:
            errs["mamba_err"] = rel_err(mamba(anchor_state, **args), y_ref)
        floor = gpu_scan.step_floor(batch, ceil)
        for mode in ("eager", "CUDA graph"):
            row = {"kernel": f"decode step b{batch} h{H} p{P} n{N} fp32 state, {mode}",
                   "floor_ms": floor, **errs}
            ours = lambda: step(ours_state, **args)                      # noqa: E731
            theirs = (lambda: mamba(anchor_state, **args)) if mamba else None  # noqa: E731
            if mode == "eager":
                row["ours_ms"], _ = per_call(ours)
                if theirs:
                    row["mamba_ms"], _ = per_call(theirs)
                    host, host_m = host_costs([ours, theirs])
                    row["host_note"] = f"host {host:.0f} µs per call (ours), {host_m:.0f} µs (mamba_ssm)"
                else:
                    row["host_note"] = f"host {host_costs([ours])[0]:.0f} µs per call (ours)"
            else:
                row["ours_ms"] = graphed(ours)
                if theirs:
                    row["mamba_ms"] = graphed(theirs)
            if not mamba:
                row["mamba_note"] = why
            out.append(row)
            print({k: v for k, v in row.items()}, flush=True)
        torch.cuda.empty_cache()
    return out


def main():
    import gpu_scan
    ceil = gpu_scan.measure_ceilings()
    for row in rows(ceil):
        ours, theirs, floor = row["ours_ms"], row.get("mamba_ms"), row["floor_ms"]
        print(f"| {row['kernel']} | {ours * 1e3:.1f} µs | "
              f"{theirs * 1e3 if theirs else float('nan'):.1f} µs | {floor * 1e3:.1f} µs | "
              f"{100 * floor / ours:.0f}% | {row['rel_err']:.1e} | {row.get('host_note', '')} |")


if __name__ == "__main__":
    main()
