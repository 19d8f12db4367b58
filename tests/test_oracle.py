"""One suite: every target x algorithm x family against the float64 oracle, at sizes no spec names.

Each case takes a family as its spec states it (examples/*.ssm, tests/families.py), draws fresh
random inputs at other sizes (a state and a head_dim that are not powers of two, channels not a
multiple of 64, two groups), binds them as a call would (the sizes come from the tensors), builds
the target's kernel for those sizes as ``ssmc.compile``'s callable does on first use, runs it with
its outputs poisoned (NaN) where the backend takes output buffers, and compares y and the final
(or in-place) state with ``ssmc.backends.reference.run_float64`` on the same inputs.

The ``reference`` target is that oracle: its cells check it against ``plain_recurrence`` below,
a float64 loop written here from the recurrence that evaluates the IR's symbolic Ā, B̄
numerically (``ssmc.discretize.evaluate``) and shares no code with ``backends/reference``.

A combination a backend refuses (``supports``) is a skip whose id ends in ``refused-...`` and
whose reason is the backend's own sentence; there is one test id for every cell of the matrix.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch

import families as F
from conftest import (EXAMPLES, ON_CUDA, TOL, poison, rel_err, require_cuda_device,
                      require_target_tools)
from ssmc import api, signature
from ssmc import backends as registry
from ssmc.backends import reference
from ssmc.discretize import discretize, evaluate
from ssmc.ir import Algorithm, AStructure, Convention, KernelPlan, Sharing, SSMFamily
from ssmc.plan import convention_of, make_plan

require_cuda_device()


# --------------------------------------------------------------------------------------------
# The matrix

@dataclass(frozen=True)
class Family:
    family: SSMFamily
    sizes: Dict[str, int]        # the call's sizes: none of them the spec's


def _example(file, name=None):
    return api._family(str(EXAMPLES / file), name)


FAMILIES = {
    # Mamba-1: diagonal A, selective; 24 channels (not a multiple of 64), state 12, 2 groups.
    "mamba1": lambda: Family(_example("mamba1.ssm"), dict(channels=24, state=12, groups=2)),
    # S4D-Lin / S5: complex diagonal A, LTI, zoh.
    "s5-complex": lambda: Family(_example("s5.ssm"), dict(channels=24, state=12)),
    # Mamba-2 SSD: scalar A, chunk 256 (the lengths below are one partial chunk).
    "mamba2": lambda: Family(_example("mamba2.ssm", "Mamba2"),
                             dict(heads=2, head_dim=40, state=24, groups=2)),
    # Mamba-2 with chunk 16, D per head_dim and a clamped dt (tests/families.py): lengths cross
    # chunk boundaries.
    "mamba2-chunk16": lambda: Family(F.mamba2(chunk=16, D=Sharing.HEAD_DIM, clamp=(1e-3, 0.1)),
                                     dict(heads=2, head_dim=48, state=12, groups=2)),
    # S4D: LTI diagonal, zoh, the conv family.
    "s4d": lambda: Family(_example("s4d.ssm"), dict(channels=20, state=12)),
    # S4: DPLR A (rank 2 here, 1 in the spec), bilinear, conv.
    "s4-dplr": lambda: Family(_example("s4.ssm"), dict(channels=6, state=10, rank=2)),
    # Dense A, LTI (tests/families.py).
    "dense": lambda: Family(F.dense(selective=False, algorithm=Algorithm.CONV),
                            dict(channels=6, state=6)),
}
TARGETS = {"reference": "reference", "cpu": "cpu", "cuda": "triton", "c": "c"}
ALGORITHMS = [Algorithm.SCAN, Algorithm.CHUNKED, Algorithm.STEP, Algorithm.CONV]
# What each case runs: sequence conventions (scan, chunked, conv) with and without states and
# packed (varlen); the decode step; bf16 inputs on the cuda target, once per algorithm (the
# interpreter is slow).
SEQUENCE_MODES = ("states", "no-states", "varlen")
STEP_MODES = ("step",)
BF16 = {("cuda", Algorithm.SCAN, "mamba1"), ("cuda", Algorithm.CHUNKED, "mamba2-chunk16"),
        ("cuda", Algorithm.STEP, "mamba2"), ("cuda", Algorithm.CONV, "s5-complex")}

SEQLEN = 21
VARLEN = [5, 0, 17, 1]          # an empty and a one-token sequence among them
VARLEN_CHUNK16 = [20, 0, 33, 3]  # 20 and 33 cross chunk boundaries of 16


@functools.lru_cache(maxsize=None)
def family_of(name) -> Family:
    return FAMILIES[name]()


def _plan_for_support(family: SSMFamily, algorithm: Algorithm) -> KernelPlan:
    # make_plan refuses conv for a selective family with a SpecError; supports() says the same
    # in words, so ask it with the plan built directly.
    chunk = family.compute.chunk_size or 64 if algorithm is Algorithm.CHUNKED else None
    return KernelPlan(family, algorithm, discretize(family), chunk)


def _slug(reason: str, target: str, algorithm: Algorithm, family: SSMFamily) -> str:
    if "time-invariant" in reason:
        return "refused-conv-needs-LTI"
    if "generates" in reason:
        return f"refused-no-{algorithm.value}-for-{family.A.structure.value}-A"
    if "trapezoidal" in reason:
        return "refused-trapezoidal-step"
    return "refused"


def _cells():
    for target, backend in TARGETS.items():
        for algorithm in ALGORITHMS:
            for name in FAMILIES:
                fam = family_of(name).family
                reason = registry.get(backend).supports(_plan_for_support(fam, algorithm))
                base = f"{target}-{algorithm.value}-{name}"
                if reason:
                    yield pytest.param(target, algorithm, name, None,
                                       id=f"{base}-{_slug(reason, target, algorithm, fam)}",
                                       marks=pytest.mark.skip(reason=f"{target}: {reason}"))
                    continue
                modes = STEP_MODES if algorithm is Algorithm.STEP else SEQUENCE_MODES
                if target == "cuda" and algorithm is Algorithm.CONV:
                    # The interpreter is slow: the conv's no-state path runs in test_triton_conv
                    # (bf16, without states).
                    modes = tuple(m for m in modes if m != "no-states")
                if (target, algorithm, name) in BF16:
                    modes = modes + ("bf16",)
                for mode in modes:
                    marks = XFAIL.get((target, algorithm, name, mode), ())
                    yield pytest.param(target, algorithm, name, mode, id=f"{base}-{mode}",
                                       marks=marks)


# Cases that fail against the oracle today (a real bug): strict xfails, so a fix turns them red.
XFAIL: Dict[Tuple[str, Algorithm, str, str], tuple] = {}


# --------------------------------------------------------------------------------------------
# Building and running one target's kernel, outputs poisoned

@functools.lru_cache(maxsize=None)
def kernel_for(target: str, family: SSMFamily, algorithm: Algorithm):
    """The backend kernel at the call's sizes, configured as ``ssmc.compile`` configures it."""
    plan = make_plan(family, algorithm)
    config = api.resolve_config(plan, api.parse_target(target))
    if target == "cpu":
        from test_cpu_helpers import CONFIG   # a fresh disk cache for the process; POISON on
        config = dict(config, **CONFIG)
    from ssmc.runtime.cache import default_cache
    return registry.get(TARGETS[target]).build(plan, config, default_cache())


def _nan_like(shape, dtype, device):
    return poison(torch.empty(shape, dtype=dtype, device=device))


def run(target: str, algorithm: Algorithm, kernel, problem):
    """(y, final state or None); the decode step updates ``problem.state`` in place.

    Poisoned outputs: the cpu target's launcher allocates them NaN (``launch.POISON``, set by
    test_cpu_helpers), the C backend hands its kernels NaN buffers itself; the Triton launchers
    are given NaN buffers here (the conv's K buffers through its allocator).
    """
    if target != "cuda":
        return kernel(problem)
    fam = problem.family
    cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
    state_dtype = torch.complex64 if cplx else torch.float32
    if algorithm is Algorithm.CHUNKED:
        final = None
        if problem.return_final_states:
            d = fam.dims
            final = _nan_like((problem.nseq, d.heads, d.head_dim, d.state), torch.float32,
                              problem.device)
        return kernel(problem, y=poison(torch.empty_like(problem.x)), final_states=final)
    module = kernel.module
    if algorithm is Algorithm.STEP:
        out = poison(torch.empty_like(problem.x))
        y, none = module.forward(**{k: getattr(problem, k) for k in (
            "state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")}, out=out)
        assert none is None and y.data_ptr() == out.data_ptr(), "the step must write into out"
        return y, None
    if algorithm is Algorithm.SCAN:
        state_out = None
        if problem.return_last_state:
            state_out = _nan_like((problem.nseq, fam.dims.d_inner, fam.dims.state), state_dtype,
                                  problem.device)
        return module.forward(**{k: getattr(problem, k) for k in (
            "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "cu_seqlens",
            "return_last_state")}, out=poison(torch.empty_like(problem.u)), state_out=state_out)
    real_empty = module._empty
    module._empty = lambda shape, device: _nan_like(shape, torch.float32, device)
    try:
        return kernel(problem)
    finally:
        module._empty = real_empty


# --------------------------------------------------------------------------------------------
# An independent float64 recurrence, for the reference target's own cells

def _f64(t):
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)).numpy()


def _as_sequence_arrays(p):
    """x (R, L, c), z, dt (R, L, c) or (c,), dt_bias (c,), A (c, n) or (c, n, n), B/C
    (R, L, c, n) or (c, n), D (c,), h0 (S, c, n), with c = heads*head_dim or channels."""
    fam = p.family
    dims = fam.dims
    n = dims.state
    step = p.convention is Convention.STATE_UPDATE
    ssd = fam.A.structure is AStructure.SCALAR
    if ssd:
        h, hp, g = dims.heads, dims.head_dim, dims.groups
        c = h * hp
        group_of = np.repeat(np.arange(h) // (h // g), hp)     # channel -> its head's group
        x = _f64(p.x)
        z = _f64(p.z)
        dt = _f64(p.dt)
        B, C = _f64(p.B), _f64(p.C)
        if step:           # (b, h, p), (b, h), (b, g, n): one token
            x, z = x[:, None], None if z is None else z[:, None]
            dt = dt[:, None] if fam.delta.selective else dt
            B = B[:, None] if fam.B.selective else B
            C = C[:, None] if fam.C.selective else C
            h0 = _f64(p.state)
        else:
            h0 = None if p.initial_states is None else _f64(p.initial_states)
        R, L = x.shape[:2]
        x = x.reshape(R, L, c)
        z = None if z is None else z.reshape(R, L, c)
        dt = np.repeat(dt, hp, axis=-1)                           # (R, L, c) or (c,)
        dt_bias = None if p.dt_bias is None else np.repeat(_f64(p.dt_bias), hp)
        a = np.repeat(_f64(p.A), hp)[:, None] * np.ones(n)        # (c, n)
        B = B[:, :, group_of] if fam.B.selective else B
        C = C[:, :, group_of] if fam.C.selective else C
        D = _f64(p.D)
        if D is not None:
            D = np.repeat(D, hp) if D.ndim == 1 else D.reshape(c)
        h0 = None if h0 is None else h0.reshape(-1, c, n)
    else:
        c, g = dims.d_inner, dims.groups
        group_of = np.arange(c) // (c // g)
        u, z, dt = _f64(p.x if step else p.u), _f64(p.z), _f64(p.dt if step else p.delta)
        B, C = _f64(p.B), _f64(p.C)
        if step:           # (b, d), (b, d), (b, g, n): one token at the end
            u, z = u[..., None], None if z is None else z[..., None]
            dt = dt[..., None] if fam.delta.selective else dt
            B = B[..., None] if fam.B.selective else B
            C = C[..., None] if fam.C.selective else C
            h0 = _f64(p.state)
        else:
            h0 = None if p.initial_state is None else _f64(p.initial_state)
        x = u.transpose(0, 2, 1)                                  # (R, L, c)
        z = None if z is None else z.transpose(0, 2, 1)
        dt = dt.transpose(0, 2, 1) if fam.delta.selective else dt
        bias = p.dt_bias if step else p.delta_bias
        dt_bias = None if bias is None else _f64(bias)
        a = _f64(p.A)
        if fam.A.structure is AStructure.DPLR:                    # diag(Λ) - Pᵀ Q
            a = a[..., :, None] * np.eye(n) - np.einsum("crn,crm->cnm", _f64(p.P), _f64(p.Q))
        # (b, g, n, l) -> (b, l, c, n) by each channel's group
        B = B[:, group_of].transpose(0, 3, 1, 2) if fam.B.selective else B
        C = C[:, group_of].transpose(0, 3, 1, 2) if fam.C.selective else C
        D = _f64(p.D)
    return x, z, dt, dt_bias, a, B, C, D, h0


def plain_recurrence(p) -> Tuple[np.ndarray, np.ndarray]:
    """y in the convention's layout and the last state (S, c, n), float64, token by token:
    h_t = Ā_t h_{t-1} + B̄_t B_t x_t + B̄'_t B_{t-1} x_{t-1},  y_t = C_t h_t (2 Re for complex A)
    + D x_t,  y_t *= silu(z_t), with Δ = clamp(softplus(dt + dt_bias)) as the spec says."""
    fam = p.family
    spec = fam.delta
    disc = discretize(fam)
    matrix = fam.A.structure in (AStructure.DPLR, AStructure.DENSE)
    cplx = fam.A.structure is AStructure.COMPLEX_DIAGONAL
    x, z, dt, dt_bias, a, B, C, D, h0 = _as_sequence_arrays(p)
    R, L, c = x.shape
    n = fam.dims.state
    delta = dt + dt_bias if spec.bias else dt
    if spec.softplus:
        delta = np.log1p(np.exp(-np.abs(delta))) + np.maximum(delta, 0.0)
    if spec.clamp is not None:
        delta = np.clip(delta, *spec.clamp)
    if getattr(p, "cu_seqlens", None) is not None:
        offsets = [int(v) for v in p.cu_seqlens.tolist()]
        spans = [(0, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
    else:
        spans = [(r, 0, L) for r in range(R)]
    # Ā, B̄, B̄' of every token at once: (R, L, c, n) when Δ varies, else (c, n[, n]).
    if matrix:
        assert delta.ndim == 1, "the matrix-A families here are time-invariant"
        coefs = evaluate(disc, delta, a)
    else:
        coefs = evaluate(disc, delta[..., None], a)
    y = np.zeros((R, L, c))
    last = np.zeros((len(spans), c, n), dtype=np.complex128 if cplx else np.float64)
    for s, (r, start, end) in enumerate(spans):
        h = np.zeros((c, n), dtype=last.dtype) if h0 is None else h0[s].astype(last.dtype)
        bx_prev = np.zeros_like(h)
        for t in range(start, end):
            abar, bbar, bprev = (k[r, t] if k.ndim == 4 and not matrix else k for k in coefs)
            b_t = B[r, t] if B.ndim == 4 else B
            c_t = C[r, t] if C.ndim == 4 else C
            bx = b_t * x[r, t][:, None]
            if matrix:
                h = (np.einsum("cij,cj->ci", abar, h) + np.einsum("cij,cj->ci", bbar, bx)
                     + np.einsum("cij,cj->ci", bprev, bx_prev))
            else:
                h = abar * h + bbar * bx + bprev * bx_prev
            bx_prev = bx
            out = (c_t * h).sum(-1)
            y[r, t] = 2.0 * out.real if cplx else out
        last[s] = h
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    # back to the convention's layout
    step = p.convention is Convention.STATE_UPDATE
    if fam.A.structure is AStructure.SCALAR:
        d = fam.dims
        y = y.reshape(R, L, d.heads, d.head_dim)
        y = y[:, 0] if step else y
        last = last.reshape(-1, d.heads, d.head_dim, n)
    else:
        y = y[:, 0] if step else y.transpose(0, 2, 1)
    return y, last


# --------------------------------------------------------------------------------------------
# The suite

def inputs_for(fam: Family, algorithm: Algorithm, mode: str, seed: int):
    """Keyword arguments for the convention of (family, algorithm) at the case's sizes."""
    conv = convention_of(make_plan(fam.family, algorithm)) if algorithm is not Algorithm.CONV \
        else fam.family.convention
    resized = signature.resized(fam.family, **fam.sizes)
    dtype = "bfloat16" if mode == "bf16" else "float32"
    if conv is Convention.STATE_UPDATE:
        return conv, signature.example_inputs(resized, conv, batch=3, dtype=dtype, seed=seed)
    chunk16 = fam.family.compute.chunk_size == 16
    seqlen = 37 if chunk16 else SEQLEN
    if mode == "varlen":
        return conv, signature.example_inputs(resized, conv, seed=seed, with_state=True,
                                              varlen=VARLEN_CHUNK16 if chunk16 else VARLEN)
    return conv, signature.example_inputs(resized, conv, batch=2, seqlen=seqlen, dtype=dtype,
                                          seed=seed, with_state=mode != "no-states")


@pytest.mark.parametrize("target,algorithm,name,mode", list(_cells()))
def test_matches_the_float64_oracle(target, algorithm, name, mode, seed):
    require_target_tools(target)
    fam = family_of(name)
    conv, kwargs = inputs_for(fam, algorithm, mode, seed)
    device = registry.get(TARGETS[target]).CAPABILITIES.device_now()
    if target == "cuda" and ON_CUDA:
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    # The spec's family, bound to tensors of other sizes: the sizes come from the tensors.
    problem = signature.bind(fam.family, conv, (), kwargs)
    sized = problem.family
    assert sized.dims != fam.family.dims, "the case must run at sizes the spec does not name"
    for key, value in fam.sizes.items():
        got = sized.dims.d_inner if key == "channels" else getattr(sized.dims, key)
        assert got == value, f"bound {key} is {got}, the tensors have {value}"
    step = conv is Convention.STATE_UPDATE
    before = problem.state.clone() if step else None

    if target == "reference":
        expected = plain_recurrence(problem)        # independent of backends/reference
    else:
        expected = reference.run_float64(problem)   # does not touch problem.state
    kernel = kernel_for(target, sized, algorithm)
    y, final = run(target, algorithm, kernel, problem)

    dtype = "bfloat16" if mode == "bf16" else "float32"
    assert y.dtype == problem.dtype and y.shape == problem.input.shape
    err = rel_err(y, expected[0])
    assert err <= TOL[dtype], f"y: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"
    # States are kept in fp32 (complex64), but computed from inputs of the case's dtype (the
    # chunked kernels multiply bf16 tiles), so the inputs' tolerance bounds them too.
    if step:
        assert final is None
        assert not torch.equal(before, problem.state), "the state was not updated in place"
        state, want = problem.state, expected[1].reshape(problem.state.shape)
    elif problem.wants_final_state:
        assert final is not None, "return_final_states / return_last_state gave no state"
        assert final.dtype in (torch.float32, torch.complex64)
        state, want = final, expected[1]
    else:
        assert final is None, "a final state nobody asked for"
        return
    err = rel_err(state, want)
    assert err <= TOL[dtype], f"state: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def test_every_cell_of_the_matrix_has_a_case():
    """Each target x algorithm x family is a case or a skip that says why; a family the suite
    lists runs somewhere, and at least one case per target runs at every algorithm it has."""
    ids = {(p.values[0], p.values[1], p.values[2]) for p in _cells()}
    assert len(ids) == len(TARGETS) * len(ALGORITHMS) * len(FAMILIES)
    runnable = {(p.values[0], p.values[1]) for p in _cells() if p.values[3] is not None}
    for target, backend in TARGETS.items():
        caps = registry.get(backend).CAPABILITIES
        for algorithm in ALGORITHMS:
            if caps.structures(algorithm):
                assert (target, algorithm) in runnable, (target, algorithm.value)
