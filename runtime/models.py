"""``Model``: a hybrid language model built from a ``ModelSpec`` layout.

Every block of ``ModelSpec.blocks()`` becomes one pre-norm residual layer ``h += mixer(norm(h))``:
SSM blocks are ``SSMLayer`` s of their family, attention goes through
``torch.nn.functional.scaled_dot_product_attention`` (causal, grouped-query through ``kv_heads``,
a sliding window through a mask), MLP blocks are SwiGLU, MoE blocks route each token to its
top-k SwiGLU experts. Embeddings in front; final norm and LM head behind. Module names follow
Hugging Face's Mamba models (``backbone.embeddings``, ``backbone.layers.N.{norm,mixer}``,
``backbone.norm_f``, ``lm_head``) so that their checkpoints load by name.

Recurrent inference: ``state = model.allocate_state(batch)``; ``model(prompt, state)`` runs the
prompt and fills the state; ``model.step(tokens, state)`` advances one token per sequence with
the SSM decode-step kernels and the attention KV caches.

Every public entry point checks its input first (``modules.check_input``): tokens must be an
integer (b, l) tensor for ``forward`` and (b,) for ``step`` on the model's device, a mixer's
input (b, l, d_model) / (b, d_model) in its parameters' dtype and device, and a state must be of
the input's batch; otherwise ``ssmc.CallError`` names the argument and the expected shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ssmc.errors import CallError, SSMCError
from ssmc.ir import AttentionBlock, MLPBlock, ModelSpec, MoEBlock, SpecFile, SSMBlock, SSMFamily

from .modules import FLOATING, RMSNorm, SSMLayer, check_input

TOKEN_DTYPES = (torch.int64, torch.int32)


_MIXER_HINTS = ("forward takes (batch, seqlen, d_model); one token per sequence, "
                "(batch, d_model), goes through step",
                "step takes one token per sequence, (batch, d_model); a sequence, "
                "(batch, seqlen, d_model), goes through forward")


def _check_mixer_input(module: nn.Module, x, weight: torch.Tensor, step: bool):
    """x (b, l, d_model) for forward, (b, d_model) for step, in the parameters' dtype/device."""
    model = ("d_model", module.d_model)
    dims = (("batch", None), model) if step else (("batch", None), ("seqlen", None), model)
    check_input("x", x, dims, weight.dtype, weight.device, hint=_MIXER_HINTS[step])


# --------------------------------------------------------------------------------------------
# Attention with a KV cache

class KVCache:
    """Keys and values of one attention layer, (b, kv_heads, capacity, head_dim), with the
    position each slot holds (-1 = empty). A sliding-window layer keeps a ring of ``window``
    slots (memory stays constant); a full layer grows its capacity by doubling."""

    def __init__(self, batch, kv_heads, head_dim, capacity, window, device, dtype):
        self.window = window
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.length = 0   # tokens seen so far = position of the next token

    def _grow(self, needed: int):
        capacity = self.k.shape[2]
        if self.window is not None or needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        pad = new_capacity - capacity
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))
        self.positions = F.pad(self.positions, (0, pad), value=-1)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (b, kv_heads, s, head_dim) of the next s positions."""
        s = k.shape[2]
        start = self.length
        self._grow(start + s)
        keep = s if self.window is None else min(s, self.window)
        positions = torch.arange(start + s - keep, start + s, device=k.device)
        slots = positions % self.window if self.window is not None else positions
        self.k[:, :, slots] = k[:, :, s - keep:].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, s - keep:].to(self.v.dtype)
        self.positions[slots] = positions
        self.length += s


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on (b, heads, s, head_dim), halves rotated (GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped KV heads and an optional sliding window."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: Optional[int] = None,
                 window: Optional[int] = None, rope_theta: Optional[float] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        if heads % kv_heads:
            raise SSMCError(f"attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads = heads, kv_heads
        self.d_model = d_model
        self.head_dim = head_dim or d_model // heads
        self.window = window
        self.rope_theta = rope_theta
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(heads * self.head_dim, d_model, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, rope_theta={self.rope_theta}")

    def allocate_state(self, batch: int, device=None, dtype=None, capacity: int = 256) -> KVCache:
        weight = self.o_proj.weight
        capacity = self.window if self.window is not None else capacity
        return KVCache(batch, self.kv_heads, self.head_dim, capacity, self.window,
                       device or weight.device, dtype or weight.dtype)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, count: int) -> torch.Tensor:
        b, s, _ = x.shape
        return proj(x).reshape(b, s, count, self.head_dim).transpose(1, 2)

    def _check_cache(self, cache, batch: int, required: bool):
        if cache is None and not required:
            return
        if not isinstance(cache, KVCache):
            got = "is missing" if cache is None else f"is a {type(cache).__name__}"
            raise CallError(f"argument 'cache' {got}; expected a KVCache of batch {batch}",
                            hint="allocate_state(batch) gives the cache this layer expects")
        dims = (("batch", batch, "the batch of 'x'"), ("kv_heads", self.kv_heads),
                ("capacity", None), ("head_dim", self.head_dim))
        check_input("cache", cache.k, dims, FLOATING, self.o_proj.weight.device, field="k",
                    why="keys are floating",
                    hint="allocate_state(batch) gives the cache this layer expects")

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x (b, l, d_model) -> (b, l, d_model); with ``cache``: attend to it too, then append."""
        _check_mixer_input(self, x, self.q_proj.weight, False)
        self._check_cache(cache, x.shape[0], required=False)
        return self._attend(x, cache)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x (b, d_model) -> (b, d_model), one token per sequence."""
        _check_mixer_input(self, x, self.q_proj.weight, True)
        self._check_cache(cache, x.shape[0], required=True)
        return self._attend(x[:, None, :], cache)[:, 0]

    def _attend(self, x: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
        b, s, _ = x.shape
        start = cache.length if cache is not None else 0
        q_pos = torch.arange(start, start + s, device=x.device)
        q = self._heads(self.q_proj, x, self.heads)
        k = self._heads(self.k_proj, x, self.kv_heads)
        v = self._heads(self.v_proj, x, self.kv_heads)
        if self.rope_theta is not None:
            q, k = _rope(q, q_pos, self.rope_theta), _rope(k, q_pos, self.rope_theta)
        if cache is None:
            keys, values, k_pos = k, v, q_pos
        else:
            # Earlier tokens come from the cache, this call's from k, v: attending before the
            # new keys are written keeps ring slots a long prompt would overwrite.
            keys = torch.cat([cache.k.to(k.dtype), k], dim=2)
            values = torch.cat([cache.v.to(v.dtype), v], dim=2)
            k_pos = torch.cat([cache.positions, q_pos])
        repeat = self.heads // self.kv_heads
        if repeat > 1:
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        if cache is None and self.window is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            allowed = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            if self.window is not None:
                allowed &= k_pos[None, :] > q_pos[:, None] - self.window
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        if cache is not None:
            cache.append(k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


# --------------------------------------------------------------------------------------------
# MLP and MoE

class MLP(nn.Module):
    """SwiGLU (down(silu(gate(x)) * up(x))) when the activation is silu; else down(act(up(x)))."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.activation = activation
        self.gated = activation in ("silu", "swiglu")
        if self.gated:
            self.gate_proj = nn.Linear(d_model, hidden, bias=False, **factory)
        elif not hasattr(F, activation):
            raise SSMCError(f"mlp: unknown activation {activation!r} (silu, gelu, relu, ...)")
        self.up_proj = nn.Linear(d_model, hidden, bias=False, **factory)
        self.down_proj = nn.Linear(hidden, d_model, bias=False, **factory)

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        """x (b, l, d_model) -> (b, l, d_model)."""
        _check_mixer_input(self, x, self.up_proj.weight, False)
        return self.ffn(x)

    def step(self, x: torch.Tensor, state=None) -> torch.Tensor:
        """x (b, d_model) -> (b, d_model)."""
        _check_mixer_input(self, x, self.up_proj.weight, True)
        return self.ffn(x)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward on (..., d_model), unchecked (MoE runs its experts on token rows)."""
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(getattr(F, self.activation)(self.up_proj(x)))

    def allocate_state(self, batch, device=None, dtype=None):
        return None


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts: softmax router, the k best renormalized per token."""

    def __init__(self, d_model: int, experts: int, top_k: int, hidden: int, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise SSMCError(f"moe: top_k ({top_k}) must be between 1 and experts ({experts})")
        self.top_k = top_k
        self.d_model = d_model
        self.router = nn.Linear(d_model, experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(MLP(d_model, hidden, device=device, dtype=dtype)
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        """x (b, l, d_model) -> (b, l, d_model)."""
        _check_mixer_input(self, x, self.router.weight, False)
        return self._route(x)

    def step(self, x: torch.Tensor, state=None) -> torch.Tensor:
        """x (b, d_model) -> (b, d_model)."""
        _check_mixer_input(self, x, self.router.weight, True)
        return self._route(x)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        # Routing in at least fp32: bf16 logits would pick experts by rounding noise.
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        if torch.compiler.is_compiling():
            # Under torch.compile every expert runs on every token, weighted by a dense gate
            # (zero where not chosen): the same sum without data-dependent shapes, so the graph
            # stays whole; eager mode gathers each expert's tokens instead.
            gate = torch.zeros_like(probs).scatter(-1, chosen, weights.to(probs.dtype))
            outs = torch.stack([expert.ffn(tokens) for expert in self.experts], dim=1)
            return (outs * gate.to(x.dtype)[..., None]).sum(1).reshape(shape)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == index, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert.ffn(tokens[rows]) * weights[rows, slot, None])
        return out.reshape(shape)

    def allocate_state(self, batch, device=None, dtype=None):
        return None


# --------------------------------------------------------------------------------------------
# The model

class Layer(nn.Module):
    """One pre-norm residual layer: h + mixer(norm(h))."""

    def __init__(self, mixer: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.mixer = mixer

    def forward(self, h, state=None):
        return h + self.mixer(self.norm(h), state)

    def step(self, h, state):
        return h + self.mixer.step(self.norm(h), state)


@dataclass
class ModelState:
    """The inference state of every layer (SSMState, KVCache or None), and tokens seen so far."""
    layers: List[object]
    position: int = 0
    batch: int = 0

    def nbytes(self) -> int:
        total = 0
        for s in self.layers:
            for t in (getattr(s, name, None) for name in ("conv", "ssm", "k", "v")):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def _norm(kind: str, dim: int, eps: float, device, dtype) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    raise SSMCError(f"unknown norm {kind!r} (rmsnorm, layernorm)")


def resolve_model(model_spec_or_path, model: Optional[str] = None,
                  families: Union[Dict[str, SSMFamily], Iterable[SSMFamily], None] = None):
    """(ModelSpec, {name: SSMFamily}) from a ModelSpec (+ families), a SpecFile, a path or text."""
    if isinstance(model_spec_or_path, ModelSpec):
        spec, known = model_spec_or_path, {}
    else:
        if isinstance(model_spec_or_path, SpecFile):
            spec_file = model_spec_or_path
        else:
            from ssmc.api import parse
            spec_file = parse(model_spec_or_path)
        if not spec_file.models:
            raise SSMCError(f"{spec_file.file} defines no model")
        if model is None:
            if len(spec_file.models) > 1:
                names = ", ".join(m.name for m in spec_file.models)
                raise SSMCError(f"{spec_file.file} defines several models ({names}); pick one "
                                "with model=")
            spec = spec_file.models[0]
        else:
            matches = [m for m in spec_file.models if m.name == model]
            if not matches:
                names = ", ".join(m.name for m in spec_file.models)
                raise SSMCError(f"{spec_file.file} has no model {model!r} (it has: {names})")
            spec = matches[0]
        known = {f.name: f for f in spec_file.families}
    if families is not None:
        items = families.values() if isinstance(families, dict) else families
        known.update({f.name: f for f in items})
    for block in spec.blocks():
        if isinstance(block, SSMBlock) and block.family not in known:
            raise SSMCError(f"model {spec.name} uses SSM family {block.family!r}, which is not "
                            f"defined (known: {', '.join(sorted(known)) or 'none'})", block.loc)
    return spec, known


class Backbone(nn.Module):
    def __init__(self, embeddings: nn.Embedding, layers: nn.ModuleList, norm_f: nn.Module):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.norm_f = norm_f


class Model(nn.Module):
    """A language model with the hybrid layout of a ``ModelSpec`` (see the module docstring).

    ``model_spec_or_path``: a ModelSpec (give its families with ``families=``), a SpecFile, or a
    spec path / text (``model=`` picks one of several models). ``vocab`` overrides the spec's.
    ``ssm_options`` pass through to every SSMLayer (d_conv, dt_rank, ...); ``rope_theta`` adds
    rotary position embeddings to the attention layers (None: none, as in Jamba).
    """

    def __init__(self, model_spec_or_path, target: str = "reference", vocab: Optional[int] = None,
                 *, model: Optional[str] = None, families=None, norm_eps: float = 1e-5,
                 rope_theta: Optional[float] = None, tie_embeddings: bool = True,
                 ssm_options: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        spec, known = resolve_model(model_spec_or_path, model, families)
        vocab = vocab or spec.vocab
        if not vocab:
            raise SSMCError(f"model {spec.name} has no vocab size: give vocab= or set it in the spec",
                            spec.loc)
        self.spec, self.families, self.target, self.vocab = spec, known, target, vocab
        d = spec.d_model
        factory = {"device": device, "dtype": dtype}
        layers = []
        for block in spec.blocks():
            if isinstance(block, SSMBlock):
                mixer = SSMLayer(known[block.family], d, target=target, **(ssm_options or {}),
                                 **factory)
            elif isinstance(block, AttentionBlock):
                mixer = Attention(d, block.heads, block.kv_heads, block.head_dim, block.window,
                                  rope_theta, **factory)
            elif isinstance(block, MLPBlock):
                mixer = MLP(d, block.hidden or 4 * d, block.activation, **factory)
            elif isinstance(block, MoEBlock):
                mixer = MoE(d, block.experts, block.top_k, block.hidden or 4 * d, **factory)
            else:  # pragma: no cover - ir.Block is closed
                raise SSMCError(f"unknown block {block!r}")
            layers.append(Layer(mixer, _norm(spec.norm, d, norm_eps, device, dtype)))
        self.backbone = Backbone(nn.Embedding(vocab, d, **factory), nn.ModuleList(layers),
                                 _norm(spec.norm, d, norm_eps, device, dtype))
        self.lm_head = nn.Linear(d, vocab, bias=False, **factory)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self._init_weights()

    def _init_weights(self):
        with torch.no_grad():
            nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
            for layer in self.backbone.layers:
                if isinstance(layer.mixer, (Attention, MLP, MoE)):
                    for p in layer.mixer.parameters():
                        if p.dim() == 2:
                            nn.init.normal_(p, std=0.02)
            if not self.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def allocate_state(self, batch: int, device=None, dtype=None, kv_capacity: int = 256) -> ModelState:
        """Zeroed state for ``batch`` sequences: SSM conv + ssm states, attention KV caches
        (sliding-window layers: a ring of ``window`` slots; full layers grow from kv_capacity)."""
        states = []
        for layer in self.layers:
            mixer = layer.mixer
            if isinstance(mixer, Attention):
                states.append(mixer.allocate_state(batch, device, dtype, capacity=kv_capacity))
            else:
                states.append(mixer.allocate_state(batch, device, dtype))
        return ModelState(states, 0, batch)

    _FORWARD_HINT = ("forward takes token ids (batch, seqlen); one token per sequence, "
                     "(batch,), goes through step(tokens, state)")
    _STEP_HINT = ("step takes one token id per sequence, (batch,); a sequence, "
                  "(batch, seqlen), goes through forward(tokens, state)")

    def _check(self, tokens, state, step: bool):
        """Token ids' rank, dtype and device (never their values: no sync), and the state's
        batch and layer count; each layer then checks its own part of the state."""
        dims = (("batch", None),) if step else (("batch", None), ("seqlen", None))
        check_input("tokens", tokens, dims, TOKEN_DTYPES, self.backbone.embeddings.weight.device,
                    owner="the model's parameters", why="token ids",
                    hint=self._STEP_HINT if step else self._FORWARD_HINT)
        if state is None and not step:
            return
        batch = tokens.shape[0]
        if not isinstance(state, ModelState):
            got = "is missing" if state is None else f"is a {type(state).__name__}"
            problem = f"{got}; expected a ModelState of batch {batch}"
        elif state.batch and state.batch != batch:
            problem = (f"holds batch {state.batch}; expected batch = {batch} "
                       "(the batch of 'tokens')")
        elif len(state.layers) != len(self.layers):
            problem = (f"holds {len(state.layers)} layer states; expected layers = "
                       f"{len(self.layers)} (one per layer of {self.spec.name})")
        else:
            return
        raise CallError(f"argument 'state' {problem}",
                        hint=f"allocate_state({batch}) gives a state for this batch")

    def forward(self, tokens: torch.Tensor, state: Optional[ModelState] = None) -> torch.Tensor:
        """tokens (b, l) int -> logits (b, l, vocab). With ``state``: continue from it (prefill).
        Raises ``CallError`` for tokens or a state that do not fit (before anything runs)."""
        self._check(tokens, state, step=False)
        h = self.backbone.embeddings(tokens)
        for index, layer in enumerate(self.layers):
            h = layer(h, state.layers[index] if state is not None else None)
        if state is not None:
            state.position += tokens.shape[1]
        return self.lm_head(self.backbone.norm_f(h))

    def step(self, tokens: torch.Tensor, state: ModelState) -> torch.Tensor:
        """tokens (b,) int -> logits (b, vocab) for the next position; updates ``state``."""
        self._check(tokens, state, step=True)
        h = self.backbone.embeddings(tokens)
        for index, layer in enumerate(self.layers):
            h = layer.step(h, state.layers[index])
        state.position += 1
        return self.lm_head(self.backbone.norm_f(h))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: prompt (b, l) -> (b, l + max_new_tokens)."""
        self._check(prompt, None, step=False)
        state = self.allocate_state(prompt.shape[0], device=prompt.device)
        logits = self.forward(prompt, state)[:, -1]
        out = [prompt]
        for _ in range(max_new_tokens):
            token = logits.argmax(-1)
            out.append(token[:, None])
            logits = self.step(token, state)
        return torch.cat(out, dim=1)

    @classmethod
    def from_pretrained(cls, path, target: str = "reference", **options) -> "Model":
        """A Hugging Face Mamba / Mamba-2 checkpoint directory (config.json + safetensors)."""
        from .checkpoint import load_pretrained
        return load_pretrained(path, target=target, **options)


__all__ = ["Model", "ModelState", "Attention", "KVCache", "MLP", "MoE", "Layer", "resolve_model"]
