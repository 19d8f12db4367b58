"""`ssmc show memory`: state bytes of hybrid layouts, checked against hand counts."""
from conftest import EXAMPLES
from families import mamba1, mamba2, s5
from ssmc.ir import AttentionBlock, MLPBlock, ModelSpec, Repeat, SSMBlock
from ssmc.runtime.memory import parse_contexts, ssm_layer_bytes, state_bytes

KIB = 1024


def test_context_lengths_parse():
    assert parse_contexts("1k,32k,1M") == [1024, 32 * 1024, 1024 ** 2]
    assert parse_contexts("100, 2.5k") == [100, 2560]


def test_hybrid_state_by_hand():
    m2 = mamba2(heads=4, head_dim=8, state=16, groups=2)
    spec = ModelSpec("H", d_model=64, vocab=10, layout=(
        Repeat((SSMBlock("Mamba2"), SSMBlock("Mamba2"), MLPBlock(),
                AttentionBlock(heads=8, kv_heads=2)), 3),
        AttentionBlock(heads=8, kv_heads=8, head_dim=4, window=100)))
    report = state_bytes(spec, 1000, "bf16", families=[m2])
    # Mamba-2 layer: conv over x, B, C = 32 + 2*2*16 = 96 channels x 4 taps x 2 bytes; SSM state
    # 4 heads x 8 x 16 fp32.
    ssm_layer = 96 * 4 * 2 + 4 * 8 * 16 * 4
    full_attention = 2 * 2 * (64 // 8) * 1000 * 2      # K and V, kv_heads, head_dim, tokens, bf16
    window_attention = 2 * 8 * 4 * 100 * 2              # capped at the window
    assert report["ssm"] == 6 * ssm_layer
    assert report["attention"] == 3 * full_attention + window_attention
    assert report["total"] == report["ssm"] + report["attention"]
    longer = state_bytes(spec, 8000, "bf16", families=[m2])
    assert longer["ssm"] == report["ssm"]
    assert longer["attention"] == 3 * full_attention * 8 + window_attention
    kinds = {k: v["count"] for k, v in report["kinds"].items()}
    assert sum(kinds.values()) == len(spec.blocks())


def test_state_dtype_and_complex_states():
    assert ssm_layer_bytes(mamba1(channels=16, state=4), "fp32") == {"conv": 16 * 4 * 4,
                                                                     "ssm": 16 * 4 * 4}
    assert ssm_layer_bytes(s5(channels=16, state=4), "fp32")["ssm"] == 16 * 4 * 8


def test_the_model_allocates_what_the_report_says():
    import torch
    from ssmc.runtime.models import Model
    m1 = mamba1(channels=16, state=4, name="M1")
    spec = ModelSpec("Small", d_model=8, vocab=10, layout=(
        SSMBlock("M1"), AttentionBlock(heads=2, kv_heads=1, window=5), MLPBlock(hidden=8)))
    model = Model(spec, families=[m1])
    state = model.allocate_state(1)
    with torch.no_grad():
        model(torch.zeros(1, 9, dtype=torch.long), state)
    assert state.nbytes() == state_bytes(spec, 9, "fp32", families=[m1])["total"]


def test_cli_on_the_examples(tmp_path, capsys):
    from ssmc.cli import main
    assert main(["show", "memory", str(EXAMPLES / "jamba.ssm"), "--context", "1k,1M"]) == 0
    out = capsys.readouterr().out
    # jamba.ssm: 28 Mamba layers (8192 channels, state 16) and 4 attention layers (8 kv heads of
    # 128): SSM 28 * (8192*4*2 + 8192*16*4) bytes = 15.8 MiB; KV at 1k = 4 * 2*8*128*1024*2 = 16 MiB.
    assert "15.8 MiB" in out and "16.0 MiB" in out and "16.0 GiB" in out
    assert main(["show", "memory", str(EXAMPLES / "samba.ssm"), "--context", "1k,1M",
                 "--plot", str(tmp_path / "samba.png")]) == 0
    out = capsys.readouterr().out
    # SWA window 2048 caps the 9 attention layers at 9 * 2*18*128*2048*2 bytes = 162 MiB.
    assert "162.0 MiB" in out and "wrote" in out
    assert list(tmp_path.glob("samba.*"))
