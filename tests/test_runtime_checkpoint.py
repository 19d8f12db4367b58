"""HF Mamba / Mamba-2 checkpoints: made here with the HF key layout, loaded into Model and
SSMLayer, checked against the block equations (test_runtime_modules), exported back."""
import json

import pytest
import torch

from conftest import assert_rel_close
from ssmc.errors import SSMCError
from ssmc.runtime import checkpoint
from ssmc.runtime.models import Model
from ssmc.runtime.modules import SSMLayer
from test_runtime_modules import mamba1_block_math, mamba2_block_math

MAMBA_CONFIG = {"model_type": "mamba", "hidden_size": 8, "state_size": 4, "intermediate_size": 16,
                "conv_kernel": 4, "time_step_rank": 2, "num_hidden_layers": 2, "vocab_size": 20,
                "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True,
                "tie_word_embeddings": True}
MAMBA2_CONFIG = {"model_type": "mamba2", "hidden_size": 8, "state_size": 4, "num_heads": 4,
                 "head_dim": 4, "n_groups": 2, "expand": 2, "conv_kernel": 4, "chunk_size": 4,
                 "num_hidden_layers": 2, "vocab_size": 20, "layer_norm_epsilon": 1e-5,
                 "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": False,
                 "time_step_limit": [0.0, float("inf")]}


def _hf_tensors(config, seed):
    """A random checkpoint with exactly the HF key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    d, n, k, L = config["hidden_size"], config["state_size"], config["conv_kernel"], config["num_hidden_layers"]
    out = {"backbone.embeddings.weight": r(config["vocab_size"], d, s=1.0),
           "backbone.norm_f.weight": 1 + r(d, s=0.1)}
    for i in range(L):
        pre = f"backbone.layers.{i}."
        out[pre + "norm.weight"] = 1 + r(d, s=0.1)
        m = pre + "mixer."
        if config["model_type"] == "mamba":
            di, R = config["intermediate_size"], config["time_step_rank"]
            out.update({m + "A_log": torch.log(torch.arange(1, n + 1.0)).repeat(di, 1) + r(di, n, s=0.1),
                        m + "D": 1 + r(di), m + "in_proj.weight": r(2 * di, d),
                        m + "conv1d.weight": r(di, 1, k), m + "conv1d.bias": r(di),
                        m + "x_proj.weight": r(R + 2 * n, di), m + "dt_proj.weight": r(di, R),
                        m + "dt_proj.bias": r(di, s=0.5) - 2, m + "out_proj.weight": r(d, di)})
        else:
            h, p, grp = config["num_heads"], config["head_dim"], config["n_groups"]
            di = h * p
            conv_dim = di + 2 * grp * n
            out.update({m + "A_log": r(h, s=0.5), m + "D": 1 + r(h), m + "dt_bias": r(h, s=0.5) - 2,
                        m + "in_proj.weight": r(di + conv_dim + h, d),
                        m + "conv1d.weight": r(conv_dim, 1, k), m + "conv1d.bias": r(conv_dim),
                        m + "norm.weight": 1 + r(di, s=0.1), m + "out_proj.weight": r(d, di)})
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = r(config["vocab_size"], d)
    return out


def _save_file(tensors, path):
    try:
        from safetensors.torch import save_file
    except ImportError:   # the runtime's own writer of the format stands in
        return checkpoint._write_safetensors_plain(tensors, path, None)
    save_file(tensors, str(path))


def _load_file(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        return checkpoint._read_safetensors_plain(path)
    return load_file(str(path))


def _save_hf(tmp_path, config, tensors):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _rmsnorm(x, w, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _model_math(tokens, t, config):
    """Logits of the HF model from its tensors and the block equations (float64)."""
    t = {k: v.double() for k, v in t.items()}
    h = t["backbone.embeddings.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        pre = f"backbone.layers.{i}."
        mixer = {k[len(pre + "mixer."):]: v for k, v in t.items() if k.startswith(pre + "mixer.")}
        x = _rmsnorm(h, t[pre + "norm.weight"])
        if config["model_type"] == "mamba":
            out = mamba1_block_math(x, mixer, config["state_size"], config["time_step_rank"])
        else:
            out = mamba2_block_math(x, mixer, config["num_heads"], config["head_dim"],
                                    config["state_size"], config["n_groups"])
        h = h + out
    head = t.get("lm_head.weight", t["backbone.embeddings.weight"])
    return _rmsnorm(h, t["backbone.norm_f.weight"]) @ head.T


@pytest.mark.parametrize("config", [MAMBA_CONFIG, MAMBA2_CONFIG], ids=["mamba", "mamba2"])
def test_hf_checkpoint_loads_computes_and_exports(tmp_path, config, seed):
    tensors = _hf_tensors(config, seed)
    folder = _save_hf(tmp_path / "hf", config, tensors)
    model = Model.from_pretrained(folder, target="reference")
    tokens = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(tokens[None])[0]
    assert_rel_close("logits", logits, _model_math(tokens, tensors, config), "float32")

    written = checkpoint.save(model, tmp_path / "out")
    back = _load_file(written)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(back[name], value), name
    config_back = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("model_type", "hidden_size", "state_size", "num_hidden_layers", "vocab_size",
                "conv_kernel", "tie_word_embeddings"):
        assert config_back[key] == config[key], key
    again = Model.from_pretrained(tmp_path / "out", target="reference")
    with torch.no_grad():
        assert_rel_close("reloaded", again(tokens[None])[0], logits, "float32", tol=0)


def test_one_layer_of_a_checkpoint_into_an_ssmlayer(tmp_path, seed):
    tensors = _hf_tensors(MAMBA_CONFIG, seed)
    folder = _save_hf(tmp_path, MAMBA_CONFIG, tensors)
    family = checkpoint.family_from_hf_config(MAMBA_CONFIG)
    layer = SSMLayer(family, d_model=8, dt_rank=2)
    with pytest.raises(SSMCError, match="layer=N"):
        checkpoint.load_into(layer, folder)
    checkpoint.load_into(layer, folder, layer=1)
    mixer = {k[len("backbone.layers.1.mixer."):]: v for k, v in tensors.items()
             if k.startswith("backbone.layers.1.mixer.")}
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_rel_close("layer 1", layer(x[None])[0], mamba1_block_math(x, mixer, 4, 2), "float32")
    # A mixer-only dict loads as it is.
    fresh = SSMLayer(family, d_model=8, dt_rank=2)
    checkpoint.load_into(fresh, mixer)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in mixer.items())


def test_mismatches_are_named(tmp_path, seed):
    tensors = _hf_tensors(MAMBA_CONFIG, seed)
    model = Model.from_pretrained(_save_hf(tmp_path, MAMBA_CONFIG, tensors))
    broken = dict(tensors)
    broken["backbone.layers.0.mixer.D"] = torch.ones(17)
    del broken["backbone.layers.1.mixer.A_log"]
    broken["backbone.layers.0.mixer.extra"] = torch.ones(1)
    with pytest.raises(SSMCError) as info:
        checkpoint.load_into(model, broken)
    text = str(info.value)
    assert "backbone.layers.0.mixer.D: checkpoint has shape (17,)" in text
    assert "missing tensor backbone.layers.1.mixer.A_log" in text
    assert "unexpected tensor backbone.layers.0.mixer.extra" in text


def test_plain_safetensors_format_matches_the_library(tmp_path, seed):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4)}
    checkpoint._write_safetensors_plain(tensors, tmp_path / "plain.safetensors", {"format": "pt"})
    by_library = load_file(str(tmp_path / "plain.safetensors"))
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    by_plain = checkpoint._read_safetensors_plain(tmp_path / "lib.safetensors")
    for name, value in tensors.items():
        assert torch.equal(by_library[name], value) and by_library[name].dtype == value.dtype
        assert torch.equal(by_plain[name], value) and by_plain[name].dtype == value.dtype


def test_family_from_hf_config_reads_the_clamp_and_chunk():
    fam = checkpoint.family_from_hf_config(dict(MAMBA2_CONFIG, time_step_limit=[0.001, 0.1],
                                                chunk_size=128))
    assert fam.delta.clamp == (0.001, 0.1) and fam.compute.chunk_size == 128
    assert fam.dims.heads == 4 and fam.dims.groups == 2
    assert checkpoint.family_from_hf_config(MAMBA2_CONFIG).delta.clamp is None
    with pytest.raises(SSMCError, match="model_type"):
        checkpoint.family_from_hf_config({"model_type": "llama", "hidden_size": 8, "state_size": 4})
