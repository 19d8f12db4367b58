"""The calls mamba_ssm's users make: D, z and the Δ bias omitted (``z=None``, ``D=None``,
``delta_bias=None``: the call runs the family without the term), and fp32 Δ, B, C beside a
bf16 x; on every target, against the float64 oracle called the same way.

The oracle (``target="reference"``) computes the recurrence from the math; a call without a term
must also differ from the full call, so a term that was silently kept would fail.
"""

import pytest
import torch

import ssmc
from conftest import TOL, rel_err, require_cuda_device, require_target_tools, target_device

require_cuda_device()

FAMILIES = {  # id -> (spec, family, sizes at the call: not the spec's)
    "scan": ("examples/mamba1.ssm", None, dict(channels=12)),
    "chunked": ("examples/mamba2.ssm", "Mamba2", dict(heads=4, groups=1)),
    "step": ("examples/mamba2.ssm", "Mamba2Decode", dict(heads=4, groups=1)),
}
DROPS = [("z",), ("D",), ("bias",), ("z", "D", "bias")]


def compiled(target, which, seed, **example):
    """(oracle, kernel, inputs drawn from the oracle at non-spec sizes) for one case."""
    require_target_tools(target)
    spec, family, sizes = FAMILIES[which]
    oracle = ssmc.compile(spec, target="reference", family=family)
    kernel = ssmc.compile(spec, target=target, family=family)
    inputs = oracle.example_inputs(batch=2, seqlen=11, seed=seed, with_state=which != "step",
                                   **example, **sizes)
    return oracle, kernel, inputs


def run(fn, inputs, device, omit=()):
    """``fn`` on copies of ``inputs`` (on ``device``) without ``omit``: (y, final or updated
    state), on the CPU."""
    args = {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items() if k not in omit}
    out = fn(**args)
    if "state" in args:                      # the decode step updates its state in place
        return out.cpu(), args["state"].cpu()
    return out[0].cpu(), out[1].cpu()


@pytest.mark.parametrize("drop", DROPS, ids=lambda d: "no-" + "-".join(d))
@pytest.mark.parametrize("which", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["cpu", "c", "cuda"])
def test_an_omitted_term_is_absent(target, which, drop, seed):
    oracle, kernel, inputs = compiled(target, which, seed)
    bias = "delta_bias" if "delta_bias" in inputs else "dt_bias"
    names = {bias if d == "bias" else d for d in drop}
    assert names <= set(inputs)
    y, state = run(kernel, inputs, target_device(target), names)
    y64, state64 = run(oracle, inputs, "cpu", names)
    assert rel_err(y, y64) <= TOL["float32"], f"y: {rel_err(y, y64):.1e}"
    assert rel_err(state, state64) <= TOL["float32"] * 4
    full, _ = run(oracle, inputs, "cpu")
    assert rel_err(y64, full) > 1e-3, "omitting the term changed nothing"


@pytest.mark.parametrize("which", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["cpu", "c", "cuda"])
def test_fp32_dt_b_c_beside_a_bf16_x(target, which, seed):
    oracle, kernel, inputs = compiled(target, which, seed, dtype="bfloat16")
    for name in ("delta", "dt", "B", "C"):
        if name in inputs:
            inputs[name] = inputs[name].float()
    y, _ = run(kernel, inputs, target_device(target))
    y64, _ = run(oracle, inputs, "cpu")
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), y64.float()) <= TOL["bfloat16"]
    dt = "delta" if "delta" in inputs else "dt"
    with pytest.raises(ssmc.errors.CallError, match="or are float32"):
        kernel(**dict(inputs, **{dt: inputs[dt].half()}))      # neither x's dtype nor fp32
