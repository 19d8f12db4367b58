"""Equivalences of gradients: for one spec where several algorithms apply, each algorithm's
generated backward against the float64 oracle, and the algorithms against each other.

- an S4D-style LTI family (real diagonal A) and a gated LTI family (softplus, bias, D, gate):
  the scan's adjoint recurrence ≡ the convolution's (K's adjoint and FFT correlations);
- a Mamba-2-style scalar-A family: scan ≡ chunked (SSD convention).

On the same problem and the same random output gradients; the scan ≡ conv cases on the cpu
and cuda targets (Triton under the interpreter on the CPU by default), scan ≡ chunked on cpu.
An algorithm whose backward refuses skips the case, with its reason.
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
from ssmc.ir import Algorithm

require_cuda_device()
CH, STATE = 8, 4
TARGETS = ["cuda"] if ON_CUDA else ["cpu", "cuda"]


@pytest.fixture(params=TARGETS)
def target(request):
    require_target_tools(request.param)
    return request.param


def _oracle(problem, names, seed):
    leaves = []
    for n in names:
        t = getattr(problem, n).detach().cpu()
        leaves.append((t.to(torch.complex128) if t.is_complex() else t.double())
                      .requires_grad_(True))
    y64, last64 = reference.run_float64_differentiable(
        dataclasses.replace(problem, **dict(zip(names, leaves))))
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y64.shape, generator=g).to(problem.input.dtype).double()
    dlast = torch.randn(last64.shape, generator=g, dtype=last64.dtype)
    loss = (y64 * dy).sum() + (last64 * dlast.conj()).real.sum()
    return dy, dlast, dict(zip(names, torch.autograd.grad(loss, leaves)))


def check_equivalent(fam, algorithms, seqlen, seed, final_flag="return_last_state",
                     target="cpu"):
    """Each algorithm's gradients against the oracle, then against the first algorithm's."""
    require_target_tools(target)
    device = target_device(target)
    inputs = signature.example_inputs(fam, None, 2, seqlen, dtype="float32", device=device,
                                      seed=seed, with_state=True)
    problem = signature.bind(fam, fam.convention, (), {**inputs, final_flag: True})
    from ssmc.runtime.gradients import differentiable_names
    grads = {}
    want = None
    for algorithm in algorithms:
        kernel = ssmc.compile(fam, target=target, algorithm=algorithm)
        backend = kernel.kernel_for(problem.family)
        refusal = getattr(backend, "backward_refusal", None)   # absent where one is generated
        if refusal is not None:
            pytest.skip(f"{algorithm.value}: {refusal}")
        if want is None:
            names = differentiable_names(problem, backend.plan)
            dy, dlast, want = _oracle(problem, names, seed)
        got = backend.backward(problem, dy.to(device, torch.float32), dlast.to(
            device, torch.complex64 if dlast.is_complex() else torch.float32))
        for name in names:
            assert_rel_close(f"{algorithm.value} d{name}", got[name], want[name], "float32")
        grads[algorithm] = got
    first, *others = algorithms
    for algorithm in others:
        for name in names:
            ref = grads[first][name]
            ref = ref.to(torch.complex128) if ref.is_complex() else ref.double()
            assert_rel_close(f"{algorithm.value} vs {first.value} d{name}",
                             grads[algorithm][name], ref, "float32", tol=2e-5)


@pytest.mark.parametrize("seqlen", [1, 29])
def test_s4d_scan_and_conv(seqlen, seed, target):
    check_equivalent(F.s4d(channels=CH, state=STATE), [Algorithm.CONV, Algorithm.SCAN],
                     seqlen, seed, target=target)


def test_gated_lti_scan_and_conv(seed, target):
    fam = F.mamba1(channels=CH, state=STATE, algorithm=Algorithm.CONV, selective_B=False,
                   selective_C=False, selective_delta=False, name="GatedLTI")
    check_equivalent(fam, [Algorithm.CONV, Algorithm.SCAN], 23, seed, target=target)


def test_complex_s4d_scan_and_conv(seed, target):
    check_equivalent(F.s4d(channels=CH, state=STATE, complex_a=True),
                     [Algorithm.CONV, Algorithm.SCAN], 19, seed, target=target)


def test_mamba2_scan_and_chunked(seed):
    fam = F.mamba2(heads=4, head_dim=8, state=4, chunk=16)
    check_equivalent(fam, [Algorithm.CHUNKED, Algorithm.SCAN], 37, seed,
                     final_flag="return_final_states")
