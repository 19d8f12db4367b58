"""ssmc kernels inside Hugging Face transformers' own Mamba-family modeling code.

    import ssmc.integrations.transformers as ssmc_hf
    ssmc_hf.enable(target="cuda")        # or "cpu"; ssmc_hf.disable() restores transformers' own

transformers (5.x) calls its SSM kernels through functions of each modeling module, looked up
at every call: ``mamba_selective_scan`` / ``mamba_selective_state_update`` (Mamba, FalconMamba,
Jamba) and ``mamba2_chunk_scan`` / ``mamba2_selective_state_update`` (Mamba-2, Bamba), with
mamba_ssm's arguments. ``enable`` points those names at ssmc kernels compiled for ``target``
and makes the fused training kernels (``mamba_inner_fn``, ``mamba_split_conv1d_scan_combined``)
decline, so that the model runs its unfused path, whose SSM calls are these. Everything else
(projections, the causal conv, norms, the cache) stays the model's own code.

Only the five models above are patched (``MODULES``); transformers' other hybrids with an SSM
(FalconH1, GraniteMoeHybrid, NemotronH, Zamba, Zamba2) have their own kernel functions and stay
on transformers' path. The kernels are inference-only until ssmc generates backward kernels:
with ``enable()`` a training step's ``loss.backward()`` raises an SSMCError naming the family
(call ``disable()`` to train with transformers' own path).

The kernels are compiled from the specs below, sizes left open (``any``): each call runs a
kernel specialized for the sizes of its tensors, built on first use. Mamba-2's chunk size and
Δ clamp (``dt_limit``) come from the call, one family per pair. ``calls`` counts the calls
each kernel served (a test that checks a model reached ssmc reads it).
"""
from __future__ import annotations

import collections
import importlib
import threading
from typing import Dict, Optional, Tuple

import ssmc

# The Mamba-1 selective scan, as mamba_ssm's selective_scan_fn (transformers passes A =
# -exp(A_log), the bias and softplus flag, B/C as (b, n, l)).
MAMBA1_SPEC = """
ssm HFMamba {
  dims       channels = any, state = any, groups = 1
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per channel
  gate       silu(z)
  discretize exp_euler
  compute    scan
}
"""

# The Mamba-2 SSD layer, as mamba_chunk_scan_combined; chunk size and clamp filled per call.
MAMBA2_SPEC = """
ssm HFMamba2 {{
  dims       heads = any, head_dim = any, state = any, groups = any
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias){clamp}
  B, C       selective per group
  D          per head
  gate       silu(z)
  discretize exp_euler
  compute    chunked({chunk})
}}
"""

# modeling module -> (the scan function's name, the step's, the fused kernel that must decline)
MODULES = {
    "transformers.models.mamba.modeling_mamba":
        ("mamba_selective_scan", "mamba_selective_state_update", "mamba_inner_fn"),
    "transformers.models.falcon_mamba.modeling_falcon_mamba":
        ("mamba_selective_scan", "mamba_selective_state_update", "mamba_inner_fn"),
    "transformers.models.jamba.modeling_jamba":
        ("mamba_selective_scan", "mamba_selective_state_update", "mamba_inner_fn"),
    "transformers.models.mamba2.modeling_mamba2":
        ("mamba2_chunk_scan", "mamba2_selective_state_update",
         "mamba2_split_conv1d_scan_combined"),
    "transformers.models.bamba.modeling_bamba":
        ("mamba2_chunk_scan", "mamba2_selective_state_update",
         "mamba2_split_conv1d_scan_combined"),
}

calls: collections.Counter = collections.Counter()
_saved: Dict[Tuple[str, str], object] = {}
_lock = threading.Lock()


class Kernels:
    """The ssmc kernels for one target, compiled on first use."""

    def __init__(self, target: str):
        self.target = target
        self._compiled: Dict[tuple, object] = {}

    def _get(self, key, spec: str, algorithm=None):
        kernel = self._compiled.get(key)
        if kernel is None:
            with _lock:
                kernel = self._compiled.get(key)
                if kernel is None:
                    kernel = ssmc.compile(spec, target=self.target, algorithm=algorithm)
                    self._compiled[key] = kernel
        return kernel

    def mamba1(self):
        return self._get(("mamba1",), MAMBA1_SPEC)

    def mamba1_step(self):
        return self._get(("mamba1", "step"), MAMBA1_SPEC, "step")

    def mamba2(self, chunk: int, dt_limit=(0.0, float("inf"))):
        return self._get(("mamba2", chunk, tuple(dt_limit)), _mamba2_spec(chunk, dt_limit))

    def mamba2_step(self):
        return self._get(("mamba2", "step"), _mamba2_spec(256, (0.0, float("inf"))), "step")


def _mamba2_spec(chunk: int, dt_limit) -> str:
    lo, hi = (float(v) for v in dt_limit)
    clamp = "" if (lo, hi) == (0.0, float("inf")) else f" clamp({lo!r}, {hi!r})"
    return MAMBA2_SPEC.format(clamp=clamp, chunk=int(chunk))


def _last_dim_contiguous(t):
    """mamba_ssm copies a tensor that is not contiguous along its last dim (transformers passes
    B, C and z as transposed views); ssmc's kernels take unit stride there."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _selective_scan(kernels: Kernels):
    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **_mamba_py_options):
        calls["selective_scan"] += 1
        return kernels.mamba1()(
            _last_dim_contiguous(u), _last_dim_contiguous(delta), A, _last_dim_contiguous(B),
            _last_dim_contiguous(C), D=D, z=_last_dim_contiguous(z), delta_bias=delta_bias,
            delta_softplus=delta_softplus, return_last_state=return_last_state)
    return selective_scan


def _state_update(step):
    """selective_state_update over ``step()`` (Mamba-1's or Mamba-2's decode step). dt is passed
    as given: Mamba-2's is a stride-0 (b, h, p) broadcast, which the step takes as is."""
    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None, **_):
        calls["state_update"] += 1
        return step()(state, _last_dim_contiguous(x), dt, A, _last_dim_contiguous(B),
                      _last_dim_contiguous(C), D, _last_dim_contiguous(z), dt_bias, dt_softplus,
                      state_batch_indices)
    return selective_state_update


def _chunk_scan(kernels: Kernels):
    def chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                            initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                            dt_limit=(0.0, float("inf")), return_final_states=False,
                            return_varlen_states=False, **_):
        calls["chunk_scan"] += 1
        return kernels.mamba2(chunk_size, dt_limit)(
            _last_dim_contiguous(x), _last_dim_contiguous(dt), A, _last_dim_contiguous(B),
            _last_dim_contiguous(C), chunk_size, D=D, z=_last_dim_contiguous(z), dt_bias=dt_bias,
            initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
            return_varlen_states=return_varlen_states)
    return chunk_scan_combined


def _declines(*args, **kwargs):
    """The fused training kernels: None tells the mixer to take its unfused path, whose SSM
    calls are ssmc's (the fused kernels also do the conv and projections, which ssmc does not
    generate)."""
    return None


def enable(target: str = "cuda", kernels: Optional[Kernels] = None) -> Kernels:
    """Point the installed modeling modules of ``MODULES`` (Mamba, FalconMamba, Jamba, Mamba-2,
    Bamba) at ssmc kernels for ``target``. Returns the Kernels object (its compiled callables are kept there)."""
    kernels = kernels or Kernels(target)
    found = False
    for name, (scan_name, step_name, fused_name) in MODULES.items():
        try:
            module = importlib.import_module(name)
        except ImportError:       # this transformers has no such model
            continue
        found = True
        mamba2 = scan_name == "mamba2_chunk_scan"
        replacements = {scan_name: (_chunk_scan if mamba2 else _selective_scan)(kernels),
                        step_name: _state_update(kernels.mamba2_step if mamba2
                                                 else kernels.mamba1_step),
                        fused_name: _declines}
        for attr, fn in replacements.items():
            if not hasattr(module, attr):
                raise ssmc.SSMCError(
                    f"{name} has no {attr}: this transformers version calls its kernels "
                    "differently than ssmc.integrations.transformers expects (written for 5.x)")
            _saved.setdefault((name, attr), getattr(module, attr))
            setattr(module, attr, fn)
    if not found:
        raise ssmc.SSMCError("no Mamba-family model found in the installed transformers")
    return kernels


def disable() -> None:
    """Restore transformers' own kernel functions."""
    for (name, attr), fn in list(_saved.items()):
        setattr(importlib.import_module(name), attr, fn)
    _saved.clear()


__all__ = ["enable", "disable", "Kernels", "calls", "MODULES", "MAMBA1_SPEC", "MAMBA2_SPEC"]
