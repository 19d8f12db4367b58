"""CPU benchmark of training (forward + backward) on the ssmc cpu target vs torch autograd.

    python bench/cpu_train.py [--threads 2] [--repeats 5] [--d 1536] [--L 2048]

Row: Mamba-1 selective scan b1 d1536 l2048 n16, fp32 (softplus(dt + bias), D, silu(z)). One
fwd+bwd = the forward and ``torch.autograd.grad`` of every input given a fixed dy. Columns:
median ms of ours (the generated TVM forward and backward kernels through the public
callable), torch autograd through the best vectorized torch form (bench/cpu.py's chunked
cumulative-sum form, ``m1_chunked``) and through the per-timestep loop (``m1_eager``), the
ratios, and each one's gradient error against float64 autograd through the recurrence
(``reference.run_float64_differentiable``); then our forward and backward kernels alone.
Prints the CPU model; all in one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# The inputs each family's fwd+bwd differentiates, in the order the torch forms take them.
NAMES = {"mamba1": ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
         "mamba2": ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")}


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
    torch.set_num_threads(args.threads)
    import cpu as cpu_bench
    import families
    import ssmc
    if args.family == "mamba1":
        fam = families.mamba1(channels=args.d, state=16)
        title = f"Mamba-1 b1 d{args.d} l{args.L} n16"
        forms = {"torch vectorized (m1_chunked)": cpu_bench.m1_chunked,
                 "torch eager loop (m1_eager)": cpu_bench.m1_eager}
        softplus = "delta_softplus"
        check = True
    else:
        fam = families.mamba2(heads=24, head_dim=64, state=128, chunk=256)
        title = f"Mamba-2 SSD b1 l{args.L} h24 p64 n128"
        forms = {"torch vectorized (m2_chunked, Q=64)": lambda *a: cpu_bench.m2_chunked(*a, Q=64),
                 "torch eager loop (m2_eager)": cpu_bench.m2_eager}
        softplus = "dt_softplus"
        # float64 autograd through the recurrence keeps every step's (h, p, n) state: ~8 GB
        # at l2048; the error is checked up to --check-L tokens (a run at that length gives it)
        check = args.L <= args.check_L
    if args.no_eager:
        forms = {k: v for k, v in forms.items() if "eager" not in k}
    kernel = ssmc.compile(fam, target="cpu")
    names = NAMES[args.family]

    def ours(x, dt, A, B, C, D, z, bias):
        return kernel(x, dt, A, B, C, D=D, z=z, **{names[-1]: bias, softplus: True})
    # ours alone first: torch's idle OpenMP workers spin after its runs (NOTES_cpu.md)
    fwd, bwd = split(kernel, fam, args.L, args.repeats, cpu_bench)
    rows = compare(fam, names, {"ours": ours, **forms}, args.L, args.repeats, check, cpu_bench)
    ours_ms = rows[0][1]
    lines = [f"CPU: {cpu_bench.cpu_model()}; {args.threads} thread(s); torch {torch.__version__}\n",
             f"| fwd+bwd, {title} fp32 | ms | ours is faster by | grad rel err vs fp64 |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {t:.1f} | {t / ours_ms:.1f}x | {err:.1e} |" for name, t, err in rows]
    lines.append(f"\nours alone: forward {fwd:.1f} ms, backward {bwd:.1f} ms (the generated "
                 "kernels, median)")
    text = "\n".join(lines)
    print(text)
    return text


def split(kernel, fam, L, repeats, cpu_bench):
    """(forward ms, backward ms) of our kernels alone, on the same problem as ``compare``."""
    from ssmc.signature import bind, example_inputs
    p = bind(fam, fam.convention, (), example_inputs(fam, None, 1, L, seed=0))
    backend = kernel.kernel_for(p.family)
    dy = torch.randn_like(p.input)
    return (cpu_bench.median_ms(lambda: backend(p), repeats),
            cpu_bench.median_ms(lambda: backend.backward(p, dy, None), repeats))


def compare(fam, names, impls, L, repeats, check, cpu_bench):
    """(name, median fwd+bwd ms, largest gradient error vs float64 or NaN) per implementation,
    all on one random problem and one dy."""
    from ssmc.backends import reference
    from ssmc.signature import bind, example_inputs
    p = bind(fam, fam.convention, (), example_inputs(fam, None, 1, L, seed=0))
    leaves = [getattr(p, n).detach().clone().requires_grad_(True) for n in names]
    dy = torch.randn_like(p.input)
    want = None
    if check:
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        y64, _ = reference.run_float64_differentiable(
            dataclasses.replace(p, **dict(zip(names, leaves64))))
        want = torch.autograd.grad(y64, leaves64, dy.double())
    rows = []
    for name, fn in impls.items():
        def run(fn=fn):
            return torch.autograd.grad(fn(*leaves), leaves, dy)
        got = run()
        err = (max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want))
               if want is not None else float("nan"))
        t = cpu_bench.median_ms(run, repeats if "eager" not in name else max(1, repeats // 2),
                                warmup=0)
        rows.append((name, t, err))
        print(f"{name}: {t:.1f} ms, grad rel err {err:.1e}", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
