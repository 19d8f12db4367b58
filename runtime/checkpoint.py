"""Hugging Face Mamba / Mamba-2 checkpoints in and out of ``SSMLayer`` and ``Model``.

The HF layouts (``state-spaces/mamba-*-hf`` and ``mamba2``)::

    backbone.embeddings.weight                       (vocab, d_model)
    backbone.layers.N.norm.weight                    (d_model,)
    backbone.layers.N.mixer.A_log                    Mamba: (d_inner, n)   Mamba-2: (heads,)
    backbone.layers.N.mixer.D                        Mamba: (d_inner,)     Mamba-2: (heads,)
    backbone.layers.N.mixer.conv1d.{weight,bias}     (conv_dim, 1, d_conv), (conv_dim,)
    backbone.layers.N.mixer.in_proj.weight           Mamba: (2 d_inner, d)  Mamba-2: (d_inner + conv_dim + heads, d)
    backbone.layers.N.mixer.x_proj.weight            Mamba: (dt_rank + 2n, d_inner)
    backbone.layers.N.mixer.dt_proj.{weight,bias}    Mamba: (d_inner, dt_rank), (d_inner,)
    backbone.layers.N.mixer.dt_bias                  Mamba-2: (heads,)
    backbone.layers.N.mixer.norm.weight              Mamba-2: (d_inner,)
    backbone.layers.N.mixer.out_proj.weight          (d_model, d_inner)
    backbone.norm_f.weight, lm_head.weight           (lm_head absent when tied to the embeddings)

``SSMLayer`` and ``Model`` use these names already, so loading is matching names and checking
shapes, with an error naming every missing, unexpected or misshapen tensor.
``safetensors`` is used when installed; otherwise a small reader/writer of the same format.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ssmc.errors import SSMCError
from ssmc.ir import (Algorithm, ASpec, AStructure, BCSpec, ComputeSpec, DeltaSpec, Dims, DSpec,
                     GateSpec, Method, ModelSpec, Sharing, SSMBlock, SSMFamily)

StateDict = Dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------
# safetensors files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: os.PathLike) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        return _read_safetensors_plain(Path(path))
    return load_file(str(path))


def write_safetensors(tensors: StateDict, path: os.PathLike, metadata: Optional[dict] = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        return _write_safetensors_plain(tensors, Path(path), metadata)
    save_file(tensors, str(path), metadata=metadata)


def _read_safetensors_plain(path: Path) -> StateDict:
    """The format: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = memoryview(data)[8 + length:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = _DTYPES[meta["dtype"]]
        if end == start:
            out[name] = torch.empty(meta["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype)
        out[name] = flat.reshape(meta["shape"])
    return out


def _write_safetensors_plain(tensors: StateDict, path: Path, metadata: Optional[dict]):
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the format aligns the data to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_checkpoint(path: os.PathLike) -> StateDict:
    """A state dict from a .safetensors file, a sharded index, a .bin, or a directory of them."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).exists():
                return read_checkpoint(path / name)
        raise SSMCError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: StateDict = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_safetensors(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise SSMCError(f"{path}: not a checkpoint (.safetensors, .index.json, .bin)")


# --------------------------------------------------------------------------------------------
# Loading into modules

def _select_layer(state_dict: StateDict, module: nn.Module, layer: Optional[int]) -> StateDict:
    """For an SSMLayer: the mixer's tensors, from a bare, ``mixer.``-prefixed or full-model dict."""
    from .modules import SSMLayer
    if not isinstance(module, SSMLayer):
        return state_dict
    own = set(module.state_dict())
    if own & set(state_dict):
        return state_dict
    prefixes = ["mixer."]
    if layer is not None:
        prefixes.insert(0, f"backbone.layers.{layer}.mixer.")
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked
    if any(k.startswith("backbone.layers.") for k in state_dict):
        raise SSMCError("this is a whole-model checkpoint: say which layer to load with layer=N")
    return state_dict


def load_into(module: nn.Module, checkpoint: Union[os.PathLike, str, StateDict],
              strict: bool = True, layer: Optional[int] = None) -> nn.Module:
    """Load an HF-layout checkpoint (path or state dict) into a Model or an SSMLayer.

    Shapes must match exactly; with ``strict`` every tensor of the module must be present and
    no tensor of the checkpoint left over (a tied ``lm_head.weight`` may be absent).
    """
    state_dict = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    state_dict = _select_layer(state_dict, module, layer)
    own = module.state_dict()
    tied = getattr(module, "tie_embeddings", False)
    problems = []
    for name, tensor in state_dict.items():
        if name not in own:
            if strict:
                problems.append(f"unexpected tensor {name} {tuple(tensor.shape)}")
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            problems.append(f"{name}: checkpoint has shape {tuple(tensor.shape)}, the module "
                            f"expects {tuple(own[name].shape)}")
        elif tensor.is_complex() != own[name].is_complex():
            problems.append(f"{name}: complex in one and real in the other")
    if strict:
        for name in own:
            if name not in state_dict and not (tied and name == "lm_head.weight"):
                problems.append(f"missing tensor {name} {tuple(own[name].shape)}")
    if problems:
        what = type(module).__name__
        raise SSMCError(f"checkpoint does not fit this {what}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name in own:
                own[name].copy_(tensor.to(own[name].dtype))
    return module


def export_state_dict(module: nn.Module) -> StateDict:
    """The module's tensors under their HF names (a tied lm_head is left out, as HF saves it)."""
    out = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if getattr(module, "tie_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def save(module: nn.Module, path: os.PathLike) -> Path:
    """Write ``module`` as HF-layout safetensors. A directory path gets model.safetensors, plus an
    HF config.json when the module is a pure Mamba / Mamba-2 model (see hf_config)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        config = hf_config(module)
        if config is not None:
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        path = path / "model.safetensors"
    write_safetensors(export_state_dict(module), path, metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# HF configs <-> specs

def _no_limit(limit) -> bool:
    return limit is None or (float(limit[0]) <= 0.0 and math.isinf(float(limit[1])))


def family_from_hf_config(config: dict) -> SSMFamily:
    """The SSM family of an HF ``MambaConfig`` (model_type mamba) or ``Mamba2Config`` (mamba2)."""
    kind = config.get("model_type", "mamba")
    d_model = config["hidden_size"]
    n = config["state_size"]
    selective = dict(selective=True, sharing=Sharing.GROUP)
    if kind == "mamba":
        d_inner = config.get("intermediate_size") or config.get("expand", 2) * d_model
        return SSMFamily(
            name="Mamba", dims=Dims(state=n, channels=d_inner),
            A=ASpec(AStructure.DIAGONAL), delta=DeltaSpec(selective=True, softplus=True, bias=True),
            B=BCSpec(**selective), C=BCSpec(**selective), D=DSpec(Sharing.HEAD), gate=GateSpec(),
            method=Method.EXP_EULER, compute=ComputeSpec(Algorithm.SCAN))
    if kind == "mamba2":
        heads = config["num_heads"]
        limit = config.get("time_step_limit")
        return SSMFamily(
            name="Mamba2", dims=Dims(state=n, heads=heads, head_dim=config["head_dim"],
                                     groups=config.get("n_groups", 1)),
            A=ASpec(AStructure.SCALAR),
            delta=DeltaSpec(selective=True, softplus=True, bias=True,
                            clamp=None if _no_limit(limit) else (float(limit[0]), float(limit[1]))),
            B=BCSpec(**selective), C=BCSpec(**selective), D=DSpec(Sharing.HEAD), gate=GateSpec(),
            method=Method.EXP_EULER,
            compute=ComputeSpec(Algorithm.CHUNKED, chunk_size=config.get("chunk_size", 256)))
    raise SSMCError(f"unsupported model_type {kind!r} in config.json (mamba, mamba2)")


def model_from_hf_config(config: dict) -> Tuple[ModelSpec, SSMFamily, dict]:
    """(ModelSpec, family, Model keyword options) for an HF Mamba / Mamba-2 config."""
    family = family_from_hf_config(config)
    spec = ModelSpec(name=config.get("model_type", "mamba"), d_model=config["hidden_size"],
                     layout=tuple(SSMBlock(family.name) for _ in range(config["num_hidden_layers"])),
                     vocab=config["vocab_size"])
    ssm = {"d_conv": config.get("conv_kernel", 4), "bias": config.get("use_bias", False),
           "conv_bias": config.get("use_conv_bias", True),
           "norm_eps": config.get("layer_norm_epsilon", 1e-5)}
    if config.get("model_type", "mamba") == "mamba":
        rank = config.get("time_step_rank", "auto")
        ssm["dt_rank"] = "auto" if rank in (None, "auto") else int(rank)
    options = {"norm_eps": config.get("layer_norm_epsilon", 1e-5), "ssm_options": ssm,
               "tie_embeddings": config.get("tie_word_embeddings",
                                            config.get("model_type", "mamba") == "mamba")}
    return spec, family, options


def hf_config(module: nn.Module) -> Optional[dict]:
    """An HF config.json for a Model whose layers are all one Mamba or Mamba-2 family."""
    from .models import Model
    if not isinstance(module, Model):
        return None
    mixers = [layer.mixer for layer in module.layers]
    families = {getattr(m, "family", None) for m in mixers}
    if len(families) != 1 or None in families:
        return None
    first = mixers[0]
    fam = first.family
    base = {"hidden_size": module.spec.d_model, "state_size": fam.dims.state,
            "num_hidden_layers": len(mixers), "vocab_size": module.vocab,
            "conv_kernel": first.d_conv, "use_bias": first.in_proj.bias is not None,
            "use_conv_bias": first.d_conv > 0 and first.conv1d.bias is not None,
            "layer_norm_epsilon": module.backbone.norm_f.eps,
            "tie_word_embeddings": module.tie_embeddings}
    if first.is_ssd:
        clamp = fam.delta.clamp
        return dict(base, model_type="mamba2", architectures=["Mamba2ForCausalLM"],
                    num_heads=fam.dims.heads, head_dim=fam.dims.head_dim, n_groups=fam.dims.groups,
                    expand=fam.dims.d_inner / module.spec.d_model,
                    chunk_size=fam.compute.chunk_size or 256,
                    time_step_limit=list(clamp) if clamp else [0.0, float("inf")])
    return dict(base, model_type="mamba", architectures=["MambaForCausalLM"],
                intermediate_size=fam.dims.d_inner, time_step_rank=first.dt_rank,
                expand=fam.dims.d_inner // module.spec.d_model)


def load_pretrained(path: os.PathLike, target: str = "reference", **options):
    """A Model from an HF checkpoint directory: config.json gives the family and the layout."""
    from .models import Model
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise SSMCError(f"{path}: no config.json (an HF Mamba / Mamba-2 checkpoint directory)")
    spec, family, defaults = model_from_hf_config(json.loads(config_path.read_text()))
    defaults.update(options)
    model = Model(spec, target=target, families=[family], **defaults)
    return load_into(model, path)


__all__ = ["read_checkpoint", "read_safetensors", "write_safetensors", "load_into", "save",
           "export_state_dict", "family_from_hf_config", "model_from_hf_config", "hf_config",
           "load_pretrained"]
