"""The calls mamba_ssm's users make: D, z and the Δ bias omitted (``z=None``, ``D=None``,
``delta_bias=None``: the call runs the family without the term), and fp32 Δ, B, C beside a
bf16 x; on every target, against the float64 oracle called the same way.

The oracle (``target="reference"``) computes the recurrence from the math; a call without a term
must also differ from the full call, so a term that was silently kept would fail.
"""
import shutil

import pytest
import torch

import ssmc
from conftest import ON_CUDA, TOL, rel_err, require_cuda_device

require_cuda_device()

FAMILIES = {  # id -> (spec, family, sizes at the call: not the spec's)
    "scan": ("examples/mamba1.ssm", None, dict(channels=12)),
    "chunked": ("examples/mamba2.ssm", "Mamba2", dict(heads=4, groups=1)),
    "step": ("examples/mamba2.ssm", "Mamba2Decode", dict(heads=4, groups=1)),
}
DROPS = [("z",), ("D",), ("bias",), ("z", "D", "bias")]


@pytest.mark.parametrize("drop", DROPS, ids=lambda d: "no-" + "-".join(d))
@pytest.mark.parametrize("which", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["cpu", "c", "cuda"])
def test_an_omitted_term_is_absent(target, which, drop, seed):
    if target == "cpu":
        pytest.importorskip("tvm", reason="the cpu target needs apache-tvm")
    if target == "c" and shutil.which("gcc") is None:
        pytest.skip("the c target builds with gcc, which is not on PATH")
    spec, family, sizes = FAMILIES[which]
    device = "cuda" if target == "cuda" and ON_CUDA else "cpu"
    oracle = ssmc.compile(spec, target="reference", family=family)
    kernel = ssmc.compile(spec, target=target, family=family)
    step = which == "step"
    inputs = oracle.example_inputs(batch=2, seqlen=11, seed=seed, with_state=not step, **sizes)
    bias = "delta_bias" if "delta_bias" in inputs else "dt_bias"
    names = {bias if d == "bias" else d for d in drop}
    assert names <= set(inputs)

    def call(fn, dev, keep_all=False):
        args = {k: v.clone().to(dev) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items() if keep_all or k not in names}
        out = fn(**args)
        y = out[0] if isinstance(out, tuple) else out
        return y.cpu(), (args["state"].cpu() if step else out[1].cpu())

    y, state = call(kernel, device)
    y64, state64 = call(oracle, "cpu")
    assert rel_err(y, y64) <= TOL["float32"], f"y: {rel_err(y, y64):.1e}"
    assert rel_err(state, state64) <= TOL["float32"] * 4
    full, _ = call(oracle, "cpu", keep_all=True)
    assert rel_err(y64, full) > 1e-3, "omitting the term changed nothing"


@pytest.mark.parametrize("which", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["cpu", "c", "cuda"])
def test_fp32_dt_b_c_beside_a_bf16_x(target, which, seed):
    if target == "cpu":
        pytest.importorskip("tvm", reason="the cpu target needs apache-tvm")
    if target == "c" and shutil.which("gcc") is None:
        pytest.skip("the c target builds with gcc, which is not on PATH")
    spec, family, sizes = FAMILIES[which]
    device = "cuda" if target == "cuda" and ON_CUDA else "cpu"
    oracle = ssmc.compile(spec, target="reference", family=family)
    kernel = ssmc.compile(spec, target=target, family=family)
    step = which == "step"
    inputs = oracle.example_inputs(batch=2, seqlen=11, seed=seed, with_state=not step,
                                   dtype="bfloat16", **sizes)
    for name in ("delta", "dt", "B", "C"):
        if name in inputs:
            inputs[name] = inputs[name].float()

    def call(fn, dev):
        args = {k: v.clone().to(dev) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}
        out = fn(**args)
        return out[0] if isinstance(out, tuple) else out

    y, y64 = call(kernel, device), call(oracle, "cpu")
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu().float(), y64.float()) <= TOL["bfloat16"]
    dt = "delta" if "delta" in inputs else "dt"
    with pytest.raises(ssmc.errors.CallError, match="or are float32"):
        kernel(**dict(inputs, **{dt: inputs[dt].half()}))      # neither x's dtype nor fp32
