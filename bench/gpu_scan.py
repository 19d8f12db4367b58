"""GPU benchmark of the generated selective scan and decode step (H100), with anchors and floors.

    python bench/gpu_scan.py            # the rows below, anchors when importable
    python bench/gpu_scan.py --sweep    # also time tuning candidates (compiled in parallel first)
    python bench/gpu_scan.py --no-cuda-scan   # skip mamba_ssm's CUDA selective scan (JIT build)
    python bench/gpu_scan.py --sweep --scan-only --no-cuda-scan   # the scan configs only

Rows: selective scan b8 d4096 l2048 n16 and b1 d4096 l16384 n16 (bf16, softplus(dt + bias),
D, silu(z)); decode step h80 p64 n128 with fp32 state at batch 64 and 256. Each row: our median
time (triton.testing.do_bench), the anchor (mamba_ssm ``selective_scan_fn`` CUDA /
``selective_state_update`` Triton), the floor = max(bytes / measured copy bandwidth, exps /
measured MUFU exp2 rate), % of floor, and the relative error against a float64 recurrence on the
GPU (Abar, Bbar printed from the plan in the torch dialect). ``rows(ceil)`` is what bench/gpu.py
calls; ``main`` prints the table and writes JSON + markdown under $OUT (or bench/).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from measure import copy_bandwidth, kernel_breakdown, ms, rel_err, time_anchor  # noqa: E402
from measure import build as _build, resolved as _resolved  # noqa: E402
from ssmc.backends import triton as _tb  # noqa: E402

DEVICE = "cuda"
SCAN_SHAPES = [("selective scan fwd b8 d4096 l2048 n16", 8, 2048),
               ("selective scan fwd b1 d4096 l16384 n16", 1, 16384)]
STEP_BATCHES = (64, 256)
SCAN_SWEEP = {
    # b8: 256 one-pass programs; 255 registers, 2 blocks per SM (bench/NOTES_scan.md).
    2048: [{}, {"prefetch_bc": 0}, {"prefetch_bc": 4}, {"prefetch_bc": 16},
           {"prefetch": False}, {"block_d": 256, "num_warps": 8}, {"chunk": 16}],
    # b1: 32 one-pass programs, so the segmented scan. {} = automatic segment count.
    16384: [{}, {"segments": 16}, {"segments": 64}, {"seg_prefetch_bc": 8},
            {"seg_prefetch_bc": 0}, {"segments": 32, "seg_block_d": 64, "seg_num_warps": 2}],
}
STEP_SWEEP = [{"block_r": r, "num_warps": w} for r in (8, 16, 32, 64) for w in (4, 8)]


# ---- ceilings -------------------------------------------------------------------------------

@triton.jit
def _exp2_rate_kernel(x_ptr, y_ptr, REPS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i)
    a, b, c, d = x, x + 0.25, x + 0.5, x + 0.75
    for _ in tl.static_range(REPS):  # four independent chains: MUFU-throughput bound
        a = tl.exp2(a * -0.7)
        b = tl.exp2(b * -0.7)
        c = tl.exp2(c * -0.7)
        d = tl.exp2(d * -0.7)
    tl.store(y_ptr + i, a + b + c + d)


def measure_exp_rate() -> float:
    n, reps, block = 1 << 22, 64, 512
    x = torch.rand(n, device=DEVICE)
    y = torch.empty_like(x)
    t = ms(lambda: _exp2_rate_kernel[(n // block,)](x, y, REPS=reps, BLOCK=block, num_warps=4))
    return n * reps * 4 / (t * 1e-3)


def measure_ceilings() -> dict:
    return {"bandwidth": copy_bandwidth(DEVICE), "exp_rate": measure_exp_rate()}


# ---- problems and references ----------------------------------------------------------------

def scan_family():
    import families
    return families.mamba1(channels=4096, state=16)


def ssd_family(heads=80):
    import families
    return families.mamba2(heads=heads, head_dim=64, state=128, groups=1)


def scan_problem(batch, seqlen, seed=0):
    from ssmc.signature import bind, example_inputs
    fam = scan_family()
    kw = example_inputs(fam, None, batch, seqlen, dtype="bfloat16", device=DEVICE, seed=seed)
    return fam, bind(fam, fam.convention, (), kw)


def step_problem(batch, seed=0):
    from ssmc.ir import Convention
    from ssmc.signature import bind, example_inputs
    fam = ssd_family()
    kw = example_inputs(fam, Convention.STATE_UPDATE, batch, 1, dtype="bfloat16",
                        device=DEVICE, seed=seed)
    return fam, bind(fam, Convention.STATE_UPDATE, (), kw)


def _coefficient_fns(plan):
    from ssmc.printers import print_expr
    names = {"dt": "dt", "a": "a"}
    src = {k: print_expr(getattr(plan.disc, k), "torch", names) for k in ("abar", "bbar")}
    return {k: eval(f"lambda dt, a: {v}", {"torch": torch}) for k, v in src.items()}


def scan_reference(plan, p, channels=slice(None)):
    """y (float64, GPU) by the recurrence, for a channel slice; Abar/Bbar printed from the plan."""
    fam = plan.family
    fn = _coefficient_fns(plan)
    u = p.u[:, channels].double()
    dt = p.delta[:, channels].double()
    if fam.delta.bias:
        dt = dt + p.delta_bias[channels].double()[:, None]
    if fam.delta.softplus:
        dt = torch.nn.functional.softplus(dt)
    a = p.A[channels].double()
    B, C = p.B[:, 0].double(), p.C[:, 0].double()          # (b, n, l), one group
    h = torch.zeros(u.shape[0], u.shape[1], a.shape[-1], device=DEVICE, dtype=torch.float64)
    y = torch.empty_like(u)
    for t in range(u.shape[-1]):
        d_t = dt[..., t, None]
        h = fn["abar"](d_t, a) * h + fn["bbar"](d_t, a) * B[:, None, :, t] * u[..., t, None]
        y[..., t] = (h * C[:, None, :, t]).sum(-1)
    y = y + p.D[channels].double()[:, None] * u
    z = p.z[:, channels].double()
    return y * z * torch.sigmoid(z)


def step_reference(plan, p):
    """(y, new state) in float64 for the scalar-A decode step."""
    fn = _coefficient_fns(plan)
    dt = torch.nn.functional.softplus(p.dt.double() + p.dt_bias.double())       # (b, h)
    a = p.A.double()                                                             # (h,)
    g = p.B.shape[1]
    heads = p.x.shape[1]
    grp = torch.arange(heads, device=DEVICE) // (heads // g)
    B, C = p.B.double()[:, grp], p.C.double()[:, grp]                            # (b, h, n)
    x = p.x.double()
    abar, bbar = fn["abar"](dt, a), fn["bbar"](dt, a)
    h = abar[..., None, None] * p.state.double() + (bbar[..., None] * x)[..., None] * B[:, :, None]
    y = (h * C[:, :, None]).sum(-1) + p.D.double()[:, None] * x
    z = p.z.double()
    return y * z * torch.sigmoid(z), h


# ---- floors ---------------------------------------------------------------------------------

def scan_floor(batch, seqlen, ceil, d=4096, n=16) -> float:
    elems = batch * d * seqlen
    nbytes = 2 * elems * 4 + 2 * batch * n * seqlen * 2    # u, delta, z, out bf16; B, C
    exps = elems * n
    return 1e3 * max(nbytes / ceil["bandwidth"], exps / ceil["exp_rate"])


def step_floor(batch, ceil, h=80, p=64, n=128) -> float:
    nbytes = 2 * batch * h * p * n * 4 + 3 * batch * h * p * 2 + 2 * batch * n * 2
    return 1e3 * nbytes / ceil["bandwidth"]


# ---- rows -----------------------------------------------------------------------------------

def _compile_one(args):
    """Warm Triton's disk cache for one (kind, shape, config) in a worker process."""
    kind, shape, config = args
    try:
        from ssmc.backends import triton as tb
        from ssmc.ir import Algorithm
        from ssmc.plan import make_plan
        if kind == "scan":
            fam, p = scan_problem(*shape)
            kern = _build(tb, make_plan(fam, Algorithm.SCAN), config)
        elif kind == "ssd":   # (batch, seqlen, heads); a short seqlen compiles the same kernels
            from ssmc.backends.triton import chunked
            from ssmc.signature import bind, example_inputs
            import gpu
            fam = gpu.mamba2_family(shape[2])
            kw = example_inputs(fam, batch=shape[0], seqlen=shape[1], dtype="bfloat16",
                                device=DEVICE)
            p = bind(fam, fam.convention, (), kw)
            kern = _build(_tb, make_plan(fam), config)
        else:
            fam, p = step_problem(shape[0])
            kern = _build(tb, make_plan(fam, Algorithm.STEP), config)
        kern(p)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{kind} {shape} {config}: {type(e).__name__}: {str(e)[:300]}"


def warm(jobs, workers=8):
    """Compile every (kind, shape, config) in parallel processes before timing."""
    t0 = time.time()
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        errors = [e for e in pool.map(_compile_one, jobs) if e]
    print(f"[warm] {len(jobs)} kernels compiled in {time.time() - t0:.0f} s", flush=True)
    for e in errors:
        print("[warm] failed:", e, flush=True)


def scan_rows(ceil, sweep=False, cuda_scan=None):
    from ssmc.backends import triton as tb
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    import anchors
    out = []
    for label, batch, seqlen in SCAN_SHAPES:
        fam, p = scan_problem(batch, seqlen)
        plan = make_plan(fam, Algorithm.SCAN)
        best_cfg = {}
        row = {"kernel": label, "floor_ms": scan_floor(batch, seqlen, ceil)}
        if sweep:
            row["sweep"] = []
            for cfg in SCAN_SWEEP[seqlen]:
                kern = _build(tb, plan, cfg)
                t = ms(lambda: kern(p), rep=100)
                row["sweep"].append((cfg, round(t, 4)))
                print(f"  {label} {cfg}: {t:.4f} ms  (segments "
                      f"{_segments_used(kern, p)}; err {rel_err(*_err_pair(kern, plan, p, seqlen)):.1e}; "
                      f"{_breakdown_text(lambda: kern(p))})", flush=True)
            best_cfg = min(row["sweep"], key=lambda r: r[1])[0]
        kern = _build(tb, plan, best_cfg)
        y, _ = kern(p)
        channels = slice(None) if seqlen <= 4096 else slice(0, 512)
        ref = scan_reference(plan, p, channels)
        row.update(ours_ms=ms(lambda: kern(p)), rel_err=rel_err(y[:, channels], ref),
                   config=_resolved(tb, plan, best_cfg))
        row["ours_ms_again"] = ms(lambda: kern(p))   # spread between two runs of one version
        if cuda_scan is None:   # bench/gpu.py: use the CUDA anchor only if it built it already
            cuda_scan = anchors._state.get("selective_scan_cuda") is not None
        fn, why = anchors.mamba_selective_scan_anchor() if cuda_scan else (None, "not built")
        run_mamba = None if fn is None else functools.partial(
            fn, p.u, p.delta, p.A, p.B, p.C, D=p.D, z=p.z, delta_bias=p.delta_bias,
            delta_softplus=True)
        time_anchor(row, run_mamba, lambda y_mamba: rel_err(y_mamba[:, channels], ref), why)
        out.append(row)
        print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        torch.cuda.empty_cache()
    return out


def _breakdown_text(fn) -> str:
    """Per-kernel device times of one call, shortest names first (which pass costs what)."""
    parts = sorted(kernel_breakdown(fn).items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k.split('_seg_')[-1][:24]} {v:.3f}" for k, v in parts[:4])


def _segments_used(kern, p) -> int:
    """The segment count the generated launcher picks for this problem (1 = one pass)."""
    mod = kern.module
    return mod._n_segments(p.u.shape[0], p.u.shape[1], p.u.shape[2], mod._sm_count(p.u.device))


_REF_CACHE = {}


def _err_pair(kern, plan, p, seqlen):
    """(our y, float64 reference) on a channel slice, the reference computed once per shape."""
    channels = slice(0, 256) if seqlen <= 4096 else slice(0, 128)
    key = (id(p), seqlen)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = scan_reference(plan, p, channels)
    y, _ = kern(p)
    return y[:, channels], _REF_CACHE[key]


def step_rows(ceil, sweep=False):
    from ssmc.backends import triton as tb
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    import anchors
    out = []
    for batch in STEP_BATCHES:
        fam, p = step_problem(batch)
        plan = make_plan(fam, Algorithm.STEP)
        label = f"decode step b{batch} h80 p64 n128 fp32 state"
        row = {"kernel": label, "floor_ms": step_floor(batch, ceil)}
        state0 = p.state.clone()
        best_cfg = {}
        if sweep:
            row["sweep"] = []
            for cfg in STEP_SWEEP:
                kern = _build(tb, plan, cfg)
                t = ms(lambda: kern(p), rep=100)
                row["sweep"].append((cfg, round(t, 4)))
                print(f"  {label} {cfg}: {t:.4f} ms", flush=True)
            best_cfg = min(row["sweep"], key=lambda r: r[1])[0]
        kern = _build(tb, plan, best_cfg)
        p.state.copy_(state0)
        y_ref, h_ref = step_reference(plan, p)
        y, _ = kern(p)
        row.update(rel_err=rel_err(y, y_ref), state_err=rel_err(p.state, h_ref),
                   config=_resolved(tb, plan, best_cfg))
        row["ours_ms"] = ms(lambda: kern(p))
        row["ours_ms_again"] = ms(lambda: kern(p))
        fn, why = anchors.mamba_state_update_anchor()
        run_mamba = None
        if fn is not None:
            # mamba_ssm's per-head-dim layout of dt, A, D and the bias, as stride-0 views
            pd, n = 64, 128
            dt = p.dt[..., None].expand(-1, -1, pd)
            A = p.A[:, None, None].expand(-1, pd, n)
            D = p.D[:, None].expand(-1, pd)
            bias = p.dt_bias[:, None].expand(-1, pd)
            run_mamba = functools.partial(fn, state0.clone(), p.x, dt, A, p.B, p.C, D=D, z=p.z,
                                          dt_bias=bias, dt_softplus=True)
        time_anchor(row, run_mamba, lambda y_mamba: rel_err(y_mamba, y_ref), why)
        out.append(row)
        print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        torch.cuda.empty_cache()
    return out


def anchor_only():
    """mamba_ssm's CUDA selective scan on the scan shapes, with its error vs the reference."""
    import anchors
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    fn, why = anchors.mamba_selective_scan_anchor()
    if fn is None:
        print("[anchor] unavailable:", why)
        return
    for label, batch, seqlen in SCAN_SHAPES:
        fam, p = scan_problem(batch, seqlen)
        channels = slice(None) if seqlen <= 4096 else slice(0, 512)
        ref = scan_reference(make_plan(fam, Algorithm.SCAN), p, channels)

        def run():
            return fn(p.u, p.delta, p.A, p.B, p.C, D=p.D, z=p.z, delta_bias=p.delta_bias,
                      delta_softplus=True)
        print(f"[anchor] {label}: mamba_ssm CUDA {ms(run):.4f} ms, rel err "
              f"{rel_err(run()[:, channels], ref):.1e}", flush=True)


def rows(ceil, sweep=False, cuda_scan=None):
    """The scan and step rows for bench/gpu.py's table (keys as its ``ssd_row``).

    ``cuda_scan``: time mamba_ssm's CUDA selective scan (True: JIT-build it if needed;
    None: only if already built)."""
    if "exp_rate" not in ceil:
        ceil = dict(ceil, exp_rate=measure_exp_rate())
    import decode
    # The decode rows are the public call, eager and in a CUDA graph (bench/decode.py); the
    # kernel-only step rows are for --sweep, which tunes the kernel's config.
    return (scan_rows(ceil, sweep, cuda_scan)
            + (step_rows(ceil, sweep) if sweep else decode.rows(ceil)))


def table(rs, ceil) -> str:
    def f(v, spec="{:.3f}"):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)
    lines = ["| kernel, shape | ours ms | mamba_ssm ms | floor ms | % of floor | rel err | "
             "rel err mamba |", "|---|---|---|---|---|---|---|"]
    for r in rs:
        pct = 100 * r["floor_ms"] / r["ours_ms"] if r.get("ours_ms") else None
        lines.append(f"| {r['kernel']} | {f(r.get('ours_ms'))} | {f(r.get('mamba_ms'))} | "
                     f"{f(r['floor_ms'])} | {f(pct, '{:.0f}%')} | {f(r.get('rel_err'), '{:.1e}')} | "
                     f"{f(r.get('mamba_err'), '{:.1e}')} |")
    lines.append(f"\n{torch.cuda.get_device_name()}; copy {ceil['bandwidth'] / 1e12:.2f} TB/s, "
                 f"exp2 {ceil['exp_rate'] / 1e12:.2f} T/s (measured in this run); torch "
                 f"{torch.__version__}, triton {triton.__version__}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-cuda-scan", action="store_true")
    ap.add_argument("--scan-only", action="store_true", help="skip the decode-step rows")
    ap.add_argument("--configs", type=json.loads, default=None,
                    help='replace the scan sweep: JSON {"2048": [cfg, ...], "16384": [...]}')
    ap.add_argument("--anchor-only", action="store_true",
                    help="time only mamba_ssm's CUDA selective scan (after its JIT build)")
    args = ap.parse_args(argv)
    if args.anchor_only:
        return anchor_only()
    if args.configs is not None:
        SCAN_SWEEP.clear()
        SCAN_SWEEP.update({int(k): v for k, v in args.configs.items()})
        SCAN_SHAPES[:] = [s for s in SCAN_SHAPES if s[2] in SCAN_SWEEP]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"triton {triton.__version__}", flush=True)
    jobs = [("scan", (b, l), {}) for _, b, l in SCAN_SHAPES] + [("step", (b,), {}) for b in STEP_BATCHES]
    if args.sweep:
        jobs = ([("scan", (b, l), c) for _, b, l in SCAN_SHAPES for c in SCAN_SWEEP[l]] +
                [("step", (b,), c) for b in STEP_BATCHES for c in STEP_SWEEP])
    if args.scan_only:
        jobs = [j for j in jobs if j[0] == "scan"]
    warm(jobs)
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['bandwidth'] / 1e12:.2f} TB/s, exp2 "
          f"{ceil['exp_rate'] / 1e12:.2f} T/s", flush=True)
    if args.scan_only:
        rs = scan_rows(ceil, args.sweep, not args.no_cuda_scan)
    else:
        rs = rows(ceil, args.sweep, not args.no_cuda_scan)
    text = table(rs, ceil)
    out_dir = Path(os.environ.get("OUT", ROOT / "bench"))
    (out_dir / "gpu_scan.json").write_text(json.dumps({"ceilings": ceil, "rows": rs}, indent=1,
                                                       default=str))
    (out_dir / "gpu_scan.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
