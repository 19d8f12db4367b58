"""The generated chunked SSD (Mamba-2) Triton kernels against the float64 oracle.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported).
On a GPU machine, ``SSMC_TEST_CUDA=1 TRITON_INTERPRET=0`` runs the same cases compiled for it.
Every case draws fresh inputs (the ``seed`` fixture), poisons the outputs with NaN and compares
y and the final states with ``ssmc.backends.reference.run_float64`` on the same inputs.
"""
from __future__ import annotations

import pytest
import torch

from ssmc.backends import reference
import ssmc.backends.triton as tb
from ssmc.backends.triton import chunked
from ssmc.errors import TargetError
from ssmc.ir import Method, Sharing
from ssmc.plan import make_plan
from ssmc.signature import bind, example_inputs
from conftest import DEVICE, assert_rel_close, rel_err
from families import mamba2
import backend_calls as calls

CHUNK = 16
_kernels = {}


def small(**kw):
    """The small Mamba-2 family of these tests (b2 h2 p8 n8, chunk 16) with overrides."""
    args = dict(heads=2, head_dim=8, state=8, groups=1, chunk=CHUNK)
    args.update(kw)
    return mamba2(**args)


def kernel_for(fam, config=None):
    key = (fam, tuple(sorted((config or {}).items())))
    if key not in _kernels:
        _kernels[key] = calls.build(tb, make_plan(fam), config)
    return _kernels[key]


def check(fam, seed, *, batch=2, seqlen=37, dtype="float32", varlen=None, with_state=True,
          drop=(), edit=None, config=None, tol=None):
    """Run one case and assert y (and the final states) against the oracle."""
    kw = example_inputs(fam, batch=batch, seqlen=seqlen, dtype=dtype, device=DEVICE, seed=seed,
                        with_state=with_state, varlen=varlen)
    for name in drop:
        kw.pop(name)
    if edit is not None:
        edit(kw)
    problem = bind(fam, fam.convention, (), kw)
    y = torch.full_like(problem.x, float("nan"))
    final = None
    if problem.return_final_states:
        d = fam.dims
        final = torch.full((problem.nseq, d.heads, d.head_dim, d.state), float("nan"),
                           device=problem.x.device)
    y, final = kernel_for(fam, config)(problem, y=y, final_states=final)
    y64, state64 = reference.run_float64(problem)
    assert y.dtype == problem.x.dtype and y.shape == problem.x.shape
    assert_rel_close("y", y, y64, dtype, tol)
    if problem.return_final_states:
        assert final.dtype == torch.float32
        assert_rel_close("final_states", final, state64, dtype, tol)
    else:
        assert final is None


# ---------------------------------------------------------------------------------------------
# Sequence lengths around the chunk size

@pytest.mark.parametrize("seqlen", [1, 7, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5])
def test_lengths(seed, seqlen):
    check(small(), seed, seqlen=seqlen)


# ---------------------------------------------------------------------------------------------
# What the spec can say: D, gate, groups, selectivity, Delta parameterization, methods

@pytest.mark.parametrize("d_sharing", [Sharing.HEAD, Sharing.HEAD_DIM, None],
                         ids=["D_head", "D_head_dim", "no_D"])
@pytest.mark.parametrize("gate", [True, False], ids=["z", "no_z"])
def test_skip_and_gate(seed, d_sharing, gate):
    check(small(D=d_sharing, gate=gate), seed)


# Groups, head_dim and state that are not powers of two, no states: test_oracle.py's
# cuda-chunked cells (head_dim 40 and 48, state 24 and 12, 2 groups).


def test_selective_a(seed):
    check(small(selective_A=True), seed, seqlen=2 * CHUNK + 1)


def test_time_invariant_b_c_and_delta(seed):
    check(small(selective_B=False, selective_C=False, selective_delta=False), seed)


@pytest.mark.parametrize("softplus,bias,clamp", [(False, False, None), (True, True, (0.01, 0.05))],
                         ids=["raw_dt", "softplus_bias_clamp"])
def test_delta_parameterization(seed, softplus, bias, clamp):
    check(small(softplus=softplus, bias=bias, clamp=clamp), seed)


@pytest.mark.parametrize("method", [Method.ZOH, Method.EXP_EULER, Method.TRAPEZOIDAL],
                         ids=lambda m: m.value)
def test_methods(seed, method):
    check(small(method=method), seed, seqlen=3 * CHUNK + 5)


def test_trapezoidal_selective_a(seed):
    check(small(method=Method.TRAPEZOIDAL, selective_A=True), seed, seqlen=2 * CHUNK + 7)


@pytest.mark.parametrize("method", [Method.EULER, Method.BILINEAR], ids=lambda m: m.value)
def test_non_positive_decay_is_refused(method):
    plan = make_plan(small(method=method))
    reason = chunked.supports_chunked(plan)
    assert reason is not None and "positive" in reason and method.value in reason
    with pytest.raises(TargetError):
        calls.lower(tb, plan)


def test_non_scalar_a_is_refused():
    from families import mamba1
    from ssmc.ir import Algorithm
    plan = make_plan(mamba1(), Algorithm.SCAN)
    assert "chunked" in chunked.supports_chunked(plan)


def test_chunk_not_a_power_of_two(seed):
    check(small(chunk=12), seed, seqlen=41)


# ---------------------------------------------------------------------------------------------
# Dtypes, large steps, long sequences

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(seed, dtype):
    check(small(), seed, seqlen=2 * CHUNK + 5, dtype=dtype)


def test_large_delta_does_not_overflow(seed):
    def huge_dt(kw):  # softplus(dt + bias) ~ 30..60: a*Delta down to ~-1000 per step
        kw["dt"] = 30.0 + 30.0 * torch.rand(kw["dt"].shape, device=kw["dt"].device)
    check(small(), seed, seqlen=2 * CHUNK + 3, edit=huge_dt)


def test_long_sequence(seed):
    # Many chunks: the decay of the state across them is a sum of logs, not a product.
    check(small(), seed, batch=1, seqlen=20 * CHUNK + 3)


# ---------------------------------------------------------------------------------------------
# Varlen: sequences packed in batch 1, boundaries inside chunks, per-sequence states

@pytest.mark.parametrize("lengths", [[5, 21, 3, 28], [40, 1, 2, 17]], ids=["mixed", "short_tail"])
def test_varlen(seed, lengths):
    check(small(), seed, varlen=lengths)


def test_varlen_without_initial_states(seed):
    check(small(), seed, varlen=[5, 21, 3, 28], drop=("initial_states",))


def test_varlen_empty_sequences(seed):
    check(small(), seed, varlen=[5, 0, 21, 3, 28, 0])


def test_varlen_seq_idx_only(seed):
    def to_seq_idx(kw):
        cu = kw.pop("cu_seqlens").long()
        pos = torch.arange(int(cu[-1]))
        kw["seq_idx"] = (torch.searchsorted(cu[1:].cpu(), pos, right=True)
                         .to(torch.int32).reshape(1, -1).to(DEVICE))
    check(small(), seed, varlen=[9, 30, 4], edit=to_seq_idx)


def test_varlen_trapezoidal(seed):
    check(small(method=Method.TRAPEZOIDAL), seed, varlen=[5, 21, 3, 28])


def test_no_state_leaks_across_sequences(seed):
    """Changing one sequence's tokens leaves every other sequence's output unchanged."""
    fam = small()
    kw = example_inputs(fam, dtype="float32", device=DEVICE, seed=seed, varlen=[12, 20, 9])
    y1, _ = kernel_for(fam)(bind(fam, fam.convention, (), kw))
    kw["x"] = kw["x"].clone()
    kw["x"][:, 12:32] += 5.0
    y2, _ = kernel_for(fam)(bind(fam, fam.convention, (), kw))
    assert torch.equal(y1[:, :12], y2[:, :12]) and torch.equal(y1[:, 32:], y2[:, 32:])
    assert rel_err(y1[:, 12:32], y2[:, 12:32]) > 1e-2


# ---------------------------------------------------------------------------------------------
# Tiling: several row blocks per chunk, several state-kernel blocks per chunk

@pytest.mark.parametrize("config", [
    {"state_block_t": 16, "out_block_m": 16, "out_block_k": 16},
    {"state_block_t": 32, "out_block_m": 32, "out_block_k": 16, "out_block_p": 16,
     "state_block_p": 16, "state_block_n": 16},
], ids=["t16_m16", "t32_m32_k16"])
def test_tilings_of_a_larger_chunk(seed, config):
    check(small(chunk=64), seed, seqlen=150, config=config)


@pytest.mark.parametrize("config", [{"out_cb": 0}, {"out_cb_fp32": 0}], ids=["cb_inline", "cb_half"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_c_b_products_inline_or_stored(seed, config, dtype):
    # C B^T computed per head inside the output kernel, or once per group and stored (fp32 or,
    # for half inputs, in the input dtype).
    check(small(heads=4, groups=2), seed, seqlen=2 * CHUNK + 3, dtype=dtype, config=config)


def test_tilings_with_varlen(seed):
    check(small(chunk=32, method=Method.TRAPEZOIDAL), seed, varlen=[5, 21, 3, 40, 1, 14],
          config={"state_block_t": 16, "out_block_m": 16, "out_block_k": 16})


# ---------------------------------------------------------------------------------------------
# Output-kernel variants: several heads per program (sharing C rows and C B^T tiles), early x/z
# loads, the factored decay left of the diagonal block, the state term after the column loops

FACTORED = {"out_factor_decay": 1, "out_block_m": 16, "out_block_k": 16}


@pytest.mark.parametrize("fam_kw,config,seqlen", [
    (dict(heads=3), {"out_heads": 2}, 2 * CHUNK + 3),
    (dict(heads=6, chunk=32), dict(FACTORED, out_heads=4, out_early_xz=1), 75),
    (dict(heads=4, groups=2), {"out_heads": 2, "out_state_last": 1, "out_early_xz": 1}, 37),
    (dict(heads=4, groups=2), {"out_heads": 2, "out_cb": 0, "out_maxnreg": 128}, CHUNK + 5),
    (dict(heads=3, chunk=32, D=Sharing.HEAD_DIM), dict(FACTORED, out_state_last=1, out_heads=3),
     70),
], ids=["h3_hb2_remainder", "h6_hb4_factored_early", "g2_hb2_state_last", "g2_hb2_cb_inline",
        "factored_state_last_D_head_dim"])
def test_output_kernel_variants(seed, fam_kw, config, seqlen):
    check(small(**fam_kw), seed, seqlen=seqlen, config=config)


@pytest.mark.parametrize("gate,d_sharing", [(False, None), (True, None), (False, Sharing.HEAD)],
                         ids=["no_z_no_D", "z_only", "D_only"])
def test_output_kernel_variants_without_z_or_d(seed, gate, d_sharing):
    config = dict(FACTORED, out_heads=2, out_early_xz=1)
    check(small(heads=3, chunk=32, gate=gate, D=d_sharing), seed, seqlen=50, config=config)


@pytest.mark.parametrize("config", [
    dict(FACTORED, out_heads=2, out_state_last=1),
    {"out_heads": 2, "out_early_xz": 1, "out_block_m": 16, "out_block_k": 16},
], ids=["hb2_factored_state_last", "hb2_early"])
def test_output_kernel_variants_varlen(seed, config):
    # Boundaries inside row blocks and chunks, initial states, the trapezoidal previous input.
    check(small(heads=3, chunk=32, method=Method.TRAPEZOIDAL), seed, varlen=[5, 21, 3, 40, 1, 14],
          config=config)


def test_factored_decay_half_precision_and_large_steps(seed):
    def huge_dt(kw):  # a*Delta down to ~-1000 per step: the factors underflow, never overflow
        kw["dt"] = 30.0 + 30.0 * torch.rand(kw["dt"].shape, device=kw["dt"].device)
    config = dict(FACTORED, out_heads=2)
    check(small(heads=2, chunk=32), seed, seqlen=70, edit=huge_dt, config=config)
    check(small(heads=2, chunk=32), seed, seqlen=70, dtype="bfloat16", config=config)


@pytest.mark.parametrize("fam_kw,config,match", [
    (dict(heads=6, groups=2), {"out_heads": 2}, "does not divide the 3 heads"),
    (dict(heads=4, selective_B=False), {"out_heads": 2}, "its own B or C"),
    (dict(), {"out_heads": 0}, "1..8"),
    (dict(chunk=64), {"out_factor_decay": 1, "out_block_m": 16, "out_block_k": 32},
     "out_block_k <="),
    (dict(), {"out_early_xz": 2}, "0 or 1"),
])
def test_output_kernel_config_is_checked(fam_kw, config, match):
    with pytest.raises(ValueError, match=match):
        calls.build(tb, make_plan(small(**fam_kw)), config)


def test_several_heads_per_program_in_the_source():
    src = calls.lower(tb, make_plan(small(heads=3)), dict(FACTORED, out_heads=2))
    assert "h_1 = tl.minimum(h_0 + 1, nheads - 1)" in src
    assert "mask=tl.where(h_0 + 1 < nheads, mask_mp, False)" in src
    assert "triton.cdiv(nheads, 2)" in src and "acc_1 +=" in src and "cum_c0_1" in src
    one = calls.lower(tb, make_plan(small(heads=3)), {"out_maxnreg": 0})
    assert "h = pid_h" in one and "h_0 = " not in one
    assert "cum_c0 = " not in one and "maxnreg=" not in one
    compile(src, "<generated>", "exec")


def test_candidates_are_valid_configs():
    plan = make_plan(mamba2(heads=80, head_dim=64, state=128, chunk=256))
    cands = chunked.candidates_chunked(plan)
    assert cands[0] == chunked.default_config_chunked(plan)
    assert len(cands) > 4 and all(set(c) == set(chunked.CONFIG_KEYS) for c in cands)
    assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)
    assert all(chunked.config_error(plan, c) is None for c in cands)
    assert any(c["out_heads"] > 1 for c in cands[1:9])  # the untimed options come first
    per_head_bc = make_plan(mamba2(heads=4, selective_B=False, selective_C=False))
    assert all(c["out_heads"] == 1 for c in chunked.candidates_chunked(per_head_bc))


# ---------------------------------------------------------------------------------------------
# The generated source

def test_source_is_generated_from_the_plan():
    zoh = calls.lower(tb, make_plan(small(method=Method.ZOH)))
    euler = calls.lower(tb, make_plan(small(method=Method.EXP_EULER, gate=False, D=None)))
    trap = calls.lower(tb, make_plan(small(method=Method.TRAPEZOIDAL)))
    # zoh's input coefficient (exp(a dt) - 1)/a is printed from the discretized expression.
    assert "_expm1(a_h*delta)" in zoh and "prev_coef = tl.where" not in zoh
    assert "z_ptr + b * stride_z_b" in zoh and "z_ptr + b * stride_z_b" not in euler
    assert "D_ptr + h" not in euler
    assert "prev_coef = tl.where" in trap
    for src in (zoh, euler, trap):
        compile(src, "<generated>", "exec")
        assert src.startswith("# Generated by ssmc")


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown chunked SSD config key"):
        calls.build(tb, make_plan(small()), {"block_q": 32})


def test_a_call_chunk_size_where_the_spec_sets_none(seed):
    """mamba_ssm callers pass their own chunk_size; where the spec leaves it open it is
    accepted and the kernel runs its plan's chunk (the same result)."""
    fam = small(chunk=None)
    assert make_plan(fam).chunk_size == 64

    def pass_chunk(kw):
        kw["chunk_size"] = 256
    check(fam, seed, seqlen=37, edit=pass_chunk)
