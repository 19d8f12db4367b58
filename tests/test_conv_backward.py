"""The convolution's generated backward (LTI families: K's adjoint as TIR on the cpu target, as
a Triton kernel on cuda; the FFT correlations in torch) against the float64 gradient oracle.

Every case draws fresh inputs, a random gradient for y and (where asked) for the final state,
and compares each input's gradient with torch autograd through
``reference.run_float64_differentiable`` (the recurrence, independent of the convolution) on
the same inputs; the backward's buffers are filled with NaN before the launch. Complex A's
final state takes a complex gradient (the loss is Re Σ conj(G) h_T, torch's convention).
The cuda target runs under the Triton interpreter on the CPU by default; on a GPU with
``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0``, where the cpu cases are left to the CPU run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import families as F
from conftest import (ON_CUDA, assert_rel_close, require_cuda_device, require_target_tools,
                      target_device)
import ssmc
from ssmc import signature
from ssmc.backends import reference
from ssmc.errors import SSMCError
from ssmc.ir import Algorithm, BCSpec, Method, Sharing

require_cuda_device()
CH, STATE = 8, 4
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
LENGTHS = [1, 2, 13, 31]
TARGETS = ["cuda"] if ON_CUDA else ["cpu", "cuda"]


@pytest.fixture(params=TARGETS)
def target(request):
    require_target_tools(request.param)
    return request.param


class _poisoned:
    """The backward's buffers allocated full of NaN for the duration: the cpu launcher's, or
    the generated Triton module's allocators (the K kernel's and the moments kernel's)."""

    def __init__(self, backend_kernel, target):
        self.kernel, self.target = backend_kernel, target

    def __enter__(self):
        if self.target == "cuda":
            module = self.kernel.module
            self.saved = module._empty, module.EMPTY
            module._empty = lambda shape, device: torch.full(shape, float("nan"), device=device)
            module.EMPTY = lambda shape, **kw: torch.full(tuple(shape), float("nan"), **kw)
        else:
            from ssmc.backends.cpu import launch
            launch.POISON = True

    def __exit__(self, *exc):
        if self.target == "cuda":
            self.kernel.module._empty, self.kernel.module.EMPTY = self.saved
        else:
            from ssmc.backends.cpu import launch
            launch.POISON = False


def lti(**kw):
    """A gated LTI family (Mamba-1's terms, nothing selective): softplus, bias, D, gate."""
    kw = dict(dict(channels=CH, state=STATE, algorithm=Algorithm.CONV, selective_B=False,
                   selective_C=False, selective_delta=False, name="GatedLTI"), **kw)
    return F.mamba1(**kw)


def s4d(**kw):
    return F.s4d(channels=CH, state=STATE, **kw)


def oracle_gradients(problem, final, seed):
    """(names, dy, dlast or None, {name: float64 / complex128 gradient}) from the oracle."""
    names = [n for n in NAMES if getattr(problem, n, None) is not None]
    leaves = []
    for n in names:
        t = getattr(problem, n).detach().cpu()
        t = t.to(torch.complex128) if t.is_complex() else t.double()
        leaves.append(t.requires_grad_(True))
    y64, last64 = reference.run_float64_differentiable(
        dataclasses.replace(problem, **dict(zip(names, leaves))))
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y64.shape, generator=g).to(problem.input.dtype).double()
    loss = (y64 * dy).sum()
    dlast = None
    if final:
        dlast = torch.randn(last64.shape, generator=g, dtype=last64.dtype)
        loss = loss + (last64 * dlast.conj()).real.sum()
    return names, dy, dlast, dict(zip(names, torch.autograd.grad(loss, leaves)))


def check(fam, seqlen, seed, target, batch=2, dtype="float32", with_state=True, final=True,
          omit=(), varlen=None, scale=None, tol=None):
    kernel = ssmc.compile(fam, target=target)
    device = target_device(target)
    inputs = signature.example_inputs(fam, None, batch, seqlen, dtype=dtype, device=device,
                                      seed=seed, with_state=with_state,
                                      **({"varlen": varlen} if varlen else {}))
    for name in omit:
        inputs.pop(name, None)
    for name, factor in (scale or {}).items():
        inputs[name] = inputs[name] * factor
    problem = signature.bind(fam, fam.convention, (), {**inputs, "return_last_state": final})
    names, dy, dlast, want = oracle_gradients(problem, final, seed)
    backend = kernel.kernel_for(problem.family)
    with _poisoned(backend, target):
        got = backend.backward(problem, dy.to(device, problem.u.dtype),
                               dlast.to(device, torch.complex64 if dlast.is_complex()
                                        else torch.float32) if final else None)
    assert set(got) >= set(names), (sorted(got), names)
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert_rel_close(f"d{name}", got[name], want[name], "float32", tol=tol)
    return got


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_s4d_every_gradient(seqlen, seed, target):
    check(s4d(), seqlen, seed, target)


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_every_method(method, seed, target):
    check(s4d(method=method), 17, seed, target)


@pytest.mark.parametrize("method", [Method.ZOH, Method.BILINEAR, Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
def test_complex_diagonal(method, seed, target):
    """Complex A, B, C and initial state (conjugate pairs: K = 2 Re Σ C Ā^k B̄ B)."""
    check(s4d(method=method, complex_a=True), 19, seed, target)


@pytest.mark.parametrize("variant", ["all_terms", "no_terms", "clamp", "groups", "no_state"])
def test_gate_bias_softplus_and_terms(variant, seed, target):
    kw, call = {}, {}
    if variant == "no_terms":
        call = dict(omit=("D", "z", "delta_bias"))
    elif variant == "clamp":
        kw = dict(clamp=(0.05, 0.5))
    elif variant == "no_state":
        call = dict(with_state=False, final=False)
    fam = lti(**kw)
    if variant == "groups":   # a constant B, C shared by each group of channels
        fam = dataclasses.replace(lti(groups=2), B=BCSpec(False, Sharing.GROUP),
                                  C=BCSpec(False, Sharing.GROUP))
    check(fam, 23, seed, target, **call)


def test_varlen(seed, target):
    """Packed sequences (one empty, one of a single token): per-sequence states and partials."""
    check(lti(), 0, seed, target, batch=1, varlen=[7, 0, 1, 12])


def test_varlen_complex_trapezoidal(seed, target):
    """Packed sequences with complex A and the previous-input term (the final state's R₋)."""
    check(s4d(method=Method.TRAPEZOIDAL, complex_a=True), 0, seed, target, batch=1,
          varlen=[5, 0, 1, 9])


def test_bf16(seed, target):
    check(lti(), 29, seed, target, dtype="bfloat16", tol=1e-2)


def test_no_nan_at_large_decays_and_steps(seed, target):
    """|A| Δ up to ~1e3 and Δ up to ~10: Ā underflows to 0, the gradients stay finite."""
    got = check(lti(), 37, seed, target, scale={"delta": 10.0, "A": 100.0}, tol=1e-4)
    assert all(torch.isfinite(g).all() for g in got.values())


def test_trains_through_the_compiled_callable(seed, target):
    """loss.backward() through the callable gives the backend's gradients, complex A too."""
    fam = s4d(complex_a=True)
    kernel = ssmc.compile(fam, target=target)
    inputs = signature.example_inputs(fam, None, 2, 11, dtype="float32",
                                      device=target_device(target), seed=seed, with_state=True)
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()
              if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())}
    y, last = kernel(**{**inputs, **leaves, "return_last_state": True})
    (y.square().sum() + last.abs().square().sum()).backward()
    problem = signature.bind(fam, fam.convention, (), {**inputs, "return_last_state": True})
    names, _, _, _ = oracle_gradients(problem, False, seed)
    for n in names:
        assert leaves[n].grad is not None and torch.isfinite(
            torch.view_as_real(leaves[n].grad) if leaves[n].grad.is_complex()
            else leaves[n].grad).all(), n


@pytest.mark.parametrize("what", ["dplr", "scalar"])
def test_what_has_no_backward_says_so(what, target):
    """Matrix A (Ā formed on the host) and scalar A (the SSD layout) refuse, with the reason,
    when loss.backward() runs; their forward works. (The cuda target has no conv for scalar A
    at all: its forward refuses.)"""
    if what == "scalar" and target == "cuda":
        pytest.skip("the cuda target's conv is not generated for scalar A, forward included")
    if what == "dplr":
        fam, reason = F.s4_dplr(), "dplr A"
    else:
        fam = F.mamba2(algorithm=Algorithm.CONV, selective_B=False, selective_C=False,
                       selective_delta=False)
        reason = "scalar A"
    kernel = ssmc.compile(fam, target=target, algorithm=Algorithm.CONV)
    inputs = signature.example_inputs(fam, None, 1, 5, dtype="float32",
                                      device=target_device(target), seed=0)
    x = "x" if "x" in inputs else "u"
    inputs[x].requires_grad_(True)
    out = kernel(**inputs)
    out = out[0] if isinstance(out, tuple) else out
    with pytest.raises(SSMCError, match=reason):
        out.sum().backward()


def test_gate_derivative_from_the_pass():
    """∂silu/∂z from sympy (``discretize.gate_derivative``) matches finite differences, and
    its printed fp32 form stays finite where e^-z overflows."""
    import numpy as np
    import sympy as sp
    from ssmc.discretize import GATE_Z, gate_derivative
    from ssmc.printers import print_expr
    gate, slope = gate_derivative("silu")
    f = sp.lambdify(GATE_Z, gate, "numpy")
    df = sp.lambdify(GATE_Z, slope, "numpy")
    z = np.linspace(-8.0, 8.0, 33)
    h = 1e-6
    assert np.allclose(df(z), (f(z + h) - f(z - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    text = print_expr(slope, "torch", names={"z": "zz"})
    zz = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])
    out = eval(text, {"torch": torch, "zz": zz})
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]), atol=1e-6)
