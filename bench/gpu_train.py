"""GPU benchmark of training (forward + backward) through ssmc's generated kernels, with anchors.

    python bench/gpu_train.py           # the fwd+bwd rows (mamba_ssm's CUDA scan built first)
    python bench/gpu_train.py --ssd-only [--ssd-sweep '[{"bwd_bc_heads": 8}, ...]']

Rows (bf16 inputs, fp32 parameters, the Mamba-1 / Mamba-2 blocks of bench/gpu.py):
selective scan b8 d4096 l2048 n16 (softplus(dt + bias), D, silu(z)) and SSD b4 l4096 h80 p64
n128 and b8 l2048 h32 (chunk 256). Each row: the median time of one forward and one backward (``torch.autograd.grad`` of
every input given a fixed random dy) through the public callable, ours and the anchor's
(mamba_ssm ``selective_scan_fn`` CUDA, ``mamba_chunk_scan_combined`` Triton), the extra memory
of one fwd+bwd (peak allocated minus what was allocated before: outputs, gradients, saved and
scratch tensors), the floor (the bytes a fwd+bwd must move at the copy bandwidth measured in
this run) and the gradients' relative error against float64 autograd through the recurrence on
a slice of channels (per-channel gradients; dB, dC mix all channels and are compared with the
anchor's instead). ``rows(ceil)`` is what bench/gpu.py calls.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from measure import copy_bandwidth, ms, rel_err  # noqa: E402

DEVICE = "cuda"
SCAN_SHAPE = ("selective scan fwd+bwd b8 d4096 l2048 n16", 8, 2048)
SSD_SHAPES = [("SSD fwd+bwd b4 l4096 h80 p64 n128 c256", 4, 4096, 80),
              ("SSD fwd+bwd b8 l2048 h32 p64 n128 c256", 8, 2048, 32)]
SSD_SHAPE = SSD_SHAPES[0]
SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _fwd_bwd(fn, leaves, dy):
    def run():
        y = fn()
        return torch.autograd.grad(y, leaves, dy)
    return run


def _extra_memory(run) -> float:
    """GiB allocated at the peak of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2 ** 30


def _scan_reference_grads(p, leaves_of, dy, channels):
    """float64 autograd through the recurrence on ``channels`` (gpu_scan.scan_reference)."""
    import gpu_scan
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    fam = gpu_scan.scan_family()
    names = ("u", "delta", "A", "D", "z", "delta_bias")
    full = {n: leaves_of[n].detach().double() for n in SCAN_GRADS}
    part = {n: (full[n][:, channels] if full[n].dim() == 3 else full[n][channels])
            .clone().requires_grad_(True) for n in names}

    class Sliced:
        pass
    q = Sliced()
    for n in SCAN_GRADS:
        setattr(q, n, part.get(n, full[n]))
    y = gpu_scan.scan_reference(make_plan(fam, Algorithm.SCAN), q, slice(None))
    grads = torch.autograd.grad(y, [part[n] for n in names], dy[:, channels].double())
    return dict(zip(names, grads))


def scan_sweep(configs) -> list:
    """fwd+bwd ms of the scan row with each backward config (keys bwd_*), same inputs."""
    import gpu_scan
    _, batch, seqlen = SCAN_SHAPE
    fam, p = gpu_scan.scan_problem(batch, seqlen)
    leaves = {n: getattr(p, n).detach().clone().requires_grad_(True) for n in SCAN_GRADS}
    dy = torch.randn_like(p.u)

    def call(kernel):
        return kernel(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                      D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                      delta_softplus=True)
    return _sweep(fam, configs, call, [leaves[n] for n in SCAN_GRADS], dy, "sweep")


def _sweep(fam, configs, call, leaves, dy, label) -> list:
    """(config, fwd+bwd ms or the error) of ``call(kernel)`` compiled with each config."""
    import ssmc
    out = []
    for cfg in configs:
        try:
            kernel = ssmc.compile(fam, target="cuda", config=dict(cfg))
            out.append((cfg, round(ms(_fwd_bwd(lambda: call(kernel), leaves, dy), rep=50), 4)))
        except Exception as e:  # noqa: BLE001
            out.append((cfg, f"{type(e).__name__}: {str(e)[:160]}"))
        print(" ", label, out[-1], flush=True)
    return out


def scan_row(ceil, config=None) -> dict:
    import anchors
    import gpu_scan
    import ssmc
    label, batch, seqlen = SCAN_SHAPE
    fam, p = gpu_scan.scan_problem(batch, seqlen)
    kernel = ssmc.compile(fam, target="cuda", config=config)
    leaves = {n: getattr(p, n).detach().clone().requires_grad_(True) for n in SCAN_GRADS}
    dy = torch.randn_like(p.u)
    order = [leaves[n] for n in SCAN_GRADS]

    def ours():
        return kernel(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                      D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                      delta_softplus=True)
    row = {"kernel": label, "config": config or {}}
    # bytes: the forward reads u, dt, z, B, C and writes y; the backward reads them and dy and
    # writes du, ddt, dz (bf16) and dB, dC (fp32 here)
    d, n = 4096, 16
    tok = batch * d * seqlen * 2
    bc = batch * n * seqlen * 2
    nbytes = (4 * tok + 2 * bc) + (5 * tok + 2 * bc) + 2 * batch * n * seqlen * 4
    row["floor_ms"] = nbytes / ceil["bandwidth"] * 1e3
    run = _fwd_bwd(ours, order, dy)
    got = dict(zip(SCAN_GRADS, run()))
    row["ours_ms"] = ms(run)
    row["ours_gib"] = _extra_memory(run)
    channels = slice(0, 256)
    want = _scan_reference_grads(p, leaves, dy, channels)
    row["rel_err"] = max(rel_err(got[k][:, channels] if got[k].dim() == 3 else got[k][channels],
                                 w) for k, w in want.items())
    fn, why = anchors.mamba_selective_scan_anchor()
    if fn is None:
        row["mamba_note"] = why
        return row

    def theirs():
        return fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                  D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                  delta_softplus=True)
    try:
        run_m = _fwd_bwd(theirs, order, dy)
        ref = dict(zip(SCAN_GRADS, run_m()))
        row["mamba_err"] = max(rel_err(ref[k][:, channels] if ref[k].dim() == 3
                                       else ref[k][channels], w) for k, w in want.items())
        row["dBdC_vs_mamba"] = max(rel_err(got[k], ref[k]) for k in ("B", "C"))
        row["mamba_ms"] = ms(run_m)
        row["mamba_gib"] = _extra_memory(run_m)
    except Exception as e:  # noqa: BLE001
        row["mamba_note"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _ssd_reference_grads(leaves, dy, heads):
    """float64 autograd through the recurrence for ``heads`` (per-head gradients; dB, dC mix
    every head and are compared with the anchor's instead)."""
    names = ("x", "dt", "A", "D", "z", "dt_bias")
    full = {n: leaves[n].detach().double() for n in SSD_GRADS}
    part = {}
    for n in names:
        t = full[n]
        t = t[:, :, heads] if t.dim() == 4 or n == "dt" else t[heads]
        part[n] = t.clone().requires_grad_(True)
    B, C = full["B"][:, :, 0], full["C"][:, :, 0]
    delta = torch.nn.functional.softplus(part["dt"] + part["dt_bias"])     # (1, l, h)
    abar = torch.exp(delta * part["A"])
    state = torch.zeros(B.shape[0], part["x"].shape[2], part["x"].shape[3], B.shape[-1],
                        dtype=torch.float64, device=B.device)
    ys = []
    for t in range(B.shape[1]):
        state = abar[:, t, :, None, None] * state + (delta[:, t, :, None] * part["x"][:, t])[..., None] \
            * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]))
    y = torch.stack(ys, 1) + part["x"] * part["D"][:, None]
    y = y * part["z"] * torch.sigmoid(part["z"])
    grads = torch.autograd.grad(y, [part[n] for n in names], dy[:, :, heads].double())
    return dict(zip(names, grads))


def ssd_row(ceil, shape=SSD_SHAPE) -> dict:
    """Our generated SSD fwd+bwd beside mamba_ssm's ``mamba_chunk_scan_combined``."""
    import anchors
    import gpu
    import ssmc
    from measure import kernel_breakdown
    from ssmc.signature import bind, example_inputs
    label, batch, seqlen, heads = shape
    fam = gpu.mamba2_family(heads)
    kw = example_inputs(fam, None, batch, seqlen, dtype="bfloat16", device=DEVICE, seed=0)
    p = bind(fam, fam.convention, (), kw)
    row = {"kernel": label}
    kernel = ssmc.compile(fam, target="cuda")
    leaves = {n: getattr(p, n).detach().clone().requires_grad_(True) for n in SSD_GRADS}
    order = [leaves[n] for n in SSD_GRADS]
    dy = torch.randn_like(p.x)
    # bytes: the forward reads x, z, dt, B, C and writes y; the backward reads them and dy and
    # writes dx, dz (bf16), ddt and dB, dC (fp32)
    d = fam.dims
    tok = batch * seqlen * heads * d.head_dim * 2
    bc = batch * seqlen * d.groups * d.state * 2
    nbytes = (3 * tok + 2 * bc) + (5 * tok + 2 * bc + 2 * 2 * bc)
    row["floor_ms"] = nbytes / ceil["bandwidth"] * 1e3

    def ours():
        return kernel(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                      D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True)
    reason = kernel.backward_refusal
    got = None
    if reason:
        row["ours_note"] = reason
    else:
        run = _fwd_bwd(ours, order, dy)
        got = dict(zip(SSD_GRADS, run()))
        row["ours_ms"] = ms(run)
        row["ours_gib"] = _extra_memory(run)
        row["breakdown"] = {k.split("_bwd_")[-1] if "_bwd_" in k else k.split("_chunk_")[-1]:
                            round(v, 4) for k, v in kernel_breakdown(run, iters=5).items()
                            if "_bwd_" in k or "_chunk_" in k}
        heads_checked = slice(0, 2)
        want = _ssd_reference_grads(leaves, dy, heads_checked)
        row["rel_err"] = max(rel_err(got[k][:, :, heads_checked] if got[k].dim() == 4 or k == "dt"
                                     else got[k][heads_checked], w) for k, w in want.items())
    fn, why = anchors.mamba_ssd_anchor()
    if fn is None:
        row["mamba_note"] = why
        return row

    def theirs():
        return fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                  chunk_size=256, D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True)
    try:
        run_m = _fwd_bwd(theirs, order, dy)
        ref = dict(zip(SSD_GRADS, run_m()))
        if got is not None:
            row["mamba_err"] = max(rel_err(ref[k][:, :, heads_checked]
                                           if ref[k].dim() == 4 or k == "dt"
                                           else ref[k][heads_checked], w) for k, w in want.items())
            row["dBdC_vs_mamba"] = max(rel_err(got[k], ref[k]) for k in ("B", "C"))
        row["mamba_ms"] = ms(run_m)
        row["mamba_gib"] = _extra_memory(run_m)
    except Exception as e:  # noqa: BLE001
        row["mamba_note"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def ssd_sweep(configs) -> list:
    """fwd+bwd ms of our SSD row with each config (forward and backward keys), same inputs."""
    import gpu
    from ssmc.signature import bind, example_inputs
    _, batch, seqlen, heads = SSD_SHAPE
    fam = gpu.mamba2_family(heads)
    p = bind(fam, fam.convention, (), example_inputs(fam, None, batch, seqlen, dtype="bfloat16",
                                                     device=DEVICE, seed=0))
    leaves = {n: getattr(p, n).detach().clone().requires_grad_(True) for n in SSD_GRADS}
    dy = torch.randn_like(p.x)

    def call(kernel):
        return kernel(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                      D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True)
    return _sweep(fam, configs, call, [leaves[n] for n in SSD_GRADS], dy, "ssd sweep")


def rows(ceil, scan_config=None) -> list:
    out = []
    makers = [lambda: scan_row(ceil, scan_config)]
    makers += [lambda shape=shape: ssd_row(ceil, shape) for shape in SSD_SHAPES]
    for make in makers:
        try:
            out.append(make())
        except Exception as e:  # noqa: BLE001
            out.append({"kernel": "row", "note": f"{type(e).__name__}: {str(e)[:300]}"})
        print(out[-1], flush=True)
        torch.cuda.empty_cache()
    return out


def table(rs) -> str:
    def f(v, spec="{:.3f}"):
        return "—" if v is None else spec.format(v)
    lines = ["| fwd+bwd, shape | ours ms | mamba_ssm ms | ours extra GiB | mamba_ssm extra GiB | "
             "floor ms | % of floor | grad rel err (ours) | grad rel err (mamba_ssm) |",
             "|" + "---|" * 9]
    for r in rs:
        pct = (100 * r["floor_ms"] / r["ours_ms"]) if r.get("ours_ms") and r.get("floor_ms") \
            else None
        lines.append("| " + " | ".join([
            r["kernel"], f(r.get("ours_ms")), f(r.get("mamba_ms")), f(r.get("ours_gib"), "{:.2f}"),
            f(r.get("mamba_gib"), "{:.2f}"), f(r.get("floor_ms")), f(pct, "{:.0f}%"),
            f(r.get("rel_err"), "{:.1e}"), f(r.get("mamba_err"), "{:.1e}")]) + " |")
    lines += [f"- {r['kernel']}: {k}: {v}" for r in rs for k, v in r.items()
              if k.endswith("note") or k in ("dBdC_vs_mamba", "config", "breakdown")]
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=json.loads, default=None,
                    help='time these backward configs first: JSON [{"bwd_chunk": 64}, ...]')
    ap.add_argument("--sweep-only", action="store_true", help="no table after the sweep")
    ap.add_argument("--ssd-only", action="store_true", help="only the SSD row (no CUDA build)")
    ap.add_argument("--ssd-sweep", type=json.loads, default=None,
                    help='time our SSD fwd+bwd with these configs: JSON [{"bwd_bc_heads": 8}, ...]')
    args = ap.parse_args(argv)
    if args.ssd_sweep:
        ssd_sweep(args.ssd_sweep)
    best = None
    if args.sweep:
        timed = [(c, t) for c, t in scan_sweep(args.sweep) if isinstance(t, float)]
        best = min(timed, key=lambda ct: ct[1])[0] if timed else None
        if args.sweep_only:
            return
    ceil = {"bandwidth": copy_bandwidth()}
    if args.ssd_only:
        rs = [ssd_row(ceil, shape) for shape in SSD_SHAPES]
    else:
        import anchors
        if anchors.build_selective_scan() is None:
            print("[anchors]", anchors._state["reason"], flush=True)
        rs = rows(ceil, best)
    print(table(rs))


if __name__ == "__main__":
    main()
