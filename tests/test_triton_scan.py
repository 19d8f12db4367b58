"""The generated Triton selective scan against the float64 oracle.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported).
On a GPU machine ``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0`` compiles the same cases for it, and
``SSMC_TEST_FULL=1`` makes the shapes full size (and runs the >2^31-element offsets case).
Every case draws fresh inputs from the ``seed`` fixture and compares y and the final state with
``ssmc.backends.reference.run_float64`` on the same inputs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import families as F
from conftest import DEVICE, FULL, ON_CUDA, TOL, assert_rel_close, poison, require_cuda_device
from ssmc import signature
from ssmc.backends import reference
from ssmc.backends import triton as tb
from ssmc.ir import Algorithm, AStructure, Method
from ssmc.plan import ir_hash, make_plan
import backend_calls as calls

require_cuda_device()
CH, STATE, SEQ = (256, 16, 300) if FULL else (8, 4, 17)
CPLX = AStructure.COMPLEX_DIAGONAL


def scan_family(**kw):
    args = dict(channels=CH, state=STATE)
    args.update(kw)
    return F.mamba1(**args)


def bound(fam, seqlen=SEQ, batch=2, dtype="float32", seed=0, **kw):
    inputs = signature.example_inputs(fam, None, batch, seqlen, dtype=dtype, device=DEVICE,
                                      seed=seed, **kw)
    return signature.bind(fam, fam.convention, (), inputs)


def check(fam, problem, dtype="float32", config=None):
    """Run the generated scan on ``problem`` with poisoned outputs; compare with the oracle."""
    kernel = calls.build(tb, make_plan(fam, Algorithm.SCAN), config or {})
    out = poison(torch.empty_like(problem.u))
    nseq = problem.nseq
    cplx = fam.A.structure is CPLX
    state_out = None
    if problem.return_last_state:
        state_out = poison(torch.empty((nseq, fam.dims.channels, fam.dims.state),
                                       dtype=torch.complex64 if cplx else torch.float32,
                                       device=DEVICE))
    y, last = kernel.module.forward(**{k: getattr(problem, k) for k in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "cu_seqlens",
        "return_last_state")}, out=out, state_out=state_out)
    y64, state64 = reference.run_float64(problem)
    assert y.dtype == problem.u.dtype
    assert_rel_close("y", y, y64, dtype)
    if problem.return_last_state:
        assert last.dtype == (torch.complex64 if cplx else torch.float32)
        # the state is accumulated in fp32 from the same (rounded) inputs as the oracle's
        assert_rel_close("final state", last, state64, "float32", tol=TOL["float32"] * 4)
    return y


CASES = {
    "mamba1-zoh": dict(method=Method.ZOH),
    "mamba1-bilinear": dict(method=Method.BILINEAR),
    "mamba1-euler": dict(method=Method.EULER),
    "mamba1-trapezoidal": dict(method=Method.TRAPEZOIDAL),
    "complex-exp_euler": dict(structure=CPLX),
    "complex-zoh": dict(structure=CPLX, method=Method.ZOH),
    "complex-bilinear": dict(structure=CPLX, method=Method.BILINEAR),
    "complex-trapezoidal": dict(structure=CPLX, method=Method.TRAPEZOIDAL),
    "selective-A": dict(selective_A=True),
    "selective-A-complex-zoh": dict(selective_A=True, structure=CPLX, method=Method.ZOH),
    "groups2": dict(groups=2),
    "clamp-no-softplus-no-bias": dict(softplus=False, bias=False, clamp=(1e-3, 0.05)),
    "softplus-clamp": dict(clamp=(0.01, 0.06)),
    "no-D-no-gate": dict(D=False, gate=False),
    "constant-delta": dict(selective_delta=False),
    "constant-B": dict(selective_B=False),
    "constant-C-complex": dict(selective_C=False, structure=CPLX),
}
# The default Mamba-1, S4D (LTI zoh) and S5 (complex LTI zoh) scans, with and without states,
# and Mamba-1 in bf16 are test_oracle.py's cuda-scan cells.


@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_matches_oracle(case, seed):
    fam = scan_family(**CASES[case])
    check(fam, bound(fam, seed=seed, with_state=True))


@pytest.mark.parametrize("dtype", ["float16"])
def test_scan_16bit_inputs(dtype, seed):
    fam = scan_family()
    check(fam, bound(fam, dtype=dtype, seed=seed, with_state=True), dtype)


@pytest.mark.parametrize("seqlen", [1, 7, 16, 17, 33])
def test_scan_lengths(seqlen, seed):
    fam = scan_family()
    check(fam, bound(fam, seqlen=seqlen, seed=seed, with_state=True))


@pytest.mark.parametrize("cplx", [False, True])
def test_scan_varlen_does_not_leak(cplx, seed):
    """Packed sequences (one empty): each starts from its own state, none sees another."""
    fam = scan_family(structure=CPLX if cplx else AStructure.DIAGONAL, method=Method.TRAPEZOIDAL)
    lengths = [5, 0, 12, 16] if not FULL else [100, 0, 257, 301]
    check(fam, bound(fam, seed=seed, with_state=True, varlen=lengths))


CONFIGS = [
    {"split": 2, "block_d": 4, "chunk": 4},
    {"split": 4, "block_d": 2, "chunk": 16, "prefetch": False},
    {"split": 1, "block_d": 4, "chunk": 2, "num_warps": 1},
    {"split": 1, "block_d": 8, "chunk": 8, "prefetch": False},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_scan_configs(config, seed):
    """Tile shapes are tunables only: channel masks (12 channels in blocks of 4/2/8), state
    split across lanes, chunk lengths."""
    fam = scan_family(channels=12 if not FULL else 200, state=8 if not FULL else 16)
    check(fam, bound(fam, seed=seed, with_state=True), config=config)


def test_scan_few_channels_variant(seed):
    """With fewer programs than SMs the launcher runs the module's kernel state-split."""
    fam = scan_family(state=8 if not FULL else 16)
    plan = make_plan(fam, Algorithm.SCAN)
    kernel = calls.build(tb, plan, {})
    assert kernel.module.FEW_CONFIG["split"] == 4
    saved = kernel.module.SM_COUNT
    kernel.module.SM_COUNT = 10 ** 6
    try:
        check(fam, bound(fam, seed=seed, with_state=True))
        check(fam, bound(fam, seed=seed + 1, with_state=True, varlen=[3, 9, 5]))
    finally:
        kernel.module.SM_COUNT = saved


SEGMENTED = {  # case -> (family kwargs, input dtype, extra config)
    "mamba1-bf16": (dict(), "bfloat16", {}),
    "euler-fp16": (dict(method=Method.EULER), "float16", {}),
    "bilinear-complex": (dict(structure=CPLX, method=Method.BILINEAR), "float32", {}),
    "trapezoidal": (dict(method=Method.TRAPEZOIDAL), "float32", {}),
    "trapezoidal-complex-bf16": (dict(structure=CPLX, method=Method.TRAPEZOIDAL), "bfloat16", {}),
    "trapezoidal-constant-B": (dict(method=Method.TRAPEZOIDAL, selective_B=False), "float32", {}),
    "selective-A-zoh": (dict(selective_A=True, method=Method.ZOH), "float32", {}),
    "constant-delta": (dict(selective_delta=False), "float32", {}),
    "split2": (dict(), "float32", {"seg_split": 2, "seg_block_d": 2}),
}


@pytest.mark.parametrize("case", sorted(SEGMENTED))
def test_scan_segmented(case, seed):
    """The segmented scan (local end states, combine, re-run) forced to 3 segments of 37 steps:
    segment boundaries inside and at the end of chunks, initial and final states."""
    kw, dtype, extra = SEGMENTED[case]
    fam = scan_family(**kw)
    config = {"segments": 3, "chunk": 4, "block_d": 4, **extra}
    check(fam, bound(fam, seqlen=37, dtype=dtype, seed=seed, with_state=True), dtype, config)


@pytest.mark.parametrize("cplx", [False, True])
def test_scan_segmented_varlen(cplx, seed):
    """Packed sequences: segments are per sequence (none crosses a boundary; empty ones)."""
    fam = scan_family(structure=CPLX if cplx else AStructure.DIAGONAL, method=Method.TRAPEZOIDAL)
    check(fam, bound(fam, seed=seed, with_state=True, varlen=[5, 0, 21, 11]),
          config={"segments": 4, "chunk": 4, "block_d": 8})


def test_scan_segmented_without_states(seed):
    fam = scan_family(method=Method.ZOH)
    problem = bound(fam, seqlen=37, seed=seed)
    assert problem.initial_state is None and not problem.return_last_state
    check(fam, problem, config={"segments": 5, "chunk": 8})


def test_scan_segments_chosen_by_size(seed):
    """With few programs per SM and long enough sequences the launcher segments on its own."""
    fam = scan_family()
    plan = make_plan(fam, Algorithm.SCAN)
    config = {"seg_min_len": 8}
    kernel = calls.build(tb, plan, config)
    mod = kernel.module
    assert mod._n_segments(2, CH, 37, 0) == 1             # CPU: no SMs, one pass
    # 2 programs << 1000 SMs: as many as the length allows
    assert mod._n_segments(2, CH, 37, 1000) == 37 // 2 // 8
    assert mod._n_segments(2, CH, 37, 1) == 1             # 2 programs already fill one SM
    saved = mod.SM_COUNT
    try:
        mod.SM_COUNT = 1000
        check(fam, bound(fam, seqlen=37, seed=seed, with_state=True), config=config)
    finally:
        mod.SM_COUNT = saved


@pytest.mark.parametrize("seqlen", [1, 7, 9, 37])
def test_scan_prefetch_bc_lengths(seqlen, seed):
    """B/C tiles of the first 2 states carried one chunk ahead: no full chunk (1, 7), one full
    chunk + a masked tail (9 = chunk + 1), several (37); from an initial state."""
    fam = scan_family()
    config = {"prefetch_bc": 2, "chunk": 8}
    check(fam, bound(fam, seqlen=seqlen, seed=seed, with_state=True), config=config)


PREFETCH_BC = {  # case -> (family kwargs, input dtype, config, bound kwargs)
    "bf16-every-state": (dict(), "bfloat16", {"prefetch_bc": 99},
                                dict(seqlen=37)),
    "varlen-trapezoidal": (dict(method=Method.TRAPEZOIDAL), "float32",
                           {"prefetch_bc": 1, "chunk": 4},
                           dict(varlen=[5, 0, 12, 16] if not FULL else [100, 0, 257, 301])),
    "groups2-split2-no-uz-prefetch": (dict(groups=2), "float32",
                                      {"prefetch_bc": 1, "split": 2, "block_d": 4, "chunk": 4,
                                       "prefetch": False}, dict(seqlen=37)),
    "constant-C": (dict(selective_C=False), "float32",
                          {"prefetch_bc": 2, "chunk": 4}, dict(seqlen=37)),
    "segmented": (dict(), "float32", {"prefetch_bc": 2, "segments": 3, "chunk": 4,
                                      "block_d": 4}, dict(seqlen=37)),
}


@pytest.mark.parametrize("case", sorted(PREFETCH_BC))
def test_scan_prefetch_bc(case, seed):
    kw, dtype, config, bound_kw = PREFETCH_BC[case]
    fam = scan_family(**kw)
    check(fam, bound(fam, dtype=dtype, seed=seed, with_state=True, **bound_kw), dtype, config)


def test_scan_prefetch_bc_source():
    """The kernel carries B/C tiles of its first PF_BC states across chunks (C not in the
    segmented pass 1); the launch clamps prefetch_bc to the lane's states; complex A carries
    none; bad values are refused."""
    plan = make_plan(scan_family(), Algorithm.SCAN)
    source = calls.lower(tb, plan, {})
    assert "for j in tl.static_range(PF_BC):\n        b_pre = b_pre + (tl.load(" in source
    assert "if not LOCAL:\n        c_pre = ()" in source
    assert "if j < PF_BC:\n                bj = _cols4(b_pre[" in source
    assert 'PF_BC=min(cfg["prefetch_bc"], N // cfg["split"])' in source
    cplx = calls.lower(tb, make_plan(scan_family(structure=CPLX), Algorithm.SCAN), {"prefetch_bc": 2})
    assert "b_pre" not in cplx
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="prefetch_bc"):
            calls.lower(tb, plan, {"prefetch_bc": bad})


def test_scan_large_delta(seed):
    """Δ up to ~8 with |a| up to ~16: decays of e^-128 per step must flush to 0, not NaN."""
    fam = scan_family(method=Method.ZOH)
    inputs = signature.example_inputs(fam, None, 2, SEQ, device=DEVICE, seed=seed, with_state=True)
    inputs["delta"] = inputs["delta"] + 6.0 * torch.rand(inputs["delta"].shape, device=DEVICE)
    check(fam, signature.bind(fam, fam.convention, (), inputs))


def test_scan_through_compile_api(seed):
    import ssmc
    fam = scan_family()
    scan = ssmc.compile(fam, target="cuda", algorithm="scan")
    kwargs = scan.example_inputs(batch=2, seqlen=SEQ, seed=seed, device=DEVICE, with_state=True)
    y, last = scan(**kwargs)
    problem = signature.bind(fam, fam.convention, (), kwargs)
    y64, state64 = reference.run_float64(problem)
    assert_rel_close("y", y, y64)
    assert_rel_close("final state", last, state64, tol=TOL["float32"] * 4)


def test_scan_source_is_generated_from_the_ir():
    zoh = make_plan(scan_family(method=Method.ZOH), Algorithm.SCAN)
    src = calls.lower(tb, zoh, {})
    assert src == calls.lower(tb, zoh, {}), "generation must be deterministic"
    assert f"family {zoh.family.name}" in src and ir_hash(zoh) in src
    assert "_expm1(" in src            # zoh's B = expm1(a dt)/a, printed from the IR
    assert "math." not in src and "np." not in src
    euler = calls.lower(tb, make_plan(scan_family(), Algorithm.SCAN), {})
    assert "tl.exp2(" in euler and "_expm1(" not in euler.split("def ssmc_scan")[1]
    cplx = calls.lower(tb, make_plan(scan_family(structure=CPLX), Algorithm.SCAN), {})
    assert "_cos(" in cplx and "_sin(" in cplx and "2.0 * y_tile" in cplx
    imports = [ln for src_ in (src, cplx) for ln in src_.splitlines()
               if ln.startswith(("import ", "from "))]
    assert sorted(set(imports)) == ["import torch", "import triton", "import triton.language as tl"]


def test_scan_artifact_runs_standalone(tmp_path, seed):
    import importlib.util
    fam = scan_family(method=Method.BILINEAR)
    plan = make_plan(fam, Algorithm.SCAN)
    (path,) = map(Path, calls.write_artifact(tb, plan, {}, tmp_path))
    assert path.name == "kernel.py" and path.read_text() == calls.lower(tb, plan, {})
    spec = importlib.util.spec_from_file_location("ssmc_artifact_scan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    problem = bound(fam, seed=seed, with_state=True)
    y, last = module.forward(u=problem.u, delta=problem.delta, A=problem.A, B=problem.B,
                             C=problem.C, D=problem.D, z=problem.z,
                             delta_bias=problem.delta_bias, initial_state=problem.initial_state,
                             return_last_state=True)
    y64, state64 = reference.run_float64(problem)
    assert_rel_close("y", y, y64)
    assert_rel_close("final state", last, state64, tol=TOL["float32"] * 4)


def test_scan_supports():
    assert tb.supports(make_plan(scan_family(), Algorithm.SCAN)) is None
    for fam in (F.dense(), F.mamba2(algorithm=Algorithm.SCAN)):
        reason = tb.supports(make_plan(fam, Algorithm.SCAN))
        assert reason and "scan" in reason
    from ssmc.errors import TargetError
    with pytest.raises(TargetError):
        calls.lower(tb, make_plan(F.dense(), Algorithm.SCAN), {})
    cands = tb.candidates(make_plan(scan_family(), Algorithm.SCAN))
    assert cands and all({"block_d", "split", "chunk", "num_warps"} <= set(c) for c in cands)


@pytest.mark.skipif(not (ON_CUDA and FULL), reason="needs a GPU with >48 GB (SSMC_TEST_FULL=1)")
def test_scan_offsets_past_2_31(seed):
    """b*d*l > 2^31: the last batch element must be right (int64 offsets)."""
    fam = F.mamba1(channels=16, state=16)
    b, length = 32768 + 8, 4096
    assert b * 16 * length > 2 ** 31
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    small = signature.example_inputs(fam, None, 1, length, dtype="bfloat16", device=DEVICE,
                                     seed=seed)
    u = torch.randn((b, 16, length), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    z = torch.randn((b, 16, length), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    delta = small["delta"].expand(b, -1, -1).contiguous()
    B = torch.randn((b, 1, 16, length), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    C = torch.randn((b, 1, 16, length), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    kernel = calls.build(tb, make_plan(fam, Algorithm.SCAN), {})
    y, _ = kernel.module.forward(u, delta, small["A"], B, C, D=small["D"], z=z,
                                 delta_bias=small["delta_bias"])
    last = slice(b - 1, b)
    tail = signature.bind(fam, fam.convention, (), dict(
        u=u[last], delta=delta[last], A=small["A"], B=B[last], C=C[last], D=small["D"],
        z=z[last], delta_bias=small["delta_bias"]))
    y64, _ = reference.run_float64(tail)
    assert_rel_close("y (last batch element)", y[last], y64, "bfloat16")
