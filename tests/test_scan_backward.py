"""The generated selective-scan backward kernels (cuda: Triton, cpu: TVM) against the float64
gradient oracle.

Every case draws fresh inputs, a random gradient for y and (where asked) for the final state,
and compares each input's gradient from the generated backward kernel with torch autograd
through ``reference.run_float64_differentiable`` (itself checked by gradcheck in
test_gradients.py) on the same inputs. Buffers the backward returns are filled with NaN before
the launch. The cuda target runs under the Triton interpreter on the CPU by default; on a GPU
with ``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0`` (``SSMC_TEST_FULL=1``: full-size shapes), where
the cpu cases are left to the CPU run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import families as F
from conftest import (FULL, ON_CUDA, TOL, assert_rel_close, require_cuda_device,
                      require_target_tools, target_device)
import ssmc
from ssmc import signature
from ssmc.backends import reference
from ssmc.errors import SSMCError
from ssmc.ir import Algorithm, AStructure, Method, Sharing

require_cuda_device()
CH, STATE = (256, 16) if FULL else (8, 4)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
CX = AStructure.COMPLEX_DIAGONAL


TARGETS = ["cuda"] if ON_CUDA else ["cpu", "cuda"]


@pytest.fixture(params=TARGETS)
def target(request):
    require_target_tools(request.param)
    return request.param


class _poisoned:
    """Outputs of the backward kernels allocated full of NaN for the duration."""

    def __init__(self, backend_kernel, target):
        self.kernel, self.target = backend_kernel, target

    def __enter__(self):
        if self.target == "cuda":
            self.kernel.module.EMPTY = lambda shape, **kw: torch.full(tuple(shape), float("nan"),
                                                                      **kw)
        else:
            from ssmc.backends.cpu import launch
            launch.POISON = True

    def __exit__(self, *exc):
        if self.target == "cuda":
            self.kernel.module.EMPTY = torch.empty
        else:
            from ssmc.backends.cpu import launch
            launch.POISON = False


def _inputs(fam, batch, seqlen, dtype, seed, target="cuda", **kw):
    return signature.example_inputs(fam, None, batch, seqlen, dtype=dtype,
                                    device=target_device(target), seed=seed, **kw)


def oracle_gradients(problem, candidates, final, seed):
    """(the problem's differentiable names, dy, dlast or None, {name: float64 gradient}):
    random gradients of y and the final state, pulled back by autograd through the oracle."""
    names = [n for n in candidates if getattr(problem, n, None) is not None]
    # complex tensors (complex-diagonal A's A, B, C and states) as complex128: autograd then
    # gives torch's gradient of a real loss, dL/dRe + i dL/dIm
    leaves = [getattr(problem, n).detach().cpu().to(
        torch.complex128 if getattr(problem, n).is_complex() else torch.float64)
        .requires_grad_(True) for n in names]
    y64, last64 = reference.run_float64_differentiable(
        dataclasses.replace(problem, **dict(zip(names, leaves))))
    g = torch.Generator().manual_seed(seed + 1)
    # the gradient of y is given in y's dtype: the oracle takes it rounded the same way
    dy = torch.randn(y64.shape, generator=g).to(problem.input.dtype).double()
    dlast = torch.randn(last64.shape, generator=g, dtype=last64.dtype) if final else None
    # a complex final state's gradient dlast: the loss Re(sum(last * conj(dlast)))
    loss = (y64 * dy).sum() + ((last64 * dlast.conj()).real.sum() if final else 0.0)
    return names, dy, dlast, dict(zip(names, torch.autograd.grad(loss, leaves)))


def _state_dtype(t):
    return torch.complex64 if t.is_complex() else torch.float32


def check_gradients(fam, seqlen, seed, target, batch=2, dtype="float32", with_state=True,
                    varlen=False, final=True, omit=(), scale=None, tol=None, config=None):
    """The generated backward's gradients of (y, final state) against the oracle's."""
    if config is None and target == "cuda" and not FULL:
        # the interpreter's lengths (< 70) fit in one default chunk (512 steps): 16-step chunks
        # make them cross chunks; FULL's 2053 steps cross the default's on the GPU
        config = {"bwd_chunk": 16}
    kernel = ssmc.compile(fam, target=target, config=config)
    DEVICE = target_device(target)
    inputs = _inputs(fam, batch, seqlen, dtype, seed, target, with_state=with_state,
                     **({"varlen": varlen} if varlen else {}))
    for name in omit:
        inputs.pop(name, None)
    for name, factor in (scale or {}).items():
        inputs[name] = inputs[name] * factor
    problem = signature.bind(fam, fam.convention, (), {**inputs, "return_last_state": final})
    names, dy, dlast, want = oracle_gradients(problem, NAMES, final, seed)
    backend_kernel = kernel.kernel_for(problem.family)
    with _poisoned(backend_kernel, target):
        got = backend_kernel.backward(problem, dy.to(DEVICE, problem.u.dtype),
                                      dlast.to(DEVICE, _state_dtype(dlast)) if final else None)
    for name in names:
        assert got[name].shape == want[name].shape, name
        # per-token gradients come back in the input's dtype, parameters in fp32
        token = name in ("u", "delta", "z") and getattr(problem, name).dim() == 3 \
            and target == "cuda"
        assert_rel_close(f"d{name}", got[name], want[name], dtype if token else "float32",
                         tol=tol)
    return got


LENGTHS = [1, 31, 32, 33, 67] if not FULL else [1, 255, 256, 257, 2053]


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_mamba1_every_gradient(seqlen, seed, target):
    check_gradients(F.mamba1(channels=CH, state=STATE), seqlen, seed, target)


@pytest.mark.parametrize("method", list(Method))
def test_every_method(method, seed, target):
    check_gradients(F.mamba1(channels=CH, state=STATE, method=method), 37, seed, target)


def test_trapezoidal_across_chunks_and_sequences(seed, target):
    """The previous-token term's gradients (x_{t-1}, B_{t-1}) cross checkpoint chunks and stop
    at packed sequences' starts."""
    fam = F.mamba1(channels=CH, state=STATE, method=Method.TRAPEZOIDAL)
    check_gradients(fam, 0, seed, target, batch=1, varlen=[17, 1, 40])


def test_trapezoidal_constant_B_selective_A(seed, target):
    """The previous-token term with a constant B (its gradient summed over time), a per-token
    A and a constant Δ."""
    fam = F.mamba1(channels=CH, state=STATE, method=Method.TRAPEZOIDAL, selective_B=False,
                   selective_A=True, selective_delta=False, softplus=False, bias=False)
    check_gradients(fam, 33, seed, target)


@pytest.mark.parametrize("variant", ["groups", "selective_A", "constant_BC", "constant_delta",
                                     "no_terms", "clamp", "no_state"])
def test_selectivity_and_terms(variant, seed, target):
    kw, call = {}, {}
    if variant == "groups":
        kw = dict(groups=2)
    elif variant == "selective_A":
        kw = dict(selective_A=True)
    elif variant == "constant_BC":
        kw = dict(selective_B=False, selective_C=False)
    elif variant == "constant_delta":
        kw = dict(selective_delta=False, softplus=False, bias=False, gate=False,
                  method=Method.ZOH)
    elif variant == "clamp":
        kw = dict(clamp=(0.05, 0.5))
    elif variant == "no_terms":
        call = dict(omit=("D", "z", "delta_bias"))
    elif variant == "no_state":
        call = dict(with_state=False, final=False)
    check_gradients(F.mamba1(channels=CH, state=STATE, **kw), 35, seed, target, **call)


def test_atomic_partials(seed):
    """Many channel blocks per group add their dB, dC atomically instead of as partials."""
    fam = F.mamba1(channels=CH, state=STATE)
    check_gradients(fam, 33, seed, "cuda", config={"bwd_block_d": 1, "bwd_max_partials": 2,
                                                  "bwd_chunk": 16})


def test_odd_channels_one_per_block(seed, target):
    """Channels per group not a power of two: one channel per program (cuda), per lane (cpu)."""
    check_gradients(F.mamba1(channels=3, state=STATE), 21, seed, target)


def test_varlen(seed, target):
    """Packed sequences (one of them empty) with chunk boundaries inside sequences."""
    check_gradients(F.mamba1(channels=CH, state=STATE), 0, seed, target, batch=1,
                    varlen=[13, 0, 40, 1, 33])


def test_bf16(seed, target):
    check_gradients(F.mamba1(channels=CH, state=STATE), 40, seed, target, dtype="bfloat16")


def test_no_nan_at_large_decays_and_steps(seed, target):
    """|A| Δ up to ~1e3 and Δ up to ~10 (softplus of large dt): Ā underflows to 0, the
    gradients stay finite and correct."""
    fam = F.mamba1(channels=CH, state=STATE)
    got = check_gradients(fam, 150, seed, target, scale={"delta": 10.0, "A": 100.0}, tol=1e-4)
    assert all(torch.isfinite(g).all() for g in got.values())


def test_trains_through_the_compiled_callable_and_torch_compile(seed, target):
    """loss.backward() through the callable, the torch op and torch.compile(fullgraph=True)
    gives the same gradients, B passed as (b, n, l)."""
    fam = F.mamba1(channels=CH, state=STATE)
    kernel = ssmc.compile(fam, target=target)
    inputs = _inputs(fam, 2, 19, "float32", seed, target, with_state=True)
    inputs["B"] = inputs["B"][:, 0]

    def grads(fn):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        y, last = fn(**{**inputs, **leaves, "return_last_state": True})
        (y.square().sum() + last.sum()).backward()
        return {n: v.grad for n, v in leaves.items()}

    def through_op(**kw):
        return kernel.as_op()(**kw)

    eager = grads(kernel)
    assert set(eager) == set(NAMES) and eager["B"].shape == inputs["B"].shape
    for other in (grads(through_op),
                  grads(torch.compile(through_op, fullgraph=True, backend="aot_eager"))):
        for name, g in eager.items():
            assert_rel_close(f"d{name}", other[name], g, "float32", tol=1e-6)


def test_a_layer_trains(seed, target):
    """ssmc.nn.SSMLayer: a few optimizer steps lower the loss."""
    DEVICE = target_device(target)
    torch.manual_seed(seed)
    spec = ("ssm Tiny {\n dims channels = 8, state = 4\n A diagonal = -exp(A_log)\n"
            " delta selective = softplus(dt + dt_bias)\n B, C selective per group\n"
            " D per channel\n gate silu(z)\n discretize exp_euler\n compute scan\n}\n")
    layer = ssmc.nn.SSMLayer(spec, d_model=8, target=target).to(DEVICE)
    x = torch.randn(2, 12, 8, device=DEVICE)
    goal = torch.randn(2, 12, 8, device=DEVICE)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (layer(x) - goal).square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in layer.parameters() if p.requires_grad)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_what_has_no_backward_yet_says_so():
    """A scan the cpu target runs forward but has no backward for (scalar A that varies per
    token) raises the reason when loss.backward() runs."""
    require_target_tools("cpu")
    fam = F.mamba2(heads=4, head_dim=8, state=4, selective_A=True, algorithm=Algorithm.SCAN)
    kernel = ssmc.compile(fam, target="cpu")
    inputs = signature.example_inputs(fam, None, 1, 5, seed=0)
    inputs["x"].requires_grad_(True)
    y = kernel(**inputs)
    with pytest.raises(SSMCError, match="constant A and a per-token Δ"):
        y.sum().backward()


# ---- complex-diagonal A (y = 2 Re(C h)): A, B, C and the states are complex tensors, their
# gradients torch's dL/dRe + i dL/dIm. Four channels (under the interpreter a cuda case costs
# in proportion to its programs: one per channel and sequence).
CXCH = CH if FULL else 4


def s4d_lin(**kw):
    """S4D-Lin's complex A and constant B, C per channel, with a selective Δ (softplus and
    bias) and D, zoh."""
    return F.mamba1(channels=CXCH, state=STATE, structure=CX, method=Method.ZOH, gate=False,
                    selective_B=False, selective_C=False, **kw)


COMPLEX_LENGTHS = [1, 15, 17, 37] if not FULL else [1, 255, 257, 2053]


@pytest.mark.parametrize("seqlen", COMPLEX_LENGTHS)
def test_complex_a_every_gradient(seqlen, seed, target):
    """Lengths 1, the backward's chunk (16 steps on both targets) ± 1 and a prime."""
    got = check_gradients(s4d_lin(), seqlen, seed, target, batch=1)
    assert got["A"].is_complex() and got["initial_state"].is_complex()


def complex_trapezoidal():
    """Complex A with selective B, C, Δ, the gate and the trapezoidal rule's previous token."""
    return F.mamba1(channels=CXCH, state=STATE, structure=CX, method=Method.TRAPEZOIDAL)


COMPLEX_CASES = {
    # constant Δ, A, B, C (S5-like) by the bilinear rule (no pole-free ratio: shifted states)
    "constant_bilinear": lambda: F.s5(channels=CXCH, state=STATE, method=Method.BILINEAR),
    "selective_A": lambda: F.mamba1(channels=CXCH, state=STATE, structure=CX, selective_A=True,
                                    method=Method.ZOH, gate=False),
    "selective_BC_trapezoidal": complex_trapezoidal,
}


@pytest.mark.parametrize("case", sorted(COMPLEX_CASES))
def test_complex_a_selectivity_and_methods(case, seed, target):
    check_gradients(COMPLEX_CASES[case](), 35, seed, target)


@pytest.mark.parametrize("variant", ["no_state", "no_terms", "varlen"])
def test_complex_a_states_and_terms(variant, seed, target):
    """Without an initial or final state; with D (the skip absent), z and Δ's bias omitted at
    the call; packed sequences (the previous token stops at their starts)."""
    fam = complex_trapezoidal() if variant != "no_terms" else s4d_lin()
    if variant == "no_state":
        check_gradients(fam, 23, seed, target, with_state=False, final=False)
    elif variant == "no_terms":
        check_gradients(fam, 23, seed, target, omit=("D", "delta_bias"))
    else:
        check_gradients(fam, 0, seed, target, batch=1, varlen=[13, 0, 20, 1, 17])


def test_complex_a_no_nan_at_large_decays_and_steps(seed, target):
    """|A| Δ up to ~1e3 and Δ up to ~10 with complex A (|a_im| up to ~1e3): Ā underflows,
    sin and cos of large phases; every gradient finite and correct."""
    got = check_gradients(s4d_lin(), 50, seed, target, batch=1,
                          scale={"delta": 10.0, "A": 100.0}, tol=1e-4)
    assert all(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all()
               for g in got.values())


def test_complex_a_trains_through_the_compiled_callable(seed, target):
    """loss.backward() through the callable: complex leaves get complex gradients equal to
    the oracle's."""
    fam = s4d_lin()
    kernel = ssmc.compile(fam, target=target)
    inputs = _inputs(fam, 1, 13, "float32", seed, target, with_state=True)

    def grads(fn):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
                  if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())}
        y, last = fn(**{**inputs, **leaves, "return_last_state": True})
        (y.square().sum() + torch.view_as_real(last).square().sum()).backward()
        return {n: v.grad for n, v in leaves.items()}

    def oracle(**kw):   # float64 inside, in autograd's graph of the same leaves
        return reference.run_float64_differentiable(signature.bind(fam, fam.convention, (), kw))

    got, want = grads(kernel), grads(oracle)
    assert got["A"].dtype == torch.complex64
    for name, g in want.items():
        assert_rel_close(f"d{name}", got[name], g, "float32")



@pytest.mark.parametrize("variant", ["mamba1", "selective_A", "constant_BC_delta", "trapezoidal",
                                     "bilinear", "complex_selective_A_trapezoidal",
                                     "complex_bilinear_constant_BC"])
def test_backward_compiles_for_sm90(variant, tmp_path):
    """The interpreter runs what the GPU compiler may refuse (a loop-carried value changing
    shape): the generated backward is compiled for sm_90 by Triton itself, no GPU needed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from ssmc.backends import triton as tb
    from ssmc.plan import make_plan
    kw = {"selective_A": dict(selective_A=True),
          "constant_BC_delta": dict(selective_B=False, selective_C=False, selective_delta=False,
                                    softplus=False, bias=False, gate=False),
          "trapezoidal": dict(method=Method.TRAPEZOIDAL),
          "bilinear": dict(method=Method.BILINEAR),   # no pole-free ratio: h_{t-1} gathered
          "complex_selective_A_trapezoidal": dict(structure=CX, selective_A=True,
                                                  method=Method.TRAPEZOIDAL),
          "complex_bilinear_constant_BC": dict(structure=CX, method=Method.BILINEAR,
                                               selective_B=False, selective_C=False)
          }.get(variant, {})
    plan = make_plan(F.mamba1(channels=64, state=16, **kw), Algorithm.SCAN)
    path = tmp_path / "kernel.py"
    path.write_text(tb.lower(plan, tb.default_config(plan)))
    # complex A: [BLOCK_D, N, CHUNK] tiles; real A: [BLOCK_D, CHUNK], two rows per thread
    tile = {"BLOCK_D": 4, "CHUNK": 32} if "complex" in variant else {"BLOCK_D": 2, "CHUNK": 256}
    flags = {**tile, "HAS_H0": True, "HAS_DHT": True, "VARLEN": False,
             "ATOMIC_BC": False}
    flags.update({f"HAS_{k.upper()}": True for k in plan.operands.droppable_terms()})
    sets = [flags, {**flags, "VARLEN": True, "HAS_H0": False, "HAS_DHT": False, "ATOMIC_BC": True,
                    **{f"HAS_{k.upper()}": False for k in plan.operands.droppable_terms()}}]
    script = Path(__file__).with_name("compile_sm90.py")
    out = subprocess.run([sys.executable, str(script), str(path), "_backward",
                          *(json.dumps(s) for s in sets)], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert out.returncode == 0 and out.stdout.count("ok") == len(sets), out.stderr[-3000:]


def test_no_nan_at_64k_tokens_on_the_cpu_target(seed):
    """L = 64K with |A| Δ up to ~1e3: every gradient finite and not all zero (their values
    against the oracle at such decays: test_no_nan_at_large_decays_and_steps; a float64
    autograd graph of 64K steps would take minutes)."""
    require_target_tools("cpu")
    fam = F.mamba1(channels=8, state=4)
    kernel = ssmc.compile(fam, target="cpu")
    inputs = _inputs(fam, 1, 65536, "float32", seed, "cpu", with_state=True)
    inputs["delta"] = inputs["delta"] * 10.0
    inputs["A"] = inputs["A"] * 100.0
    problem = signature.bind(fam, fam.convention, (), {**inputs, "return_last_state": True})
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(problem.u.shape, generator=g)
    dlast = torch.randn((1, 8, 4), generator=g)
    got = kernel.kernel_for(problem.family).backward(problem, dy, dlast)
    assert set(got) == set(NAMES)
    for name, grad in got.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_a_hybrid_model_trains_on_the_cpu_target(seed):
    """ssmc.nn.Model (SSM blocks beside attention and an MLP): one optimizer step through the
    generated backward lowers the loss on a fixed batch; every parameter gets a gradient."""
    require_target_tools("cpu")
    spec = """
ssm M { dims channels = 16, state = 4
        A diagonal = -exp(A_log)
        delta selective = softplus(dt + dt_bias)
        B, C selective per group
        D per channel
        gate silu(z)
        discretize exp_euler
        compute scan }
model Hybrid { dims d_model = 8, vocab = 20
               layers [M, mlp(hidden = 16), attention(heads = 2, kv_heads = 1), M] }
"""
    torch.manual_seed(seed)
    model = ssmc.nn.Model(spec, target="cpu")
    tokens = torch.randint(0, 20, (2, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@pytest.mark.parametrize("case", ["lengths", "groups", "d_per_head_dim", "varlen", "no_state",
                                  "no_terms"])
def test_ssd_gradients_on_the_cpu_target(case, seed):
    """Scalar A (Mamba-2's SSD convention) on the cpu target, whose chunked algorithm is the
    scan: every gradient against the oracle."""
    require_target_tools("cpu")
    kw = {"groups": dict(groups=2)}.get(case, {})
    fam = F.mamba2(heads=4, head_dim=8, state=4, chunk=16, **kw)
    if case == "d_per_head_dim":
        fam = dataclasses.replace(fam, D=dataclasses.replace(fam.D, sharing=Sharing.HEAD_DIM))
    kernel = ssmc.compile(fam, target="cpu")
    options = {"with_state": case != "no_state"}
    if case == "varlen":
        options["varlen"] = [9, 0, 21, 17]
    inputs = signature.example_inputs(fam, None, 1 if case == "varlen" else 2,
                                      0 if case == "varlen" else 33, seed=seed, **options)
    if case == "no_terms":
        for name in ("D", "z", "dt_bias"):
            inputs.pop(name)
    final = case != "no_state"
    flag = "return_varlen_states" if case == "varlen" else "return_final_states"
    problem = signature.bind(fam, fam.convention, (), {**inputs, flag: final})
    names, dy, dlast, want = oracle_gradients(problem, SSD_NAMES, final, seed)
    backend_kernel = kernel.kernel_for(problem.family)
    with _poisoned(backend_kernel, "cpu"):
        got = backend_kernel.backward(problem, dy.float(),
                                      dlast.float() if final else None)
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert_rel_close(f"d{name}", got[name], want[name], "float32")


def test_ssd_trains_through_autograd_on_the_cpu_target(seed):
    """mamba_chunk_scan_combined's signature on the cpu target: loss.backward() reaches every
    input, final_states' gradient included."""
    require_target_tools("cpu")
    fam = F.mamba2(heads=4, head_dim=8, state=4, chunk=16)
    kernel = ssmc.compile(fam, target="cpu")
    inputs = signature.example_inputs(fam, None, 2, 20, seed=seed, with_state=True)
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    y, final = kernel(**{**inputs, **leaves, "return_final_states": True})
    (y.square().sum() + final.sum()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in leaves.values())


def test_ssd_varlen_state_gradients_through_the_op_match_eager(seed):
    """Packed sequences with return_final_states and return_varlen_states: the gradients of
    both state outputs reach the inputs the same way through the torch op (register_autograd)
    as through the eager call."""
    require_target_tools("cpu")
    fam = F.mamba2(heads=4, head_dim=8, state=4, chunk=16)
    kernel = ssmc.compile(fam, target="cpu")
    inputs = signature.example_inputs(fam, None, 1, 0, seed=seed, with_state=True,
                                      varlen=[7, 12, 0, 9])

    def grads(fn):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        y, final, varlen = fn(**{**inputs, **leaves, "return_final_states": True,
                                 "return_varlen_states": True})
        (y.square().sum() + 3 * final.sum() + (varlen * torch.arange(4.0)[:, None, None, None])
         .sum()).backward()
        return {n: v.grad for n, v in leaves.items()}
    eager = grads(kernel)
    through_op = grads(lambda **kw: kernel.as_op()(**kw))
    for name, g in eager.items():
        assert_rel_close(f"d{name}", through_op[name], g, "float32", tol=1e-6)
