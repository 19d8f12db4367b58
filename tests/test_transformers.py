"""Hugging Face transformers' own Mamba-family models with ssmc kernels in place of their kernel
path (``ssmc.integrations.transformers``): small random-weight configs built here (no hub), on
the cpu target (and on cuda with SSMC_TEST_CUDA=1). Logits and greedy ``generate()`` tokens
must equal the model's own torch path, and the ssmc kernels must have served the prefill scan
and every decode step (``calls``)."""

import pytest
import torch

from conftest import ON_CUDA, TOL, rel_err, require_cuda_device, require_target_tools

transformers = pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
require_cuda_device()

import ssmc.integrations.transformers as ssmc_hf  # noqa: E402

CONFIGS = {  # model class -> config keywords: two or three layers, widths no example names
    "MambaForCausalLM": ("MambaConfig", dict(
        vocab_size=96, hidden_size=48, state_size=12, num_hidden_layers=2, conv_kernel=4,
        expand=2)),
    "FalconMambaForCausalLM": ("FalconMambaConfig", dict(
        vocab_size=96, hidden_size=48, state_size=12, num_hidden_layers=2, conv_kernel=4,
        expand=2)),
    "JambaForCausalLM": ("JambaConfig", dict(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=12, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=128)),
    "Mamba2ForCausalLM": ("Mamba2Config", dict(
        vocab_size=96, hidden_size=48, state_size=16, num_hidden_layers=2, num_heads=6,
        head_dim=16, n_groups=2, expand=2, conv_kernel=4, chunk_size=16)),
    "BambaForCausalLM": ("BambaConfig", dict(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=6,
        mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=16, max_position_embeddings=128)),
}
TARGETS = ["cpu"] + (["cuda"] if ON_CUDA else [])


def _model(name, device, seed):
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config_name, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, name)(config).to(device).eval()


@pytest.fixture
def ssmc_kernels():
    """enable() for a test, disable() after it, whatever happens."""
    enabled = []

    def enable(target):
        enabled.append(ssmc_hf.enable(target))
        return enabled[-1]
    yield enable
    ssmc_hf.disable()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("target", TARGETS)
def test_model_logits_and_generate_match_its_own_path(target, name, seed, ssmc_kernels):
    require_target_tools(target)
    device = "cuda" if target == "cuda" else "cpu"
    model = _model(name, device, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 21), generator=gen).to(device)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)

        ssmc_kernels(target)
        ssmc_hf.calls.clear()
        logits_ssmc = model(ids).logits
        prefill = sum(ssmc_hf.calls[k] for k in ("selective_scan", "chunk_scan"))
        assert prefill > 0, "the forward never reached an ssmc kernel"
        tokens_ssmc = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert ssmc_hf.calls["state_update"] > 0, "generate() never ran the ssmc decode step"
    assert rel_err(logits_ssmc, logits) <= 10 * TOL["float32"]
    assert torch.equal(tokens_ssmc, tokens), f"{tokens_ssmc.tolist()} != {tokens.tolist()}"


def test_disable_restores_transformers_own_functions():
    from transformers.models.mamba import modeling_mamba
    own = modeling_mamba.mamba_selective_scan
    ssmc_hf.enable("reference")
    assert modeling_mamba.mamba_selective_scan is not own
    assert modeling_mamba.mamba_inner_fn() is None
    ssmc_hf.disable()
    assert modeling_mamba.mamba_selective_scan is own
