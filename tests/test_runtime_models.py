"""Hybrid models: one-shot logits equal token-by-token decode logits (Jamba-like and SAMBA-like
layouts), attention and MoE against their definitions, models from spec text."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from families import mamba1, mamba2
from ssmc.errors import SSMCError
from ssmc.ir import AttentionBlock, MLPBlock, ModelSpec, MoEBlock, Repeat, SSMBlock
from ssmc.runtime.models import Attention, Model, MoE
from test_runtime_modules import randomize

MAMBA2 = mamba2(heads=2, head_dim=8, state=4, chunk=4, name="M2")
MAMBA1 = mamba1(channels=32, state=4, name="M1")

# Jamba-like: Mamba mixers with an attention layer (GQA) every few, MoE in every other FFN.
JAMBA = ModelSpec("JambaLike", d_model=16, vocab=40, layout=(
    Repeat((SSMBlock("M2"), MoEBlock(experts=4, top_k=2, hidden=24),
            AttentionBlock(heads=4, kv_heads=2), MLPBlock(hidden=24)), 2),))
# SAMBA-like: Mamba, MLP, sliding-window attention, MLP, repeated; the window is shorter than
# the sequence so the ring buffer wraps.
SAMBA = ModelSpec("SambaLike", d_model=16, vocab=40, layout=(
    Repeat((SSMBlock("M1"), MLPBlock(hidden=24), AttentionBlock(heads=4, kv_heads=4, window=3),
            MLPBlock(hidden=24)), 2),))


def _model(spec, seed, **options):
    torch.manual_seed(seed)
    model = Model(spec, target="reference", families=[MAMBA1, MAMBA2], **options)
    return randomize(model, seed, scale=0.3).eval()


@pytest.mark.parametrize("spec,rope", [(JAMBA, None), (SAMBA, 10000.0)], ids=["jamba", "samba"])
def test_one_shot_logits_equal_token_by_token_logits(spec, rope, seed):
    model = _model(spec, seed, rope_theta=rope)
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)
        state = model.allocate_state(2, kv_capacity=2)   # full-attention caches must grow
        steps = torch.stack([model.step(tokens[:, t], state) for t in range(8)], dim=1)
        assert_rel_close(f"{spec.name}: step logits", steps, full, "float32")
        assert state.position == 8
        # Prefill a prompt, then decode the rest.
        resumed = model.allocate_state(2)
        prompt = model(tokens[:, :5], resumed)
        rest = torch.stack([model.step(tokens[:, t], resumed) for t in range(5, 8)], dim=1)
        assert_rel_close(f"{spec.name}: prefill + decode", torch.cat([prompt, rest], 1), full,
                         "float32")
    assert full.shape == (2, 8, 40) and torch.isfinite(full).all()


def test_sliding_window_state_stays_bounded(seed):
    model = _model(SAMBA, seed)
    state = model.allocate_state(1)
    before = state.nbytes()
    with torch.no_grad():
        model(torch.randint(0, 40, (1, 20)), state)
        for t in range(5):
            model.step(torch.tensor([t]), state)
    assert state.nbytes() == before


def _attention_by_definition(x, attn: Attention):
    """softmax(q k^T / sqrt(d)) v per query position, over the keys the mask allows."""
    b, s, _ = x.shape
    hd, rep = attn.head_dim, attn.heads // attn.kv_heads
    q = (x @ attn.q_proj.weight.T).reshape(b, s, attn.heads, hd)
    k = (x @ attn.k_proj.weight.T).reshape(b, s, attn.kv_heads, hd)
    v = (x @ attn.v_proj.weight.T).reshape(b, s, attn.kv_heads, hd)
    out = torch.zeros(b, s, attn.heads, hd, dtype=x.dtype)
    for i in range(s):
        lo = 0 if attn.window is None else max(0, i - attn.window + 1)
        for h in range(attn.heads):
            scores = (k[:, lo:i + 1, h // rep] @ q[:, i, h, :, None])[..., 0] / math.sqrt(hd)
            out[:, i, h] = (torch.softmax(scores, -1)[..., None] * v[:, lo:i + 1, h // rep]).sum(1)
    return out.reshape(b, s, -1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (4, 2, None), (4, 1, 3)])
def test_attention_matches_its_definition(heads, kv_heads, window, seed):
    torch.manual_seed(seed)
    attn = Attention(16, heads, kv_heads, window=window).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close("attention", attn(x), _attention_by_definition(x, attn), "float64")


def test_moe_matches_its_definition(seed):
    torch.manual_seed(seed)
    moe = MoE(8, experts=5, top_k=2, hidden=12).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    expected = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(3):
            for j in range(4):
                probs = torch.softmax(moe.router(x[i, j]), -1)
                top = probs.topk(2)
                for w, e in zip(top.values / top.values.sum(), top.indices):
                    ex = moe.experts[int(e)]
                    expected[i, j] += w * ex.down_proj(F.silu(ex.gate_proj(x[i, j])) * ex.up_proj(x[i, j]))
        assert_rel_close("moe", moe(x), expected, "float64")


SPEC_TEXT = """
ssm Small {
  dims       channels = 16, state = 4, groups = 1
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per channel
  gate       silu(z)
  discretize exp_euler
  compute    scan
}

model Tiny {
  dims   d_model = 8, vocab = 30
  norm   rmsnorm
  layers [Small, mlp(hidden = 16), attention(heads = 2, kv_heads = 1), moe(experts = 3, top_k = 1, hidden = 8)] x 2
}
"""


def test_model_from_spec_text(seed):
    model = Model(SPEC_TEXT, target="reference")
    kinds = [type(layer.mixer).__name__ for layer in model.layers]
    assert kinds == ["SSMLayer", "MLP", "Attention", "MoE"] * 2
    assert model.vocab == 30
    assert model.lm_head.weight is model.backbone.embeddings.weight
    tokens = torch.randint(0, 30, (1, 6))
    with torch.no_grad():
        full = model(tokens)
        state = model.allocate_state(1)
        steps = torch.stack([model.step(tokens[:, t], state) for t in range(6)], dim=1)
        assert_rel_close("spec model steps", steps, full, "float32")
        generated = model.generate(tokens[:, :3], max_new_tokens=4)
    assert generated.shape == (1, 7) and torch.equal(generated[:, :3], tokens[:, :3])


def test_model_errors_name_the_problem():
    with pytest.raises(SSMCError, match="family 'Nope'"):
        Model(ModelSpec("M", 8, (SSMBlock("Nope"),), vocab=10))
    with pytest.raises(SSMCError, match="no vocab"):
        Model(ModelSpec("M", 8, (MLPBlock(),)))
    with pytest.raises(SSMCError, match="multiple of kv_heads"):
        Model(ModelSpec("M", 8, (AttentionBlock(heads=4, kv_heads=3),), vocab=10))
