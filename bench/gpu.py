"""GPU benchmark: our generated kernels against mamba_ssm and fla, with the floor (H100).

Prints ONE table (and writes it as markdown): per standard shape, our time, mamba_ssm's, fla's
``chunk_simple_gla`` where it applies, the floor = max(bytes / copy bandwidth, flops / bf16
matmul rate) with both ceilings measured in this run, our % of the floor, and the relative error
of our output against a float64 recurrence on the same input (mamba_ssm's too, for comparison).

    python bench/gpu.py                 # the table (SSD rows here, scan/step rows from gpu_scan)
    python bench/gpu.py --sweep 8       # also time the first 8 tuning candidates per SSD shape
    python bench/gpu.py --ssd-only --configs '[{}, {"out_heads": 2}]'   # chosen SSD configs
    python bench/gpu.py --no-cuda-scan  # skip the JIT build of mamba_ssm's CUDA selective scan

Anchors are loaded by bench/anchors.py. The scan and decode-step rows come from
``bench/gpu_scan.py`` (``rows(ceilings) -> list of row dicts``, same keys as ``ssd_row``).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))   # families.py: the IR builders the tests use

import anchors  # noqa: E402
import families  # noqa: E402
from measure import copy_bandwidth, kernel_breakdown, ms, rel_err, time_anchor  # noqa: E402
from measure import build as _build  # noqa: E402
from ssmc.backends import triton as _tb  # noqa: E402
from ssmc.ir import SSMFamily  # noqa: E402
from ssmc.plan import make_plan  # noqa: E402
from ssmc.printers import print_expr  # noqa: E402
from ssmc.signature import bind, example_inputs  # noqa: E402

SSD_SHAPES = [  # (label, batch, seqlen, heads); p64 n128 g1 chunk 256, D, z, softplus
    ("SSD fwd b4 l4096 h80 p64 n128 g1 c256", 4, 4096, 80),
    ("SSD fwd b1 l16384 h80 p64 n128 g1 c256", 1, 16384, 80),
    ("SSD fwd b8 l2048 h32 p64 n128 g1 c256", 8, 2048, 32),
]


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = ms(lambda: a @ b)
    return {"bandwidth": copy_bandwidth(), "matmul": 2 * 8192 ** 3 / (t_mm * 1e-3)}


def mamba2_family(heads, head_dim=64, state=128, groups=1, chunk=256) -> SSMFamily:
    """The benchmarked Mamba-2: D per head, silu(z) gate, softplus(dt + bias), exp-Euler."""
    return families.mamba2(heads=heads, head_dim=head_dim, state=state, groups=groups,
                           chunk=chunk)


def reference_f64(plan, problem) -> torch.Tensor:
    """y in float64 from the recurrence, on the GPU; Abar/Bbar printed from the plan (torch)."""
    fam = plan.family
    assert plan.disc.bbar_prev == 0
    x, B, C = (t.double() for t in (problem.x, problem.B, problem.C))
    delta = problem.dt.double()
    if problem.dt_bias is not None:
        delta = delta + problem.dt_bias.double()
    if fam.delta.softplus:
        delta = torch.nn.functional.softplus(delta)
    if fam.delta.clamp is not None:
        delta = delta.clamp(*fam.delta.clamp)
    names = {"dt": "delta", "a": "a"}
    env = {"torch": torch, "delta": delta, "a": problem.A.double()}
    abar = eval(print_expr(plan.disc.abar, "torch", names), env)  # noqa: S307 - our own printer
    bbar = eval(print_expr(plan.disc.bbar, "torch", names), env)  # noqa: S307
    abar = abar.expand_as(delta) if torch.is_tensor(abar) else torch.full_like(delta, abar)
    bbar = bbar.expand_as(delta) if torch.is_tensor(bbar) else torch.full_like(delta, bbar)
    batch, seqlen, h, p = x.shape
    group = torch.arange(h, device=x.device) // (h // B.shape[2])
    state = torch.zeros(batch, h, p, B.shape[-1], dtype=torch.float64, device=x.device)
    y = torch.empty_like(x)
    for t in range(seqlen):
        Bt, Ct = B[:, t, group], C[:, t, group]                         # (b, h, n)
        state.mul_(abar[:, t, :, None, None])
        state.add_((bbar[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :])
        y[:, t] = torch.einsum("bhpn,bhn->bhp", state, Ct)
    if problem.D is not None:
        D = problem.D.double()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if problem.z is not None:
        z = problem.z.double()
        y = y * z * torch.sigmoid(z)
    return y


def ssd_floor(batch, seqlen, heads, p, n, g, chunk, ceil) -> float:
    """Seconds: bytes (x, z, y, B, C, dt once in bf16) vs chunked flops (causal halves)."""
    nbytes = 2 * (3 * batch * seqlen * heads * p + 2 * batch * seqlen * g * n + batch * seqlen * heads)
    chunks = batch * math.ceil(seqlen / chunk)
    flops = chunks * (g * chunk * chunk * n + heads * (chunk * chunk * p + 4 * chunk * n * p))
    return max(nbytes / ceil["bandwidth"], flops / ceil["matmul"])


def ssd_row(label, batch, seqlen, heads, ceil, config=None, sweep=(), seed=0, with_fla=True) -> dict:
    from ssmc.backends.triton import chunked
    fam = mamba2_family(heads)
    plan = make_plan(fam)
    kw = example_inputs(fam, batch=batch, seqlen=seqlen, dtype="bfloat16", device=DEVICE, seed=seed)
    problem = bind(fam, fam.convention, (), kw)
    kernel = _build(_tb, plan, config)
    y, _ = kernel(problem)
    ref = reference_f64(plan, problem)
    row = {"kernel": label, "ours_ms": ms(lambda: kernel(problem)), "rel_err": rel_err(y, ref)}
    row["breakdown"] = {k.split("_chunk_")[-1]: round(v, 4)
                        for k, v in kernel_breakdown(lambda: kernel(problem)).items() if "_chunk_" in k}
    d = fam.dims
    row["floor_ms"] = 1e3 * ssd_floor(batch, seqlen, heads, d.head_dim, d.state, d.groups,
                                      plan.chunk_size, ceil)
    mamba, why = anchors.mamba_ssd_anchor()
    run_mamba = None if mamba is None else (
        lambda: mamba(problem.x, problem.dt, problem.A, problem.B, problem.C,
                      chunk_size=plan.chunk_size, D=problem.D, z=problem.z,
                      dt_bias=problem.dt_bias, dt_softplus=True))
    time_anchor(row, run_mamba, lambda y_mamba: rel_err(y_mamba, ref), why, note_chars=120)
    fla, why = anchors.fla_simple_gla_anchor() if with_fla else (None, "skipped (--no-fla)")
    run_fla = None
    if fla is not None:
        # SSD without D/z as gated linear attention: q = C, k = B, v = Delta x, g = Delta A.
        delta = torch.nn.functional.softplus(problem.dt.float() + problem.dt_bias)
        group = torch.arange(heads, device=DEVICE) // (heads // problem.B.shape[2])
        q = problem.C[:, :, group].contiguous()
        k = problem.B[:, :, group].contiguous()
        v = (problem.x.float() * delta[..., None]).to(problem.x.dtype)
        g = (delta * problem.A).contiguous()
        run_fla = functools.partial(fla, q, k, v, g=g, scale=1.0)
    # fla computes SSD without D and z: timed only, its error is not comparable
    time_anchor(row, run_fla, None, why, prefix="fla", note_chars=120)
    if sweep:
        row["sweep"] = []
        for cfg in sweep:
            try:
                kern = _build(_tb, plan, cfg)
                yy, _ = kern(problem)
                parts = {k.split("_chunk_")[-1]: round(v, 4) for k, v in
                         kernel_breakdown(lambda: kern(problem)).items() if "_chunk_" in k}
                row["sweep"].append((cfg, ms(lambda: kern(problem), rep=100), rel_err(yy, ref), parts))
            except Exception as e:  # noqa: BLE001
                row["sweep"].append((cfg, float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"  sweep {row['sweep'][-1]}", flush=True)
    return row


def scan_rows(ceil, args_no_cuda_scan=False) -> list:
    try:
        import gpu_scan
    except Exception as e:  # noqa: BLE001
        return [{"kernel": "selective scan / decode step", "note": f"bench/gpu_scan.py: {type(e).__name__}: {e}"}]
    try:
        return list(gpu_scan.rows(ceil, cuda_scan=None if args_no_cuda_scan else True))
    except Exception as e:  # noqa: BLE001
        return [{"kernel": "selective scan / decode step", "note": f"gpu_scan.rows failed: {type(e).__name__}: {e}"}]


def _fmt(v, spec="{:.3f}"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def table(rows, ceil, device) -> str:
    head = ("| kernel, shape | ours ms | mamba_ssm ms | fla ms | floor ms | % of floor | "
            "rel err (ours) | rel err (mamba_ssm) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ours, floor = r.get("ours_ms"), r.get("floor_ms")
        pct = 100.0 * floor / ours if ours and floor else None
        lines.append("| " + " | ".join([
            r["kernel"], _fmt(ours), _fmt(r.get("mamba_ms")), _fmt(r.get("fla_ms")), _fmt(floor),
            _fmt(pct, "{:.0f}%"), _fmt(r.get("rel_err"), "{:.1e}"), _fmt(r.get("mamba_err"), "{:.1e}"),
        ]) + " |")
    notes = [f"- {r['kernel']}: {k}: {r[k]}" for r in rows for k in r
             if k.endswith("note") or k == "breakdown"]
    meta = (f"{device}; copy {ceil['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul "
            f"{ceil['matmul'] / 1e12:.0f} TFLOP/s (measured in this run); torch {torch.__version__}, "
            f"triton {triton.__version__}; medians of triton.testing.do_bench; bf16 inputs.")
    return "\n".join(lines + ["", meta] + notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=int, default=0, metavar="N",
                    help="also time the first N tuning candidates of the SSD kernels")
    ap.add_argument("--no-cuda-scan", action="store_true", help="skip the CUDA selective scan anchor")
    ap.add_argument("--ssd-only", action="store_true", help="skip the scan/step rows")
    ap.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning takes minutes)")
    ap.add_argument("--no-train", action="store_true", help="skip the fwd+bwd rows (gpu_train.py)")
    ap.add_argument("--configs", type=json.loads, default=None,
                    help="time these SSD configs (a JSON list) instead of the first N candidates")
    ap.add_argument("--markdown", default=None, help="write the table here (default: $OUT or bench/)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    t0 = time.time()
    if not args.no_cuda_scan and not args.ssd_only:
        if anchors.build_selective_scan() is None:
            print(f"[anchors] CUDA selective scan unavailable: {anchors._state['reason']}", flush=True)
    ceil = measure_ceilings()
    print(f"ceilings: {ceil['bandwidth'] / 1e12:.2f} TB/s, {ceil['matmul'] / 1e12:.0f} TFLOP/s", flush=True)
    from ssmc.backends.triton import chunked
    sweeps = {h: (args.configs if args.configs is not None else
                  chunked.candidates_chunked(make_plan(mamba2_family(h)))[:args.sweep])
              for _, _, _, h in SSD_SHAPES}
    if any(sweeps.values()):
        import gpu_scan   # compile every config in parallel processes first (Triton's disk cache)
        gpu_scan.warm([("ssd", (1, 1024, h), cfg) for h in sorted(sweeps) for cfg in sweeps[h]],
                      workers=12)
    rows = []
    for label, b, l, h in SSD_SHAPES:
        sweep = sweeps[h]
        rows.append(ssd_row(label, b, l, h, ceil, sweep=sweep, with_fla=not args.no_fla))
        print({k: v for k, v in rows[-1].items() if k != "sweep"}, flush=True)
        torch.cuda.empty_cache()
    if not args.ssd_only:
        rows.extend(scan_rows(ceil, args.no_cuda_scan))
    train = []
    if not args.no_train:
        import gpu_train
        train = gpu_train.rows(ceil)
    text = table(rows, ceil, device)
    if train:
        text += "\n\n" + gpu_train.table(train)
    stamp = datetime.date.today().isoformat()
    md = f"# GPU benchmark ({stamp}, {device})\n\n{text}\n"
    out = args.markdown or (os.path.join(os.environ["OUT"], "results_gpu.md") if os.environ.get("OUT")
                            else str(ROOT / "bench" / "results_gpu.md"))
    Path(out).write_text(md)
    print(f"\n(total {time.time() - t0:.0f} s; markdown written to {out})\n")
    print(text)


if __name__ == "__main__":
    main()
