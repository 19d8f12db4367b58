"""CPU benchmark: the ssmc cpu target vs torch on this machine, in one run (the team's design notes).

    python bench/cpu.py [--repeats 7] [--out bench/results_cpu.md] [--only mamba1,mamba2,decode,train]

Rows: Mamba-1 selective scan (b1 d1536 l2048 n16, b1 d4096 l1024 n16; softplus, D, z),
Mamba-2 SSD (b1 l2048 h24 p64 n128; softplus, D, z) and the decode step (one token, b1:
Mamba-1 d4096 n16, Mamba-2 h24 p64 n128), fp32. Columns: median ms at 1 and 2 threads for
ours, the torch eager loop (a per-timestep loop in the style of mamba_ssm's
selective_scan_ref) and the best vectorized torch formulation written here (chunked
cumulative-sum / matmul forms), ratios, GB/s, the relative error of each vs float64, and
llama.cpp's ggml_ssm_scan as measured elsewhere on this machine type (the team's design notes).
``train``: the fwd+bwd rows of bench/cpu_train.py (Mamba-1 and Mamba-2 against torch autograd
through the vectorized forms and the per-step loop), at 2 threads.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from families import mamba1, mamba2  # noqa: E402

from ssmc import signature  # noqa: E402
from ssmc.backends import cpu, reference  # noqa: E402
from ssmc.backends.cpu import tvmbuild  # noqa: E402
from ssmc.ir import Algorithm, Convention  # noqa: E402
from ssmc.plan import make_plan  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))
from measure import build as _build  # noqa: E402

# llama.cpp ggml_ssm_scan, fp32, median ms at 1 / 2 threads (from the team's design notes: measured
# 2026-11-23 on the 2-core development machine type, not in this run).
GGML = {"mamba1_d1536": (182.0, 91.0), "mamba1_d4096": (238.0, 120.0),
        "decode_mamba1": (0.27, 0.12), "mamba2": (35.4, 26.9), "decode_mamba2": (0.023, 0.015)}


# --------------------------------------------------------------------------------------------
# torch formulations (written from the math; fp32)

def m1_eager(u, delta, A, B, C, D, z, delta_bias):
    """Per-timestep loop (as mamba_ssm's selective_scan_ref, but computing exp(ΔA) per step
    from time-major copies: precomputing the (b, d, l, n) tensors is slower on this machine,
    page faults on 200 MB per call)."""
    dt = F.softplus(delta + delta_bias[:, None])
    dt_t = dt.transpose(1, 2).contiguous()
    dtu_t = (dt * u).transpose(1, 2).contiguous()
    B_t, C_t = B[:, 0].transpose(1, 2).contiguous(), C[:, 0].transpose(1, 2).contiguous()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[-1]):
        h = torch.exp(dt_t[:, i, :, None] * A) * h + dtu_t[:, i, :, None] * B_t[:, i, None, :]
        ys.append(torch.bmm(h, C_t[:, i, :, None])[..., 0])
    y = torch.stack(ys, -1) + D[:, None] * u
    return y * F.silu(z)


_COMPILED = {}


def _m1_chunk_steps(h, dt_c, dtu_c, A, B_c, C_c):
    ys = []
    for i in range(dt_c.shape[-1]):
        h = torch.exp(dt_c[:, :, i, None] * A) * h + dtu_c[:, :, i, None] * B_c[:, None, :, i]
        ys.append((h * C_c[:, None, :, i]).sum(-1))
    return h, torch.stack(ys, -1)


def m1_compiled(u, delta, A, B, C, D, z, delta_bias, T=16):
    """torch.compile (inductor, C++ on the CPU) of T recurrence steps, called l/T times."""
    step = _COMPILED.get(T)
    if step is None:
        step = _COMPILED[T] = torch.compile(_m1_chunk_steps, dynamic=False)
    dt = F.softplus(delta + delta_bias[:, None])
    dtu = dt * u
    L = u.shape[-1]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for c0 in range(0, L - L % T, T):
        h, y = step(h, dt[:, :, c0:c0 + T], dtu[:, :, c0:c0 + T], A, B[:, 0, :, c0:c0 + T],
                    C[:, 0, :, c0:c0 + T])
        ys.append(y)
    if L % T:
        h, y = _m1_chunk_steps(h, dt[:, :, L - L % T:], dtu[:, :, L - L % T:], A,
                               B[:, 0, :, L - L % T:], C[:, 0, :, L - L % T:])
        ys.append(y)
    y = torch.cat(ys, -1) + D[:, None] * u
    return y * F.silu(z)


def m1_chunked(u, delta, A, B, C, D, z, delta_bias, T=32):
    """Vectorized: within chunks of T tokens h_t = e^{S_t} (h_0 + sum_{s<=t} e^{-S_s} ΔB_s u_s)
    (S = cumulative ΔA, a cumsum); chunks chained by a loop over l/T. T bounds e^{-S} in fp32."""
    b, d, L = u.shape
    n = A.shape[1]
    pad = (-L) % T
    dt = F.softplus(delta + delta_bias[:, None])
    if pad:
        dt, u_p = F.pad(dt, (0, pad)), F.pad(u, (0, pad))
        Bp, Cp = F.pad(B[:, 0], (0, pad)), F.pad(C[:, 0], (0, pad))
    else:
        u_p, Bp, Cp = u, B[:, 0], C[:, 0]
    nc = (L + pad) // T
    S = (dt.view(b, d, nc, T, 1) * A.view(1, d, 1, 1, n)).cumsum(3)          # (b,d,nc,T,n)
    drive = (dt * u_p).view(b, d, nc, T, 1) * Bp.transpose(1, 2).reshape(b, 1, nc, T, n)
    inner = (torch.exp(-S) * drive).cumsum(3)
    decay = torch.exp(S)
    h0 = u.new_zeros(b, d, n)
    starts = []
    for c in range(nc):
        starts.append(h0)
        h0 = decay[:, :, c, -1] * (h0 + inner[:, :, c, -1])
    h = decay * (torch.stack(starts, 2)[:, :, :, None] + inner)               # (b,d,nc,T,n)
    y = torch.einsum("bdctn,bctn->bdct", h, Cp.transpose(1, 2).reshape(b, nc, T, n))
    y = y.reshape(b, d, nc * T)[..., :L] + D[:, None] * u
    return y * F.silu(z)


def m2_eager(x, dt, A, B, C, D, z, dt_bias):
    dt = F.softplus(dt + dt_bias)
    b, L, h, p = x.shape
    g = B.shape[2]
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    st = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for i in range(L):
        dA = torch.exp(dt[:, i] * A)                                           # (b,h)
        st = st * dA[..., None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", st, Ch[:, i]))
    y = torch.stack(ys, 1) + D[:, None] * x
    return y * F.silu(z)


def m2_chunked(x, dt, A, B, C, D, z, dt_bias, Q=128):
    """Chunked SSD with matmuls: intra-chunk (C B^T ∘ decay) X, chunk states, a short loop."""
    dt = F.softplus(dt + dt_bias)
    b, L, h, p = x.shape
    n, g = B.shape[-1], B.shape[2]
    pad = (-L) % Q
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (L + pad) // Q
    Bh = B.repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    Ch = C.repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    a = (dt * A).view(b, nc, Q, h).permute(0, 3, 1, 2)                        # (b,h,nc,Q)
    cum = a.cumsum(-1)
    seg = cum[..., :, None] - cum[..., None, :]                               # (b,h,nc,Q,Q)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool))
    Lmat = torch.exp(seg.masked_fill(~causal, -math.inf))
    xd = (x * dt[..., None]).view(b, nc, Q, h, p)
    CB = torch.einsum("bcqhn,bcshn->bhcqs", Ch, Bh)
    y = torch.einsum("bhcqs,bcshp->bcqhp", CB * Lmat, xd)
    to_end = torch.exp(cum[..., -1:] - cum)                                   # (b,h,nc,Q)
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bh, to_end, xd)
    chunk_decay = torch.exp(cum[..., -1])                                     # (b,h,nc)
    run = x.new_zeros(b, h, p, n)
    prev = []
    for c in range(nc):
        prev.append(run)
        run = run * chunk_decay[:, :, c, None, None] + states[:, c]
    prev = torch.stack(prev, 1)                                              # (b,nc,h,p,n)
    y = y + torch.einsum("bcqhn,bchpn,bhcq->bcqhp", Ch, prev, torch.exp(cum))
    y = y.reshape(b, nc * Q, h, p)[:, :L] + D[:, None] * x[:, :L]
    return y * F.silu(z)


def decode1_eager(state, x, dt, A, B, C, D, z, dt_bias):
    dt = F.softplus(dt + dt_bias)
    dA = torch.exp(dt[..., None] * A)
    new = state * dA + (dt * x)[..., None] * B[:, 0, None, :]
    state.copy_(new)
    y = (new * C[:, 0, None, :]).sum(-1) + D * x
    return y * F.silu(z)


def decode1_fused(state, x, dt, A, B, C, D, z, dt_bias):
    dt = F.softplus(dt + dt_bias)
    state.mul_(torch.exp(dt[..., None] * A)).addcmul_((dt * x)[..., None], B[:, 0, None, :])
    y = torch.bmm(state, C[:, 0, :, None])[..., 0].addcmul_(D, x)
    return y.mul_(F.silu(z))


def decode2_eager(state, x, dt, A, B, C, D, z, dt_bias):
    dt = F.softplus(dt + dt_bias)
    h = state.shape[1]
    g = B.shape[1]
    Bh = B.repeat_interleave(h // g, dim=1)
    Ch = C.repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A)
    new = state * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch) + D[:, None] * x
    return y * F.silu(z)


def decode2_fused(state, x, dt, A, B, C, D, z, dt_bias):
    dt = F.softplus(dt + dt_bias)
    h, g = state.shape[1], B.shape[1]
    Bh = B.repeat_interleave(h // g, dim=1) if g != h else B
    Ch = C.repeat_interleave(h // g, dim=1) if g != h else C
    state.mul_(torch.exp(dt * A)[..., None, None]).add_(
        (dt[..., None] * x)[..., None] * Bh[:, :, None, :])
    y = torch.matmul(state, Ch[..., None])[..., 0]
    return y.addcmul_(D[:, None], x).mul_(F.silu(z))


# --------------------------------------------------------------------------------------------
# the run: one worker process per thread count (TVM sizes its pool once per process)

CASES = {
    "mamba1_d1536": dict(title="Mamba-1 scan b1 d1536 l2048 n16", kind="scan", d=1536, L=2048),
    "mamba1_d4096": dict(title="Mamba-1 scan b1 d4096 l1024 n16", kind="scan", d=4096, L=1024),
    "mamba2": dict(title="Mamba-2 SSD b1 l2048 h24 p64 n128", kind="ssd", L=2048),
    "decode_mamba1": dict(title="decode Mamba-1 b1 d4096 n16", kind="step1"),
    "decode_mamba2": dict(title="decode Mamba-2 b1 h24 p64 n128", kind="step2"),
}
GROUPS = {"mamba1": ["mamba1_d1536", "mamba1_d4096"], "mamba2": ["mamba2"],
          "decode": ["decode_mamba1", "decode_mamba2"]}


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def setup(key):
    """(family, convention, algorithm, problem args fn, eager fn, vectorized candidates, bytes)."""
    c = CASES[key]
    if c["kind"] == "scan":
        d, L = c["d"], c["L"]
        fam = mamba1(channels=d, state=16)
        nbytes = 4 * (4 * d * L + 2 * 16 * L)      # u, delta, z read, y written; B, C
        return (fam, Convention.SELECTIVE_SCAN, None, 1, L, scan_args, m1_eager,
                {"torch.compile of 16-step chunks": m1_compiled}, nbytes)
    if c["kind"] == "ssd":
        fam = mamba2(heads=24, head_dim=64, state=128, chunk=256)
        L = c["L"]
        nbytes = 4 * (3 * 24 * 64 * L + 2 * 128 * L + 24 * L)
        return (fam, Convention.SSD, Algorithm.CHUNKED, 1, L, ssd_args, m2_eager,
                {"chunked SSD matmuls Q=64": lambda *a: m2_chunked(*a, Q=64)}, nbytes)
    if c["kind"] == "step1":
        fam = mamba1(channels=4096, state=16)
        return (fam, Convention.STATE_UPDATE, Algorithm.STEP, 1, 1, step_args, decode1_eager,
                {"in-place fused ops": decode1_fused}, 4 * (2 * 4096 * 16 + 4096 * 16 + 5 * 4096))
    fam = mamba2(heads=24, head_dim=64, state=128, chunk=256)
    return (fam, Convention.STATE_UPDATE, Algorithm.STEP, 1, 1, step_args, decode2_eager,
            {"in-place fused ops": decode2_fused}, 4 * (2 * 24 * 64 * 128 + 3 * 24 * 64 + 2 * 128))


def scan_args(p):
    return (p.u, p.delta, p.A, p.B, p.C, p.D, p.z, p.delta_bias)


def ssd_args(p):
    return (p.x, p.dt, p.A, p.B, p.C, p.D, p.z, p.dt_bias)


def step_args(p):
    return (p.state, p.x, p.dt, p.A, p.B, p.C, p.D, p.z, p.dt_bias)


def worker(keys, threads: int, repeats: int, impl: str) -> dict:
    """Time one implementation ("ours", "eager", "vec") or, with impl "check", compute every
    implementation's relative error against float64 (no timing)."""
    torch.set_num_threads(threads)
    out = {}
    for key in keys:
        fam, conv, alg, batch, L, args_of, eager, vectorized, nbytes = setup(key)
        p = signature.bind(fam, conv, (), signature.example_inputs(fam, conv, batch, L, seed=0))
        step = conv is Convention.STATE_UPDATE
        impls = {}
        row = {"bytes": nbytes}
        if impl in ("ours", "check"):
            k = _build(cpu, make_plan(fam, alg))
            impls["ours"] = lambda: k(p)[0]
            row["compile_s"] = k.compile_seconds
        if impl in ("eager", "check"):
            impls["eager"] = lambda: eager(*args_of(p))
        if impl in ("vec", "check"):
            for name, f in vectorized.items():
                impls["vec:" + name] = (lambda f=f: f(*args_of(p)))
        if impl == "check":
            y64, _ = reference.run_float64(p)
            state0 = p.state.clone() if step else None
            for name, f in impls.items():
                if step:
                    p.state.copy_(state0)
                row["err:" + name] = rel(f(), y64)
        else:
            for name, f in impls.items():
                n = 300 if step else (repeats if name != "eager" else max(3, repeats // 2))
                row["ms:" + name] = median_ms(f, n)
                print(f"[{threads} thread(s)] {key} {name}: {row['ms:' + name]:.3g} ms",
                      file=sys.stderr, flush=True)
        out[key] = row
    return out


def run_workers(keys, repeats: int, rounds: int) -> dict:
    """{threads: {key: row}}. Every implementation runs in its own processes (one per thread
    count and round): idle TVM and OpenMP pool threads spin for a while after a parallel
    region, and would otherwise steal the second core from whatever runs next. Each cell is
    the median over ``rounds`` processes."""
    import json
    import subprocess

    def spawn(threads, impl):
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", str(threads), "--impl", impl,
               "--repeats", str(repeats), "--keys", ",".join(keys)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"worker {impl} ({threads} threads) failed")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    check = spawn(1, "check")
    results = {}
    for threads in (1, 2):
        merged = {key: dict(check[key]) for key in keys}
        for impl in ("ours", "eager", "vec"):
            runs = [spawn(threads, impl) for _ in range(rounds)]
            for key in keys:
                for field in runs[0][key]:
                    if field.startswith("ms:"):
                        merged[key][field] = statistics.median(run[key][field] for run in runs)
        results[threads] = merged
    return results


def cpu_model() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor()
    def field(name):
        for ln in text.splitlines():
            if ln.split(":")[0].strip() == name:
                return ln.split(":", 1)[1].strip()
        return "?"
    isa = "AVX-512" if "avx512f" in text else "AVX2" if "avx2" in text else "SSE"
    return (f"{field('model name')} (family {field('cpu family')} model {field('model')}, {isa}), "
            f"{os.cpu_count()} vCPUs")


def render(results, keys) -> str:
    import tvm
    one, two = results[1], results[2]
    out = ["# CPU benchmark (bench/cpu.py)", "",
           f"Machine: {cpu_model()}; torch {torch.__version__}, TVM {tvm.__version__}, "
           f"LLVM target {tvmbuild.target_dict('cpu')}; fp32 inputs and state.",
           f"Run {time.strftime('%Y-%m-%d %H:%M')}: median ms at 1 / 2 threads (each thread count in "
           "its own processes; every cell the median over the rounds).",
           "ggml = llama.cpp's ggml_ssm_scan, measured elsewhere the same day on this machine type "
           "(the team's design notes), not in this run; it omits dt bias, D and z. The torch "
           "baselines (what the eager loop and the vectorized forms are) are described in "
           "bench/NOTES_cpu.md.", "",
           "| kernel | ours ms | torch eager loop ms | best vectorized torch ms | ggml ms (ref) "
           "| ours vs eager | ours vs vectorized | ours vs ggml | ours GB/s | rel err vs fp64: ours / eager / vectorized |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for key in keys:
        r1, r2 = one[key], two[key]
        vec = [k[3:] for k in r1 if k.startswith("ms:vec:")]
        best1 = min(vec, key=lambda v: r1["ms:" + v])
        best2 = min(vec, key=lambda v: r2["ms:" + v])
        notes.append(f"- {CASES[key]['title']}: best vectorized = {best1[4:]} (1 thread), {best2[4:]} "
                     f"(2 threads); also timed: " + ", ".join(
                         f"{v[4:]} {r1['ms:' + v]:.3g} / {r2['ms:' + v]:.3g} ms" for v in vec))
        o1, o2 = r1["ms:ours"], r2["ms:ours"]
        e1, e2 = r1["ms:eager"], r2["ms:eager"]
        v1, v2 = r1["ms:" + best1], r2["ms:" + best2]
        g1, g2 = GGML[key]
        gbs = f"{r1['bytes'] / o1 / 1e6:.1f} / {r1['bytes'] / o2 / 1e6:.1f}"
        err = " / ".join(f"{r1['err:' + n]:.1e}" for n in ("ours", "eager", best1))
        out.append(f"| {CASES[key]['title']} | {o1:.3g} / {o2:.3g} | {e1:.3g} / {e2:.3g} | "
                   f"{v1:.3g} / {v2:.3g} | {g1:.3g} / {g2:.3g} | {e1 / o1:.1f}x / {e2 / o2:.1f}x | "
                   f"{v1 / o1:.1f}x / {v2 / o2:.1f}x | {g1 / o1:.1f}x / {g2 / o2:.1f}x | {gbs} | "
                   f"{err} |")
    out += ["", "Ratios are speedups of ours (their time / our time) at 1 / 2 threads. GB/s: the "
            "tensors read and written once (inputs, outputs; the decode rows also the state) over "
            "our time.", ""] + notes
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="worker processes per thread count")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_cpu.md"))
    ap.add_argument("--only", default="mamba1,mamba2,decode,train")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import json
        print(json.dumps(worker(args.keys.split(","), args.worker, args.repeats, args.impl)))
        return
    groups = args.only.split(",")
    keys = [k for g in groups if g != "train" for k in GROUPS[g]]
    text = render(run_workers(keys, args.repeats, args.rounds), keys) if keys else ""
    print(text)
    if "train" in groups:
        import cpu_train
        for family in ("mamba1", "mamba2"):
            text += "\n\n" + cpu_train.main(["--family", family, "--repeats", "3"])
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
