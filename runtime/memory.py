"""``ssmc show memory``: inference-state bytes per sequence of a hybrid layout, by context.

What a decoding server keeps per sequence: each SSM layer a conv state (the last d_conv inputs
of its conv channels) and an SSM state (d_inner x n, fp32), both constant in the context; each
attention layer a KV cache of 2 * kv_heads * head_dim * tokens values, where a sliding-window
layer stops growing at its window. MLP and MoE layers keep nothing. The numbers are what
``Model.allocate_state`` allocates.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Optional, Sequence

from ssmc.errors import SSMCError
from ssmc.ir import (AStructure, AttentionBlock, DType, MLPBlock, MoEBlock, SSMBlock,
                     SSMFamily)

_BYTES = {"fp64": 8, "float64": 8, "fp32": 4, "float32": 4, "fp16": 2, "float16": 2,
          "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
_STATE_BYTES = {DType.FLOAT64: 8, DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2}


def dtype_bytes(dtype: str) -> int:
    try:
        return _BYTES[dtype.lower()]
    except KeyError:
        raise SSMCError(f"unknown dtype {dtype!r} (one of {', '.join(sorted(_BYTES))})") from None


def parse_contexts(text: str) -> List[int]:
    """'1k,32k,1M' -> [1024, 32768, 1048576] (k = 1024, M = 1024^2)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)", part)
        if not match:
            raise SSMCError(f"bad context length {part!r}: expected a number with an optional "
                            "k or M suffix, e.g. 1k,32k,1M")
        scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[match.group(2).lower()]
        out.append(int(float(match.group(1)) * scale))
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def ssm_layer_bytes(family: SSMFamily, dtype: str = "bf16", d_conv: int = 4) -> Dict[str, int]:
    """Conv and SSM state bytes of one SSMLayer of ``family`` (as SSMLayer allocates them)."""
    d_inner, n, g = family.dims.d_inner, family.dims.state, family.dims.groups
    if family.A.structure is AStructure.SCALAR:
        conv_dim = d_inner + g * n * (int(family.B.selective) + int(family.C.selective))
    else:
        conv_dim = d_inner
    state_elem = _STATE_BYTES[family.dtypes.state]
    if family.A.structure is AStructure.COMPLEX_DIAGONAL:
        state_elem *= 2
    return {"conv": conv_dim * d_conv * dtype_bytes(dtype), "ssm": d_inner * n * state_elem}


def attention_layer_bytes(block: AttentionBlock, d_model: int, context: int, dtype: str = "bf16") -> int:
    head_dim = block.head_dim or d_model // block.heads
    tokens = min(context, block.window) if block.window else context
    return 2 * block.kv_heads * head_dim * tokens * dtype_bytes(dtype)


def _kind(block, families: Dict[str, SSMFamily], d_model: int) -> str:
    if isinstance(block, SSMBlock):
        fam = families[block.family]
        return f"ssm {fam.name} (d_inner {fam.dims.d_inner}, state {fam.dims.state})"
    if isinstance(block, AttentionBlock):
        head_dim = block.head_dim or d_model // block.heads
        window = f", window {block.window}" if block.window else ""
        return f"attention ({block.heads} heads, {block.kv_heads} kv, head_dim {head_dim}{window})"
    if isinstance(block, MoEBlock):
        return "moe (no state)"
    if isinstance(block, MLPBlock):
        return "mlp (no state)"
    return type(block).__name__  # pragma: no cover


def state_bytes(model_spec, context: int, dtype: str = "bf16", *, families=None,
                model: Optional[str] = None, d_conv: int = 4) -> dict:
    """Inference-state bytes per sequence at ``context`` tokens.

    ``model_spec``: a ModelSpec (with ``families`` naming its SSM families), a SpecFile, or a
    spec path/text. Returns {"context", "dtype", "kinds": {label: {"count", "bytes_per_layer",
    "bytes", "grows"}}, "ssm", "attention", "total"} (bytes).
    """
    from .models import resolve_model
    spec, known = resolve_model(model_spec, model, families)
    kinds: Dict[str, dict] = {}
    totals = {"ssm": 0, "attention": 0}
    for block in spec.blocks():
        label = _kind(block, known, spec.d_model)
        if isinstance(block, SSMBlock):
            parts = ssm_layer_bytes(known[block.family], dtype, d_conv)
            per_layer, grows, group = parts["conv"] + parts["ssm"], False, "ssm"
        elif isinstance(block, AttentionBlock):
            per_layer = attention_layer_bytes(block, spec.d_model, context, dtype)
            grows = not block.window or context < block.window
            group = "attention"
        else:
            per_layer, grows, group = 0, False, None
        row = kinds.setdefault(label, {"count": 0, "bytes_per_layer": per_layer, "bytes": 0,
                                       "grows": grows})
        row["count"] += 1
        row["bytes"] += per_layer
        if group:
            totals[group] += per_layer
    return {"model": spec.name, "context": context, "dtype": dtype, "kinds": kinds,
            "ssm": totals["ssm"], "attention": totals["attention"],
            "total": totals["ssm"] + totals["attention"]}


def table(model_spec, contexts: Sequence[int], dtype: str = "bf16", **options) -> str:
    reports = [state_bytes(model_spec, c, dtype, **options) for c in contexts]
    first = reports[0]
    labels = list(first["kinds"])
    width = max(len(label) for label in labels + ["total per sequence"]) + 2
    heads = [_context_label(c) for c in contexts]
    lines = [f"model {first['model']}: inference state per sequence (activations {dtype}, "
             "SSM states in the family's state dtype)",
             f"{'layer kind':<{width}}{'layers':>7}" + "".join(f"{h:>14}" for h in heads)]
    for label in labels:
        row = first["kinds"][label]
        cells = "".join(f"{human(r['kinds'][label]['bytes']):>14}" for r in reports)
        lines.append(f"{label:<{width}}{row['count']:>7}{cells}")
    lines.append(f"{'  of which SSM (constant)':<{width}}{'':>7}"
                 + "".join(f"{human(r['ssm']):>14}" for r in reports))
    lines.append(f"{'  of which KV cache':<{width}}{'':>7}"
                 + "".join(f"{human(r['attention']):>14}" for r in reports))
    lines.append(f"{'total per sequence':<{width}}{'':>7}"
                 + "".join(f"{human(r['total']):>14}" for r in reports))
    return "\n".join(lines)


def _context_label(c: int) -> str:
    for suffix, scale in (("M", 1024 ** 2), ("k", 1024)):
        if c >= scale and c % scale == 0:
            return f"{c // scale}{suffix}"
    return str(c)


def plot(model_spec, contexts: Sequence[int], path, dtype: str = "bf16", stream=None, **options):
    """Bytes per sequence against context (log-log): SSM, KV cache, total. Without matplotlib,
    a CSV next to ``path`` instead (and a note on ``stream``)."""
    import numpy as np
    from pathlib import Path
    stream = stream or sys.stderr
    path = Path(path)
    lo, hi = min(contexts), max(contexts)
    sweep = sorted(set(int(x) for x in np.geomspace(max(1, lo), max(hi, lo + 1), 64)) | set(contexts))
    reports = [state_bytes(model_spec, c, dtype, **options) for c in sweep]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        csv_path = path.with_suffix(".csv")
        with open(csv_path, "w") as f:
            f.write("context,ssm_bytes,attention_bytes,total_bytes\n")
            for r in reports:
                f.write(f"{r['context']},{r['ssm']},{r['attention']},{r['total']}\n")
        stream.write(f"matplotlib is not installed: wrote {csv_path} instead of {path} "
                     "(pip install matplotlib for the plot)\n")
        return csv_path
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("total", "total"), ("attention", "attention KV cache"),
                       ("ssm", "SSM states (constant)")):
        values = [max(r[key], 1) for r in reports]
        ax.plot(sweep, values, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("bytes per sequence")
    ax.set_title(f"{reports[0]['model']}: inference state per sequence ({dtype})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args) -> int:
    """Entry of ``ssmc show memory SPEC --context ... [--model NAME] [--plot out.png]``."""
    from ssmc.api import parse
    spec_file = parse(args.spec)
    contexts = parse_contexts(args.context)
    dtype = getattr(args, "dtype", None) or "bf16"
    options = {"model": getattr(args, "model", None)}
    print(table(spec_file, contexts, dtype, **options))
    if getattr(args, "plot", None):
        written = plot(spec_file, contexts, args.plot, dtype, **options)
        print(f"wrote {written}")
    return 0


__all__ = ["state_bytes", "table", "plot", "main", "parse_contexts", "ssm_layer_bytes",
           "attention_layer_bytes"]
