"""The generated convolutional mode (LTI families) against the float64 oracle.

Interpreter on the CPU by default; ``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0`` on a GPU (with
``SSMC_TEST_FULL=1`` for longer sequences). Each case compares y (convolution + D skip + the
zero-input response of the initial state) and the final state with ``reference.run_float64``.
The kernel buffers K are poisoned with NaN (the module's allocator is swapped), so a K element
the generated Triton kernel fails to write cannot pass.
"""
from __future__ import annotations

import pytest
import torch

import families as F
from conftest import DEVICE, FULL, TOL, assert_rel_close, require_cuda_device
from ssmc import signature
from ssmc.backends import reference
from ssmc.backends import triton as tb
from ssmc.ir import Algorithm, Method
from ssmc.plan import ir_hash, make_plan
import backend_calls as calls

require_cuda_device()
CH, STATE, SEQ = (64, 16, 512) if FULL else (8, 4, 17)
METHODS = list(Method)


def run_conv(fam, problem, dtype="float32"):
    kernel = calls.build(tb, make_plan(fam, Algorithm.CONV), {})
    module = kernel.module
    real_empty = module._empty
    module._empty = lambda shape, device: torch.full(shape, float("nan"), device=device)
    try:
        y, last = kernel(problem)
    finally:
        module._empty = real_empty
    y64, state64 = reference.run_float64(problem)
    assert y.dtype == problem.u.dtype
    assert_rel_close("y", y, y64, dtype)
    if problem.return_last_state:
        assert_rel_close("final state", last, state64, "float32", tol=TOL["float32"] * 4)
    return y


def bound(fam, seqlen=SEQ, dtype="float32", seed=0, **kw):
    inputs = signature.example_inputs(fam, None, 2, seqlen, dtype=dtype, device=DEVICE,
                                      seed=seed, **kw)
    return signature.bind(fam, fam.convention, (), inputs)


# zoh (S4D, S4D-Lin), the S5 varlen, dense and bilinear DPLR convs are test_oracle.py's
# cuda-conv cells.
@pytest.mark.parametrize("method", [m for m in METHODS if m is not Method.ZOH],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("complex_a", [False, True], ids=["S4D", "S4D-Lin"])
def test_conv_diagonal(method, complex_a, seed):
    fam = F.s4d(channels=CH, state=STATE, method=method, complex_a=complex_a)
    inputs = signature.example_inputs(fam, None, 2, SEQ, device=DEVICE, seed=seed, with_state=True)
    if method is Method.EULER:
        # Forward Euler is stable only inside |1 + a dt| < 1, i.e. dt < 2|Re a| / |a|^2: with
        # S4D-Lin's fast oscillating modes the example dt blows up over long sequences (the
        # oracle overflows too), so take half the largest stable step per channel.
        a = inputs["A"].to(torch.complex128)
        stable = (2 * a.real.abs() / a.abs() ** 2).min(dim=-1).values
        inputs["delta"] = torch.minimum(inputs["delta"].to(torch.float64), stable / 2).to(
            inputs["delta"].dtype)
    run_conv(fam, signature.bind(fam, fam.convention, (), inputs))


@pytest.mark.parametrize("seqlen", [1, 33])
def test_conv_lengths(seqlen, seed):
    fam = F.s4d(channels=CH, state=STATE)
    run_conv(fam, bound(fam, seqlen=seqlen, seed=seed, with_state=True))


def test_conv_bf16_without_states(seed):
    fam = F.s4d(channels=CH, state=STATE, complex_a=True)
    problem = bound(fam, dtype="bfloat16", seed=seed)
    assert problem.initial_state is None
    run_conv(fam, problem, "bfloat16")


@pytest.mark.parametrize("method", [Method.ZOH, Method.TRAPEZOIDAL], ids=lambda m: m.value)
def test_conv_dplr(method, seed):
    fam = F.s4_dplr(channels=4, state=STATE, rank=2, method=method)
    run_conv(fam, bound(fam, seed=seed, with_state=True))


def test_conv_supports_and_source():
    assert tb.supports(make_plan(F.s4d(), Algorithm.CONV)) is None
    from ssmc.ir import KernelPlan
    from ssmc.discretize import discretize
    selective = F.mamba1()
    plan = KernelPlan(selective, Algorithm.CONV, discretize(selective))
    assert "LTI" in tb.supports(plan)
    s4d = make_plan(F.s4d(method=Method.ZOH), Algorithm.CONV)
    src = calls.lower(tb, s4d, {})
    assert src == calls.lower(tb, s4d, {}) and ir_hash(s4d) in src
    assert "torch.expm1(a_*dt_)/a_" in src        # zoh's Bbar, printed from the IR (torch)
    kernel_src = src.split("def forward")[0].split("def ssmc_conv")[1]
    assert "abar = exp(lam)" in src and "_cos(" not in kernel_src  # real Abar > 0: no trig
    bil = calls.lower(tb, make_plan(F.s4d(method=Method.BILINEAR), Algorithm.CONV), {})
    assert "torch.log(" in bil and "_cos(ang)" in bil  # Abar may be negative: complex powers
    imports = {ln for ln in src.splitlines() if ln.startswith(("import ", "from "))}
    assert imports == {"import torch", "import triton", "import triton.language as tl"}
