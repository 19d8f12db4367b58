"""The C target's kernels, built with gcc and called through ctypes, against the float64 oracle.

Every kernel is compiled with -std=c99 -pedantic -Wall -Wextra -Werror. Inputs are fresh random
(the ``seed`` fixture), outputs are poisoned (the C backend hands the kernel NaN-filled buffers).
"""
from __future__ import annotations

import ctypes
import dataclasses
import shutil

import pytest
import torch

from conftest import assert_rel_close

from families import MATRIX_CONV_FAMILIES, mamba1, mamba2, s4_dplr, s4d, s5
from ssmc.backends import reference
from ssmc.ir import Algorithm, AStructure, BCSpec, Method, Sharing
from ssmc.plan import convention_of, make_plan
from ssmc.signature import bind, example_inputs

c_backend = pytest.importorskip("ssmc.backends.c")
from ssmc.backends.c.calling import marshal  # noqa: E402
from ssmc.backends.c.layout import make_layout  # noqa: E402
import backend_calls as calls

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (apt-get install gcc)")

STRICT = {"cflags": ["-pedantic", "-Wextra"]}
LENGTHS = (1, 7, 17, 33)
_KERNELS = {}


def c_kernel(plan):
    """One build per plan per session (gcc's output is cached on disk as well)."""
    key = (plan.family, plan.algorithm)
    if key not in _KERNELS:
        _KERNELS[key] = calls.build(c_backend, plan, STRICT)
    return _KERNELS[key]


def plan_of(family, algorithm=None):
    plan = make_plan(family, algorithm)
    reason = c_backend.supports(plan)
    assert reason is None, reason
    return plan


def inputs(plan, seed, batch=2, seqlen=7, **options):
    return example_inputs(plan.family, convention_of(plan), batch=batch, seqlen=seqlen,
                          seed=seed, **options)


def check_against_oracle(plan, kwargs, dtype="float32", run=None):
    """Run the plan's C kernel (or ``run``) on ``kwargs`` and compare y and the state with the
    float64 oracle; the oracle runs first, on the same bound problem."""
    problem = bind(plan.family, convention_of(plan), (), kwargs)
    y64, state64 = reference.run_float64(problem)
    y, final = (run or c_kernel(plan))(problem)
    assert y.dtype == problem.dtype
    assert_rel_close("y", y, y64, dtype)
    if plan.algorithm is Algorithm.STEP:
        assert final is None
        assert_rel_close("state (updated in place)", problem.state, state64, "float32")
    elif problem.wants_final_state:
        assert_rel_close("final state", final, state64, "float32")
    else:
        assert final is None
    return problem


def with_const_bc(family, sharing):
    return dataclasses.replace(family, B=BCSpec(False, sharing), C=BCSpec(False, sharing))


SCAN_FAMILIES = {
    "mamba1-g2": lambda m: mamba1(method=m, groups=2),
    "mamba1-selective-A": lambda m: mamba1(method=m, selective_A=True),
    "mamba1-constant-BC-per-channel": lambda m: mamba1(method=m, selective_B=False, selective_C=False),
    "mamba1-constant-BC-per-group": lambda m: with_const_bc(mamba1(method=m, groups=2), Sharing.GROUP),
    "mamba1-no-D-z-softplus-bias": lambda m: mamba1(method=m, D=False, gate=False, softplus=False,
                                                    bias=False),
    "mamba1-clamp": lambda m: mamba1(method=m, clamp=(2e-3, 0.05)),
    "mamba2-g2-chunked": lambda m: mamba2(method=m, groups=2),
    "mamba2-scan": lambda m: mamba2(method=m, algorithm=Algorithm.SCAN),
    "mamba2-selective-A": lambda m: mamba2(method=m, selective_A=True),
    "mamba2-D-per-head-dim-no-gate-clamp": lambda m: mamba2(method=m, D=Sharing.HEAD_DIM, gate=False,
                                                            clamp=(2e-3, 0.05)),
    "mamba2-constant-BC-per-head": lambda m: mamba2(method=m, selective_B=False, selective_C=False),
    "s4d-scan": lambda m: s4d(method=m, algorithm=Algorithm.SCAN),
    "s5-scan": lambda m: s5(method=m),
    "complex-selective": lambda m: mamba1(method=m, structure=AStructure.COMPLEX_DIAGONAL, groups=2),
}


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
@pytest.mark.parametrize("name", list(SCAN_FAMILIES))
def test_scan_and_chunked_match_oracle(name, method, seed):
    plan = plan_of(SCAN_FAMILIES[name](method))
    for i, seqlen in enumerate(LENGTHS):
        check_against_oracle(plan, inputs(plan, seed + i, seqlen=seqlen, with_state=True))
    check_against_oracle(plan, inputs(plan, seed, seqlen=5))   # no initial or final state


CONV_FAMILIES = {
    "s4d": lambda m: s4d(method=m),
    "s4d-complex": lambda m: s4d(method=m, complex_a=True),
    "lti-diagonal-gated-bias": lambda m: mamba1(method=m, algorithm=Algorithm.CONV, groups=2,
                                                selective_B=False, selective_C=False,
                                                selective_delta=False),
    "lti-scalar-ssd": lambda m: mamba2(method=m, algorithm=Algorithm.CONV, selective_B=False,
                                       selective_C=False, selective_delta=False),
}


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
@pytest.mark.parametrize("name", list(CONV_FAMILIES))
def test_convolution_matches_oracle(name, method, seed):
    plan = plan_of(CONV_FAMILIES[name](method))
    assert plan.algorithm is Algorithm.CONV
    for i, seqlen in enumerate(LENGTHS):
        check_against_oracle(plan, inputs(plan, seed + i, seqlen=seqlen, with_state=True))
    check_against_oracle(plan, inputs(plan, seed, seqlen=9))


@pytest.mark.parametrize("name", list(MATRIX_CONV_FAMILIES))
def test_matrix_a_convolution_matches_oracle(name, seed):
    """DPLR/dense A: Abar, Bbar B from the host's float64 discretization, K in C."""
    plan = plan_of(MATRIX_CONV_FAMILIES[name]())
    assert plan.algorithm is Algorithm.CONV
    for i, seqlen in enumerate((1, 7, 33)):
        check_against_oracle(plan, inputs(plan, seed + i, seqlen=seqlen, with_state=True))
    check_against_oracle(plan, inputs(plan, seed, seqlen=9))
    check_against_oracle(plan, inputs(plan, seed, batch=1, seqlen=27, with_state=True,
                                      varlen=[6, 0, 1, 20]))


STEP_FAMILIES = {
    "mamba1": lambda m: mamba1(method=m, groups=2),
    "mamba1-selective-A": lambda m: mamba1(method=m, selective_A=True),
    "mamba2-g2": lambda m: mamba2(method=m, groups=2),
    "mamba2-D-per-head-dim": lambda m: mamba2(method=m, D=Sharing.HEAD_DIM, selective_A=True),
    "s5": lambda m: s5(method=m),
}


@pytest.mark.parametrize("method", [m for m in Method if m is not Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("name", list(STEP_FAMILIES))
def test_decode_step_matches_oracle(name, method, seed):
    plan = plan_of(STEP_FAMILIES[name](method), Algorithm.STEP)
    for batch in (1, 3):
        check_against_oracle(plan, inputs(plan, seed + batch, batch=batch))


@pytest.mark.parametrize("family", [mamba2(groups=2), mamba1(method=Method.TRAPEZOIDAL),
                                    s4d(complex_a=True, method=Method.TRAPEZOIDAL),
                                    mamba2(algorithm=Algorithm.CONV, selective_B=False,
                                           selective_C=False, selective_delta=False)],
                         ids=["ssd", "scan-trapezoidal", "conv-complex", "conv-ssd"])
def test_varlen_sequences_are_independent(family, seed):
    plan = plan_of(family)
    for lengths in ([5, 0, 12], [1, 7, 17, 3]):
        check_against_oracle(plan, inputs(plan, seed, varlen=lengths, with_state=True))
        check_against_oracle(plan, inputs(plan, seed + 1, varlen=lengths))


def _strided_copy(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``'s values in a view with every element of ``dim`` two apart (NaN in between)."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.full(shape, float("nan"), dtype=t.dtype)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    view = big[tuple(index)]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("family,names", [
    (mamba2(groups=2), ("x", "dt", "B", "z", "initial_states")),
    (mamba1(groups=2), ("u", "delta", "B", "C", "A", "initial_state")),
    (s5(), ("u", "B", "C", "A", "initial_state")),
], ids=["ssd", "selective-scan", "complex"])
def test_noncontiguous_views_pass_with_their_strides(family, names, seed):
    plan = plan_of(family)
    kwargs = inputs(plan, seed, seqlen=9, with_state=True)
    for name in names:
        kwargs[name] = _strided_copy(kwargs[name], 0)   # the conventions want unit last strides
    problem = check_against_oracle(plan, kwargs)
    # fp32 views go to C as they are: the pointers the kernel gets are the caller's.
    call = marshal(make_layout(plan), problem)
    for name in names:
        assert call.values[name].data_ptr() == getattr(problem, name).data_ptr(), name


def test_step_updates_a_strided_state_in_place(seed):
    plan = plan_of(mamba2(groups=2), Algorithm.STEP)
    kwargs = inputs(plan, seed, batch=2)
    kwargs["state"] = _strided_copy(kwargs["state"], 1)
    big = kwargs["state"]._base
    check_against_oracle(plan, kwargs)
    assert torch.isnan(big[:, 1::2]).all(), "the kernel wrote between the state's elements"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", [mamba2(), mamba1()], ids=["ssd", "selective-scan"])
def test_half_precision_inputs_are_converted_at_the_boundary(family, dtype, seed):
    plan = plan_of(family)
    check_against_oracle(plan, inputs(plan, seed, seqlen=17, dtype=dtype, with_state=True), dtype)


def test_c_entry_checks_its_sizes_and_offsets():
    """The C function itself refuses bad varlen offsets (SSMC_ERR_*) before writing anything."""
    plan = plan_of(mamba1())
    kernel = c_kernel(plan)
    layout = kernel.layout
    fn = kernel._fn
    args = []
    bad = (ctypes.c_int64 * 3)(0, 5, 3)          # decreasing
    for p in layout.params:
        if p.kind == "size":
            args.append({"batch": 1, "seqlen": 4, "nseq": 2}[p.name])
        elif p.kind == "offsets":
            args.append(ctypes.addressof(bad))
        else:
            args += [None] + [0] * len(p.dims)
    assert fn(*args) == 3
    args[0] = 2                                   # varlen needs batch 1
    assert fn(*args) == 2
    args[0], args[1] = -1, 4
    assert fn(*args) == 1


@pytest.mark.parametrize("family,algorithm,reason", [
    (mamba1(structure=AStructure.DPLR, rank=1, selective_B=False, selective_C=False,
            selective_delta=False), Algorithm.SCAN, "dplr"),
    (mamba1(structure=AStructure.DENSE), Algorithm.SCAN, "dense"),
    (s4_dplr(algorithm=Algorithm.STEP), Algorithm.STEP, "dplr"),
    (mamba1(), Algorithm.CHUNKED, "chunked"),
    (mamba1(method=Method.TRAPEZOIDAL), Algorithm.STEP, "trapezoidal"),
    (mamba1(), Algorithm.CONV, "LTI"),
])
def test_supports_gives_the_reason(family, algorithm, reason):
    from ssmc.ir import KernelPlan
    plan = KernelPlan(family, algorithm, disc=None, chunk_size=None)
    text = c_backend.supports(plan)
    assert text and reason in text


@pytest.mark.parametrize("family", [mamba2(groups=2), mamba1(method=Method.ZOH), s5()],
                         ids=["ssd", "selective-scan", "complex"])
def test_every_tuning_candidate_matches_oracle(family, seed):
    plan = plan_of(family)
    configs = c_backend.candidates(plan)
    assert c_backend.default_config(plan) in configs
    for config in configs:
        kernel = calls.build(c_backend, plan, dict(config, **STRICT))
        kwargs = inputs(plan, seed, seqlen=17, with_state=True)
        check_against_oracle(plan, kwargs, run=kernel)
