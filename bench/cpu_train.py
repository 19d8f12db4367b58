"""CPU benchmark of training (forward + backward) on the ssmc cpu target vs torch autograd.

    python bench/cpu_train.py [--threads 2] [--repeats 5] [--d 1536] [--L 2048]

Row: Mamba-1 selective scan b1 d1536 l2048 n16, fp32 (softplus(dt + bias), D, silu(z)). One
fwd+bwd = the forward and ``torch.autograd.grad`` of every input given a fixed dy. Columns:
median ms of ours (the generated TVM forward and backward kernels through the public
callable), torch autograd through the best vectorized torch form (bench/cpu.py's chunked
cumulative-sum form, ``m1_chunked``) and through the per-timestep loop (``m1_eager``), the
ratios, and each one's gradient error against float64 autograd through the recurrence
(``reference.run_float64_differentiable``). Prints the CPU model; all in one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--no-eager", action="store_true", help="skip the (slow) per-step loop")
    ap.add_argument("--check-L", type=int, default=512,
                    help="mamba2: check gradients against float64 only up to this length")
    ap.add_argument("--family", choices=("mamba1", "mamba2"), default="mamba1",
                    help="mamba2: SSD b1 l{L} h24 p64 n128 against m2_chunked / m2_eager")
    args = ap.parse_args(argv)
    if args.family == "mamba2":
        return main_ssd(args)
    torch.set_num_threads(args.threads)
    import cpu as cpu_bench
    import families
    import ssmc
    from ssmc.backends import reference
    from ssmc.signature import bind, example_inputs
    fam = families.mamba1(channels=args.d, state=16)
    p = bind(fam, fam.convention, (), example_inputs(fam, None, 1, args.L, seed=0))
    kernel = ssmc.compile(fam, target="cpu")
    leaves = [getattr(p, n).detach().clone().requires_grad_(True) for n in NAMES]
    dy = torch.randn_like(p.u)

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(*leaves), leaves, dy)
        return run

    def ours(u, delta, A, B, C, D, z, bias):
        return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)

    impls = {"ours": ours, "torch vectorized (m1_chunked)": cpu_bench.m1_chunked}
    if not args.no_eager:
        impls["torch eager loop (m1_eager)"] = cpu_bench.m1_eager
    # the float64 oracle's gradients
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64, _ = reference.run_float64_differentiable(dataclasses.replace(p, **dict(zip(NAMES,
                                                                                 leaves64))))
    want = torch.autograd.grad(y64, leaves64, dy.double())
    rows = []
    for name, fn in impls.items():
        run = fwd_bwd(fn)
        got = run()
        err = max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want))
        t = median_ms(run, args.repeats if "eager" not in name else max(1, args.repeats // 2))
        rows.append((name, t, err))
        print(f"{name}: {t:.1f} ms, grad rel err {err:.1e}", file=sys.stderr, flush=True)
    ours_ms = rows[0][1]
    print(f"CPU: {cpu_bench.cpu_model()}; {args.threads} thread(s); torch {torch.__version__}\n")
    print(f"| fwd+bwd, Mamba-1 b1 d{args.d} l{args.L} n16 fp32 | ms | ours is faster by | "
          "grad rel err vs fp64 |")
    print("|---|---|---|---|")
    for name, t, err in rows:
        print(f"| {name} | {t:.1f} | {t / ours_ms:.1f}x | {err:.1e} |")


SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def main_ssd(args):
    """The Mamba-2 row: SSD b1 l{L} h24 p64 n128 g1, fp32."""
    torch.set_num_threads(args.threads)
    import cpu as cpu_bench
    import families
    import ssmc
    from ssmc.backends import reference
    from ssmc.signature import bind, example_inputs
    fam = families.mamba2(heads=24, head_dim=64, state=128, chunk=256)
    p = bind(fam, fam.convention, (), example_inputs(fam, None, 1, args.L, seed=0))
    kernel = ssmc.compile(fam, target="cpu")
    leaves = [getattr(p, n).detach().clone().requires_grad_(True) for n in SSD_NAMES]
    dy = torch.randn_like(p.x)

    def ours(x, dt, A, B, C, D, z, bias):
        return kernel(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)

    impls = {"ours": ours, "torch vectorized (m2_chunked, Q=64)":
             lambda *a: cpu_bench.m2_chunked(*a, Q=64)}
    if not args.no_eager:
        impls["torch eager loop (m2_eager)"] = cpu_bench.m2_eager
    # float64 autograd through the recurrence keeps every step's (h, p, n) state: ~8 GB at
    # l2048; the error is checked up to --check-L tokens (a run at that length gives it)
    want = None
    if args.L <= args.check_L:
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        y64, _ = reference.run_float64_differentiable(
            dataclasses.replace(p, **dict(zip(SSD_NAMES, leaves64))))
        want = torch.autograd.grad(y64, leaves64, dy.double())
    rows = []
    for name, fn in impls.items():
        run = (lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, dy))
        got = run()
        err = (max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want))
               if want is not None else float("nan"))
        t = median_ms(run, args.repeats if "eager" not in name else max(1, args.repeats // 2))
        rows.append((name, t, err))
        print(f"{name}: {t:.1f} ms, grad rel err {err:.1e}", file=sys.stderr, flush=True)
    ours_ms = rows[0][1]
    print(f"CPU: {cpu_bench.cpu_model()}; {args.threads} thread(s); torch {torch.__version__}\n")
    print(f"| fwd+bwd, Mamba-2 SSD b1 l{args.L} h24 p64 n128 fp32 | ms | ours is faster by | "
          "grad rel err vs fp64 |")
    print("|---|---|---|---|")
    for name, t, err in rows:
        print(f"| {name} | {t:.1f} | {t / ours_ms:.1f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
