"""The generated Triton decode step (selective_state_update convention) against the oracle.

Interpreter on the CPU by default; ``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0`` on a GPU, with
``SSMC_TEST_FULL=1`` for full-size shapes (Mamba-2 h80 p64 n128). Each case compares y and the
state updated in place with ``reference.run_float64`` on the same inputs; the step applied token
by token must also reproduce the oracle's whole-sequence output and final state.
"""
from __future__ import annotations

import os

from pathlib import Path

import pytest
import torch

import families as F
from conftest import DEVICE, FULL, TOL, assert_rel_close, poison, require_cuda_device
from ssmc import signature
from ssmc.backends import reference
from ssmc.backends import triton as tb
from ssmc.backends.triton import codegen, step as step_gen
from ssmc.ir import Algorithm, AStructure, Convention, Method, Sharing
from ssmc.plan import ir_hash, make_plan
import backend_calls as calls

require_cuda_device()
HEADS, HEAD_DIM, SSD_STATE = (80, 64, 128) if FULL else (4, 8, 16)
CH, STATE = (1024, 16) if FULL else (8, 4)
BATCH = 8 if FULL else 3
CPLX = AStructure.COMPLEX_DIAGONAL
STEP = Convention.STATE_UPDATE
STEP_FIELDS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def mamba2(**kw):
    args = dict(heads=HEADS, head_dim=HEAD_DIM, state=SSD_STATE, groups=2)
    args.update(kw)
    return F.mamba2(**args)


def mamba1(**kw):
    args = dict(channels=CH, state=STATE)
    args.update(kw)
    return F.mamba1(**args)


CASES = {
    "mamba2": lambda: mamba2(),
    "mamba2-D-per-head-dim": lambda: mamba2(D=Sharing.HEAD_DIM, groups=1),
    "mamba2-constant-dt-B-C-selective-A-clamp": lambda: mamba2(
        selective_A=True, selective_B=False, selective_C=False, selective_delta=False,
        clamp=(0.01, 0.05)),
    "mamba2-zoh": lambda: mamba2(method=Method.ZOH),
    "mamba2-bilinear-no-gate": lambda: mamba2(method=Method.BILINEAR, gate=False, D=None),
    "mamba1": lambda: mamba1(),
    "mamba1-zoh-groups2": lambda: mamba1(method=Method.ZOH, groups=2),
    "mamba1-selective-A-euler": lambda: mamba1(selective_A=True, method=Method.EULER),
    "complex": lambda: mamba1(structure=CPLX),
    "complex-selective-A-bilinear": lambda: mamba1(structure=CPLX, selective_A=True,
                                                   method=Method.BILINEAR),
    "s4d": lambda: F.s4d(channels=CH, state=STATE, algorithm=Algorithm.STEP),
    "s4d-complex": lambda: F.s4d(channels=CH, state=STATE, algorithm=Algorithm.STEP,
                                 complex_a=True),
}


def run_step(fam, problem, config=None):
    """One generated step on ``problem`` (state updated in place), with a poisoned y buffer."""
    kernel = calls.build(tb, make_plan(fam, Algorithm.STEP), config or {})
    out = poison(torch.empty_like(problem.x))
    y, none = kernel.module.forward(**{k: getattr(problem, k) for k in STEP_FIELDS}, out=out)
    assert none is None and y.data_ptr() == out.data_ptr()
    return y


def check_step(fam, dtype, seed, config=None):
    inputs = signature.example_inputs(fam, STEP, BATCH, 1, dtype=dtype, device=DEVICE, seed=seed)
    problem = signature.bind(fam, STEP, (), inputs)
    y64, state64 = reference.run_float64(problem)   # does not touch problem.state
    y = run_step(fam, problem, config)
    assert y.dtype == problem.x.dtype
    assert_rel_close("y", y, y64, dtype)
    assert_rel_close("state (in place)", problem.state, state64, "float32")


# The default mamba2, mamba1, s4d and complex s4d steps are test_oracle.py's cuda-step cells.
IN_TEST_ORACLE = {"mamba2", "mamba1", "s4d", "s4d-complex"}


@pytest.mark.parametrize("case", sorted(set(CASES) - IN_TEST_ORACLE))
def test_step_matches_oracle(case, seed):
    check_step(CASES[case](), "float32", seed)


@pytest.mark.parametrize("case,dtype", [(c, d) for d in ("bfloat16", "float16")
                                        for c in ("mamba2", "mamba1", "complex")
                                        if (c, d) != ("mamba2", "bfloat16")])  # test_oracle's
def test_step_16bit_inputs(case, dtype, seed):
    check_step(CASES[case](), dtype, seed)


@pytest.mark.parametrize("config", [{"block_r": 2, "num_warps": 1}, {"block_r": 16}])
def test_step_configs(config, seed):
    """Row blocks smaller/larger than head_dim or channels (masks on both)."""
    check_step(mamba2(head_dim=HEAD_DIM - 2 if not FULL else 60, state=12 if not FULL else 128),
               "float32", seed, config)
    check_step(mamba1(channels=CH - 3, state=STATE + 2), "float32", seed, config)


# Tiles with fewer elements than the program's threads: Triton gives each element several
# owner threads. Every owner loads it, one owner's store is kept and every owner computes its
# own y, so without the generator's barrier an owner that loads after another one stored reads
# the new state, and its y (sent through the reduction) is wrong. On a GPU these cases race;
# the interpreter has no threads, so there it checks only the barrier's code path.
REPLICATED_CONFIGS = [{"block_r": 1, "num_warps": 8}, {"block_r": 4, "num_warps": 8}]


@pytest.mark.parametrize("config", REPLICATED_CONFIGS)
@pytest.mark.parametrize("case", ["mamba2", "mamba1", "complex"])
def test_step_tiles_smaller_than_the_threads(case, config, seed):
    fam = CASES[case]()
    plan = make_plan(fam, Algorithm.STEP)
    replicated = step_gen.tile_replicated(plan, config)
    assert ("tl.debug_barrier()" in calls.lower(tb, plan, config)) == replicated
    assert replicated or (case == "mamba2" and FULL)   # at full size 4 x 128 fills 8 warps
    check_step(fam, "float32", seed, config)


def test_step_default_and_candidate_configs_give_every_thread_an_element():
    fams = [mamba2(), mamba2(head_dim=4, state=32), mamba1(), mamba1(state=1),
            mamba1(state=3000), mamba1(structure=CPLX, state=2)]
    for fam in fams:
        plan = make_plan(fam, Algorithm.STEP)
        default = tb.default_config(plan)
        cands = tb.candidates(plan)
        assert default in cands, fam.dims
        for cfg in cands:
            assert not step_gen.tile_replicated(plan, cfg), (fam.dims, cfg)
            assert "tl.debug_barrier()" not in calls.lower(tb, plan, cfg)
    # head_dim 4 x n 4 cannot fill one warp: its only config keeps the barrier
    tiny = make_plan(mamba2(head_dim=4, state=4), Algorithm.STEP)
    assert tb.candidates(tiny) == [tb.default_config(tiny)] == [{"block_r": 4, "num_warps": 1}]
    assert "tl.debug_barrier()" in calls.lower(tb, tiny, {})
    plan = make_plan(mamba2(), Algorithm.STEP)
    for bad in ({"block_r": 3}, {"block_r": 0}, {"num_warps": 3}, {"num_warps": 64},
                {"block_r": 2.0}):
        with pytest.raises(ValueError, match="decode step config"):
            calls.lower(tb, plan, bad)


# Compiles generated kernels for sm_90 (no GPU needed: Triton ships ptxas) in a process without
# TRITON_INTERPRET and prints, for each, the state tile's shape and the extent its layout covers.
_LAYOUT_PROBE = r"""
import importlib.util, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for i, (path, block_r, warps) in enumerate(json.loads(sys.argv[1])):
    spec = importlib.util.spec_from_file_location(f"probe{i}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = next(v for k, v in vars(mod).items() if k.startswith("ssmc_step_"))
    flags = {"BLOCK_R": block_r, "HAS_D": True, "HAS_Z": True, "HAS_DT_BIAS": True}
    sig = {a: "constexpr" if a in flags else "*fp32" if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=flags),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ir = k.asm["ttgir"]
    rows, cols, enc = re.search(r"tt\.store .*: tensor<(\d+)x(\d+)x!tt\.ptr<f32>, (#\w+)>",
                                ir).groups()
    layout = re.search("^" + enc + r" = #ttg\.blocked<(.*)>$", ir, re.M).group(1)
    num = {k: [int(x) for x in v.split(",")] for k, v in re.findall(r"(\w+) = \[([\d, ]+)\]",
                                                                    layout)}
    cover = [a * b * c for a, b, c in zip(num["sizePerThread"], num["threadsPerWarp"],
                                          num["warpsPerCTA"])]
    out.append([int(rows), int(cols), *cover])
print(json.dumps(out))
"""


def test_step_tile_replicated_matches_tritons_layout(tmp_path):
    """``tile_replicated`` (which decides the barrier) against the layout Triton really picks."""
    import json
    import subprocess
    import sys
    import triton
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    cases = [(mamba2(head_dim=8, state=16), 2, 4), (mamba2(head_dim=8, state=16), 8, 1),
             (mamba1(state=16), 4, 8), (mamba1(state=16), 16, 8),
             (mamba1(structure=CPLX, state=4), 4, 2), (mamba1(structure=CPLX, state=4), 8, 1)]
    jobs, expected = [], []
    for i, (fam, rows, warps) in enumerate(cases):
        plan = make_plan(fam, Algorithm.STEP)
        cfg = {"block_r": rows, "num_warps": warps}
        path = tmp_path / f"step{i}.py"
        path.write_text(calls.lower(tb, plan, cfg))
        jobs.append([str(path), rows, warps])
        expected.append(step_gen.tile_replicated(plan, cfg))
    assert sorted(set(expected)) == [False, True]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-c", _LAYOUT_PROBE, json.dumps(jobs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"triton {triton.__version__}: {run.stderr[-3000:]}"
    for (fam, rows, warps), want, (tr, tc, cr, cc) in zip(cases, expected,
                                                          json.loads(run.stdout)):
        assert (tr, tc) == (rows, codegen.pow2_at_least(fam.dims.state))
        assert (cr > tr or cc > tc) == want, (fam.dims, rows, warps, (cr, cc))


def _token(t, name, value, fam, scalar):
    """Token t of a sequence tensor, as the step convention shapes it."""
    if value is None:
        return None
    sel = {"x": True, "z": True, "dt": fam.delta.selective, "A": fam.A.selective,
           "B": fam.B.selective, "C": fam.C.selective}.get(name, False)
    if not sel:
        return value
    return value[:, t] if scalar else value[..., t]


@pytest.mark.parametrize("case", ["mamba2", "mamba1-zoh-groups2", "complex",
                                  "mamba1-selective-A-euler"])
def test_step_token_by_token_equals_sequence(case, seed):
    """Decoding a whole sequence one token at a time = the oracle's whole-sequence result."""
    fam = CASES[case]()
    scalar = fam.A.structure is AStructure.SCALAR
    seqlen = 9 if not FULL else 64
    inputs = signature.example_inputs(fam, None, 2, seqlen, device=DEVICE, seed=seed,
                                      with_state=True)
    seq = signature.bind(fam, fam.convention, (), inputs)
    y64, state64 = reference.run_float64(seq)
    if scalar:
        names = dict(x="x", dt="dt", A="A", B="B", C="C", D="D", z="z", dt_bias="dt_bias")
        state = seq.initial_states.clone()
    else:
        names = dict(x="u", dt="delta", A="A", B="B", C="C", D="D", z="z", dt_bias="delta_bias")
        state = seq.initial_state.clone()
    kernel = calls.build(tb, make_plan(fam, Algorithm.STEP), {})
    ys = []
    for t in range(seqlen):
        args = {k: _token(t, k, getattr(seq, v), fam, scalar) for k, v in names.items()}
        y, _ = kernel.module.forward(state=state, **args)
        ys.append(y)
    y = torch.stack(ys, dim=1 if scalar else -1)
    assert_rel_close("y (token by token)", y, y64, "float32", tol=TOL["float32"] * 4)
    assert_rel_close("final state", state, state64, "float32", tol=TOL["float32"] * 4)


def test_step_accepts_mamba_ssm_expanded_arguments(seed):
    """selective_state_update's expanded dt (b,h,p), A (h,p,n), dt_bias/D (h,p), stride 0."""
    import ssmc
    fam = mamba2(groups=1)
    step = ssmc.compile(fam, target="cuda", algorithm="step")
    kw = step.example_inputs(batch=BATCH, seed=seed, device=DEVICE)
    p, n = fam.dims.head_dim, fam.dims.state
    expanded = dict(kw, dt=kw["dt"][..., None].expand(-1, -1, p),
                    A=kw["A"][:, None, None].expand(-1, p, n),
                    dt_bias=kw["dt_bias"][:, None].expand(-1, p), D=kw["D"][:, None].expand(-1, p))
    problem = signature.bind(fam, STEP, (), kw)
    y64, state64 = reference.run_float64(problem)
    y = step(**expanded)
    assert_rel_close("y", y, y64)
    assert_rel_close("state (in place)", kw["state"], state64)


def test_step_supports():
    assert tb.supports(make_plan(mamba2(), Algorithm.STEP)) is None
    reason = tb.supports(make_plan(mamba1(method=Method.TRAPEZOIDAL), Algorithm.STEP))
    assert reason and "trapezoidal" in reason
    assert tb.supports(make_plan(F.dense(), Algorithm.STEP))
    assert tb.candidates(make_plan(mamba2(), Algorithm.STEP))


def test_step_source_and_artifact(tmp_path, seed):
    import importlib.util
    plan = make_plan(mamba1(structure=CPLX, method=Method.ZOH), Algorithm.STEP)
    src = calls.lower(tb, plan, {})
    assert src == calls.lower(tb, plan, {}) and ir_hash(plan) in src
    assert "_cos(" in src and "_expm1(" in src and "math." not in src
    (path,) = map(Path, calls.write_artifact(tb, plan, {}, tmp_path))
    spec = importlib.util.spec_from_file_location("ssmc_artifact_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fam = plan.family
    problem = signature.bind(fam, STEP, (), signature.example_inputs(
        fam, STEP, BATCH, 1, device=DEVICE, seed=seed))
    y64, state64 = reference.run_float64(problem)
    y, _ = module.forward(**{k: getattr(problem, k) for k in STEP_FIELDS})
    assert_rel_close("y", y, y64)
    assert_rel_close("state", problem.state, state64)
