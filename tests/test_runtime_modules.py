"""SSMLayer: the Mamba-1 and Mamba-2 blocks against the block equations written out here in
float64 (independent of the layer's code), decode steps against the one-shot forward, and the
Hugging Face parameter layout."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ON_CUDA, assert_rel_close
from families import dense, mamba1, mamba2, s4d, s5
from ssmc.errors import SSMCError
from ssmc.ir import Algorithm
from ssmc.runtime.modules import SSMLayer


# --------------------------------------------------------------------------------------------
# The blocks, from the equations (float64, one token at a time), on HF-named tensors

def _causal_conv_silu(x, weight, bias):
    """x (l, c); weight (c, 1, k): out_t = sum_j w_j x_{t-k+1+j} + bias, then silu."""
    length, k = x.shape[0], weight.shape[-1]
    out = torch.zeros_like(x)
    for t in range(length):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                out[t] += weight[:, 0, j] * x[src]
        if bias is not None:
            out[t] += bias
    return F.silu(out)


def mamba1_block_math(hidden, p, d_state, dt_rank):
    """One sequence: hidden (l, d_model) -> (l, d_model), Mamba-1 (HF MambaMixer tensors)."""
    p = {k: v.double() for k, v in p.items()}
    xz = hidden.double() @ p["in_proj.weight"].T
    x, z = xz.chunk(2, dim=-1)
    x = _causal_conv_silu(x, p["conv1d.weight"], p.get("conv1d.bias"))
    dt_r, B, C = torch.split(x @ p["x_proj.weight"].T, [dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt_r @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    A = -torch.exp(p["A_log"])
    h = torch.zeros(x.shape[1], d_state, dtype=torch.float64)
    ys = []
    for t in range(x.shape[0]):
        h = torch.exp(delta[t, :, None] * A) * h + delta[t, :, None] * B[t][None, :] * x[t, :, None]
        ys.append((h @ C[t] + p["D"] * x[t]) * F.silu(z[t]))
    return torch.stack(ys) @ p["out_proj.weight"].T


def mamba2_block_math(hidden, p, heads, head_dim, d_state, groups, eps=1e-5):
    """One sequence, Mamba-2 (HF Mamba2Mixer tensors); gated RMSNorm per group of heads."""
    p = {k: v.double() for k, v in p.items()}
    d_inner = heads * head_dim
    z, xbc, dt = torch.split(hidden.double() @ p["in_proj.weight"].T,
                             [d_inner, d_inner + 2 * groups * d_state, heads], dim=-1)
    xbc = _causal_conv_silu(xbc, p["conv1d.weight"], p.get("conv1d.bias"))
    x, B, C = torch.split(xbc, [d_inner, groups * d_state, groups * d_state], dim=-1)
    delta = F.softplus(dt + p["dt_bias"])
    A = -torch.exp(p["A_log"])
    state = torch.zeros(heads, head_dim, d_state, dtype=torch.float64)
    per_group = heads // groups
    ys = []
    for t in range(hidden.shape[0]):
        xt = x[t].reshape(heads, head_dim)
        y = torch.empty(heads, head_dim, dtype=torch.float64)
        for h in range(heads):
            g = h // per_group
            Bg = B[t, g * d_state:(g + 1) * d_state]
            Cg = C[t, g * d_state:(g + 1) * d_state]
            state[h] = math.exp(delta[t, h] * A[h]) * state[h] + delta[t, h] * xt[h][:, None] * Bg[None, :]
            y[h] = state[h] @ Cg + p["D"][h] * xt[h]
        y = y.reshape(d_inner) * F.silu(z[t])
        grouped = y.reshape(groups, d_inner // groups)
        grouped = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
        ys.append(grouped.reshape(d_inner) * p["norm.weight"])
    return torch.stack(ys) @ p["out_proj.weight"].T


def randomize(module, seed, scale=0.4):
    """Parameters drawn fresh: weights around scale, A_log in a useful decay range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=g) * 2 - 1)
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                param.copy_(torch.rand(param.shape, generator=g) - 2)
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=g))
            elif param.is_complex():
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * scale)
            else:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return module


# --------------------------------------------------------------------------------------------

def test_mamba1_block_matches_the_equations(seed):
    fam = mamba1(channels=12, state=4)
    layer = randomize(SSMLayer(fam, d_model=6, dt_rank=2), seed)
    hidden = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = layer(hidden)
    params = dict(layer.state_dict())
    for b in range(2):
        ref = mamba1_block_math(hidden[b], params, d_state=4, dt_rank=2)
        assert_rel_close(f"mamba1 block, sequence {b}", out[b], ref, "float32")


@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_block_matches_the_equations(seed, groups):
    fam = mamba2(heads=4, head_dim=2, state=3, groups=groups, chunk=4)
    layer = randomize(SSMLayer(fam, d_model=6), seed)
    hidden = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = layer(hidden)
    params = dict(layer.state_dict())
    for b in range(2):
        ref = mamba2_block_math(hidden[b], params, heads=4, head_dim=2, d_state=3, groups=groups)
        assert_rel_close(f"mamba2 block, sequence {b}", out[b], ref, "float32")


def test_mamba2_without_a_kernel_gate_gates_in_the_norm(seed):
    """norm(y * silu(z)) either way: the family's gate in the kernel, or in the gated norm."""
    gated = randomize(SSMLayer(mamba2(heads=2, head_dim=4, state=4, chunk=4), d_model=8), seed)
    plain = SSMLayer(mamba2(heads=2, head_dim=4, state=4, chunk=4, gate=False), d_model=8)
    plain.load_state_dict(gated.state_dict())
    hidden = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_rel_close("gate placement", plain(hidden), gated(hidden), "float32")


FAMILIES = {
    "mamba1": mamba1(channels=8, state=4),
    "mamba1_groups2_nogate": mamba1(channels=8, state=4, groups=2, gate=False),
    "mamba2": mamba2(heads=2, head_dim=4, state=4, chunk=4),
    "mamba2_clamp_headdim_D": mamba2(heads=2, head_dim=4, state=4, chunk=4, clamp=(1e-3, 0.5),
                                     D=__import__("ssmc").ir.Sharing.HEAD_DIM),
    "s4d_lti": s4d(channels=8, state=4, algorithm=Algorithm.SCAN),
    "s5_complex": s5(channels=8, state=4),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_step_by_step_equals_one_shot(name, seed):
    layer = randomize(SSMLayer(FAMILIES[name], d_model=8), seed)
    hidden = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        full = layer(hidden)
        state = layer.allocate_state(2)
        steps = torch.stack([layer.step(hidden[:, t], state) for t in range(7)], dim=1)
        assert_rel_close(f"{name}: steps vs forward", steps, full, "float32")
        # A prompt in two pieces, then decode: the state carries the conv window and the SSM.
        resumed = layer.allocate_state(2)
        first = layer(hidden[:, :4], resumed)
        second = layer(hidden[:, 4:6], resumed)
        last = layer.step(hidden[:, 6], resumed)
        joined = torch.cat([first, second, last[:, None]], dim=1)
        assert_rel_close(f"{name}: prefill + step vs forward", joined, full, "float32")
        assert_rel_close(f"{name}: state", resumed.ssm, state.ssm, "float32")


def test_hf_parameter_layout():
    m1 = SSMLayer(mamba1(channels=16, state=4), d_model=8, d_conv=4, dt_rank=2)
    shapes = {k: tuple(v.shape) for k, v in m1.state_dict().items()}
    assert shapes == {"A_log": (16, 4), "D": (16,), "in_proj.weight": (32, 8),
                      "conv1d.weight": (16, 1, 4), "conv1d.bias": (16,),
                      "x_proj.weight": (2 + 8, 16), "dt_proj.weight": (16, 2),
                      "dt_proj.bias": (16,), "out_proj.weight": (8, 16)}
    m2 = SSMLayer(mamba2(heads=4, head_dim=4, state=8, groups=2), d_model=8)
    shapes = {k: tuple(v.shape) for k, v in m2.state_dict().items()}
    conv_dim = 16 + 2 * 2 * 8
    assert shapes == {"dt_bias": (4,), "A_log": (4,), "D": (4,),
                      "in_proj.weight": (16 + conv_dim + 4, 8),
                      "conv1d.weight": (conv_dim, 1, 4), "conv1d.bias": (conv_dim,),
                      "norm.weight": (16,), "out_proj.weight": (8, 16)}
    with torch.no_grad():
        assert torch.equal(m2.A_value(), -torch.exp(m2.A_log))


def test_blocks_it_cannot_build_say_why():
    with pytest.raises(SSMCError, match="dense A"):
        SSMLayer(dense(), d_model=8)
    with pytest.raises(SSMCError, match="selective A"):
        SSMLayer(mamba2(selective_A=True), d_model=8)


def test_layer_from_spec_text():
    text = """
ssm Tiny {
  dims       heads = 2, head_dim = 4, state = 4, groups = 1
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per head
  gate       silu(z)
  discretize exp_euler
  compute    chunked(4)
}
"""
    layer = SSMLayer(text, d_model=8)
    assert layer.family.name == "Tiny" and layer.is_ssd
    with torch.no_grad():
        assert layer(torch.randn(1, 5, 8)).shape == (1, 5, 8)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_layer_on_generated_kernels_matches_the_reference_layer(target, name, seed):
    """The same block on TVM (cpu) and Triton (cuda, interpreted on the CPU) kernels."""
    from ssmc.api import backend_module, parse_target
    from ssmc.plan import make_plan
    backend = backend_module(parse_target(target))
    fam = FAMILIES[name]
    if not hasattr(backend, "supports") or backend.supports(make_plan(fam)):
        pytest.skip(f"the {target} backend cannot compile {fam.name} in this build")
    device = "cuda" if target == "cuda" and ON_CUDA else "cpu"
    layer = randomize(SSMLayer(fam, d_model=8, target=target), seed)
    oracle = SSMLayer(fam, d_model=8, target="reference")
    oracle.load_state_dict(layer.state_dict())
    layer = layer.to(device)
    hidden = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = oracle(hidden)
        assert_rel_close(f"{target} forward", layer(hidden.to(device)), expected, "float32")
        state = layer.allocate_state(2)
        steps = torch.stack([layer.step(hidden[:, t].to(device), state) for t in range(6)], dim=1)
        assert_rel_close(f"{target} steps", steps, expected, "float32")
