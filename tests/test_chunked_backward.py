"""The generated chunked SSD (Mamba-2) backward on the cuda target against the float64 oracle.

Every case draws fresh inputs and random gradients for y and the final states, and compares
each input's gradient from the generated Triton backward with torch autograd through
``reference.run_float64_differentiable`` on the same inputs; the buffers the backward returns
are filled with NaN before the launch. Under the Triton interpreter (CI) the shapes are small;
on a GPU (``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0``, ``SSMC_TEST_FULL=1``) they are Mamba-2's
head_dim 64, state 128, with chunks of 128 in 2 row blocks x 4 column blocks.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import families as F
from conftest import FULL, assert_rel_close, require_cuda_device, target_device
from test_scan_backward import _poisoned, oracle_gradients
import ssmc
from ssmc import signature
from ssmc.ir import Method, Sharing

require_cuda_device()
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
DEVICE = target_device("cuda")
# (heads, head_dim, state, chunk); the config's blocks split each chunk into several row and
# column blocks
DIMS = (4, 64, 128, 128) if FULL else (4, 8, 16, 32)
SMALL_BLOCKS = {"bwd_block_m": 64, "bwd_block_k": 32} if FULL else {"bwd_block_m": 16, "bwd_block_k": 16}
LENGTHS = [1, 127, 128, 129, 389] if FULL else [1, 31, 32, 33, 67]
TOKEN = ("x", "z")   # returned in the input's dtype; the rest in fp32


def family(**kw):
    h, p, n, q = DIMS
    kw.setdefault("heads", h)
    return F.mamba2(head_dim=p, state=n, chunk=q, **kw)


def check(fam, seqlen, seed, batch=2, dtype="float32", with_state=True, final=True, omit=(),
          scale=None, config=None, tol=None, tols=None):
    kernel = ssmc.compile(fam, target="cuda", config=dict(SMALL_BLOCKS, **(config or {})))
    inputs = signature.example_inputs(fam, None, batch, seqlen, dtype=dtype, device=DEVICE,
                                      seed=seed, with_state=with_state)
    for name in omit:
        inputs.pop(name, None)
    for name, factor in (scale or {}).items():
        inputs[name] = inputs[name] * factor
    problem = signature.bind(fam, fam.convention, (), {**inputs, "return_final_states": final})
    names, dy, dlast, want = oracle_gradients(problem, NAMES, final, seed)
    backend_kernel = kernel.kernel_for(problem.family)
    with _poisoned(backend_kernel, "cuda"):
        got = backend_kernel.backward(problem, dy.to(DEVICE, problem.x.dtype),
                                      dlast.to(DEVICE, torch.float32) if final else None)
    assert set(got) == set(names), (sorted(got), names)
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert_rel_close(f"d{name}", got[name], want[name],
                         dtype if name in TOKEN else "float32", tol=(tols or {}).get(name, tol))
    return got


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_every_gradient(seqlen, seed):
    check(family(), seqlen, seed)


@pytest.mark.parametrize("variant", ["groups", "per_head_BC", "D_per_head_dim", "selective_A",
                                     "constant_BC", "constant_delta", "clamp", "zoh",
                                     "no_softplus", "heads_split", "trapezoidal",
                                     "trapezoidal_selective_A"])
def test_variants(variant, seed):
    h = DIMS[0]
    kw, config = {}, {}
    if variant == "groups":
        kw = dict(groups=2)
    elif variant == "per_head_BC":
        kw = dict(groups=h)       # every head its own B and C: C B^T is not shared
    elif variant == "selective_A":
        kw = dict(selective_A=True)
    elif variant == "constant_BC":
        kw = dict(selective_B=False, selective_C=False)
    elif variant == "constant_delta":
        kw = dict(selective_delta=False)
    elif variant == "clamp":
        kw = dict(clamp=(0.01, 0.05))
    elif variant == "zoh":
        kw = dict(method=Method.ZOH)
    elif variant == "no_softplus":
        kw = dict(softplus=False)
    elif variant == "trapezoidal":
        kw = dict(method=Method.TRAPEZOIDAL)
    elif variant == "trapezoidal_selective_A":
        kw = dict(method=Method.TRAPEZOIDAL, selective_A=True, groups=2)
    elif variant == "heads_split":
        kw, config = dict(heads=6, groups=2), {"bwd_bc_heads": 2}
    fam = family(**kw)
    if variant == "D_per_head_dim":
        fam = dataclasses.replace(fam, D=dataclasses.replace(fam.D, sharing=Sharing.HEAD_DIM))
    check(fam, 33, seed, config=config)


@pytest.mark.parametrize("case", ["no_state", "no_final_gradient", "no_terms"])
def test_optional(case, seed):
    if case == "no_state":
        check(family(), 33, seed, with_state=False, final=False)
    elif case == "no_final_gradient":
        check(family(), 33, seed, final=False)
    else:
        check(family(), 33, seed, omit=("D", "z", "dt_bias"))


def test_bf16(seed):
    """bf16 inputs: the tensor-core operands (dy, the weights, the chunk states) are rounded to
    bf16 inside, as in mamba_ssm, so every gradient carries ~5e-3. A (selective here: per token)
    is checked per token; dt_bias and D sum ~100 per-token terms of both signs, which can cancel
    to a few times less than their size: their tolerance is that much wider."""
    check(family(selective_A=True), 37, seed, dtype="bfloat16", tol=2e-2,
          tols={"dt_bias": 6e-2, "D": 6e-2})


def test_no_nan_at_large_decays_and_steps(seed):
    """|A| Delta up to ~1e3 with Delta up to ~10: the decays underflow to 0, the gradients stay
    finite and right. The tolerance is the forward's: exp(cum_t - cum_s) from the chunk's
    cumulative log-decays carries an absolute error of ~eps |cum| in the exponent (as in
    mamba_ssm's SSD), which reaches 1e-5..1e-4 relative in dA and ddt at these decays."""
    fam = family(bias=False, softplus=False)
    got = check(fam, 37, seed, scale={"A": 6.0, "dt": 100.0}, tol=5e-4)
    assert all(torch.isfinite(g).all() for g in got.values())


def test_trains_through_autograd_the_op_and_torch_compile(seed):
    """mamba_chunk_scan_combined's call: loss.backward() reaches every input, final_states'
    gradient included, the same through the torch op (and torch.compile's graph) as eager."""
    fam = family()
    kernel = ssmc.compile(fam, target="cuda", config=SMALL_BLOCKS)
    inputs = signature.example_inputs(fam, None, 2, 20, device=DEVICE, seed=seed, with_state=True)

    def grads(fn):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        y, final = fn(**{**inputs, **leaves, "return_final_states": True})
        (y.square().sum() + 3 * final.sum()).backward()
        assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in leaves.values())
        return {n: v.grad for n, v in leaves.items()}
    eager = grads(kernel)
    through_op = grads(lambda **kw: kernel.as_op()(**kw))
    for name, g in eager.items():
        assert_rel_close(f"d{name}", through_op[name], g, "float32", tol=1e-6)


@pytest.mark.parametrize("how", ["cu_seqlens", "seq_idx", "no_state", "trapezoidal"])
def test_packed_sequences(how, seed):
    """Packed sequences (an empty one, a one-token one, chunk boundaries inside sequences):
    each sequence's state is its own, in the gradients too, the per-sequence states' given
    (trapezoidal: no previous-input term crosses from one sequence into the next)."""
    fam = family(method=Method.TRAPEZOIDAL) if how == "trapezoidal" else family()
    q = DIMS[3]
    lengths = [q // 2 + 3, 0, 1, 2 * q + 5, q - 1]
    kernel = ssmc.compile(fam, target="cuda", config=SMALL_BLOCKS)
    inputs = signature.example_inputs(fam, None, 1, 0, device=DEVICE, seed=seed,
                                      with_state=how != "no_state", varlen=lengths)
    if how == "seq_idx":
        cu = inputs.pop("cu_seqlens")
        inputs["seq_idx"] = torch.repeat_interleave(
            torch.arange(len(lengths), device=DEVICE), cu[1:] - cu[:-1]).to(torch.int32)[None]
    final = how != "no_state"
    flag = "return_final_states" if how == "seq_idx" else "return_varlen_states"
    problem = signature.bind(fam, fam.convention, (), {**inputs, flag: final})
    names, dy, dlast, want = oracle_gradients(problem, NAMES, final, seed)
    backend_kernel = kernel.kernel_for(problem.family)
    with _poisoned(backend_kernel, "cuda"):
        got = backend_kernel.backward(problem, dy.to(DEVICE, problem.x.dtype),
                                      dlast.to(DEVICE, torch.float32) if final else None)
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert_rel_close(f"d{name}", got[name], want[name], "float32")


def test_packed_state_gradients_through_the_op_match_eager(seed):
    """return_final_states and return_varlen_states of packed sequences: both states'
    gradients reach the inputs the same way through the torch op as through the eager call."""
    fam = family()
    kernel = ssmc.compile(fam, target="cuda", config=SMALL_BLOCKS)
    inputs = signature.example_inputs(fam, None, 1, 0, device=DEVICE, seed=seed, with_state=True,
                                      varlen=[7, 12, 0, 9])

    def grads(fn):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        y, final, varlen = fn(**{**inputs, **leaves, "return_final_states": True,
                                 "return_varlen_states": True})
        weights = torch.arange(4.0, device=DEVICE)[:, None, None, None]
        (y.square().sum() + 3 * final.sum() + (varlen * weights).sum()).backward()
        return {n: v.grad for n, v in leaves.items()}
    eager = grads(kernel)
    through_op = grads(lambda **kw: kernel.as_op()(**kw))
    for name, g in eager.items():
        assert torch.isfinite(g).all(), name
        assert_rel_close(f"d{name}", through_op[name], g, "float32", tol=1e-6)


def test_trapezoidal_backward_compiles_for_sm90(tmp_path):
    """The trapezoidal and padded-row branches, compiled for sm_90 by Triton itself (no GPU
    needed): the interpreter runs what the GPU compiler may refuse."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from ssmc.backends import triton as tb
    from ssmc.plan import make_plan
    plan = make_plan(F.mamba2(heads=8, head_dim=64, state=128, chunk=256,
                              method=Method.TRAPEZOIDAL))
    path = tmp_path / "kernel.py"
    path.write_text(tb.lower(plan, tb.default_config(plan)))
    tiles = {"CHUNK": 256, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_P": 64, "BLOCK_N": 128,
             "DOT_PRECISION": "tf32", "DOT_UPCAST": False, "HAS_PREV": True}
    kernels = {"_bwd_dx": {**tiles, "CB_PRECOMPUTED": True, "HAS_D": True},
               "_bwd_dcb": {**tiles, "CB_PRECOMPUTED": False},
               "_bwd_dB": tiles,
               "_bwd_ddt": {"CHUNK": 256, "BLOCK_Q": 256, "BLOCK_S": 4, "BLOCK_J": 4,
                            "PAIR_BLOCK": 64, "HAS_DT_BIAS": True, "ROW_LENGTHS": True,
                            "HAS_PREV": True},
               "_chunk_prep": {"CHUNK": 256, "BLOCK_Q": 256, "HAS_DT_BIAS": True,
                               "VARLEN": False, "ROW_LENGTHS": True}}
    script = Path(__file__).with_name("compile_sm90.py")
    for suffix, flags in kernels.items():
        out = subprocess.run([sys.executable, str(script), str(path), suffix, json.dumps(flags)],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TRITON_INTERPRET": "0"})
        assert out.returncode == 0 and "ok" in out.stdout, (suffix, out.stderr[-2000:])
