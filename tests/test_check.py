"""Semantic checks: one test per check, asserting the message and where it points."""
from __future__ import annotations

import dataclasses

import pytest

import families
from ssmc import ir
from ssmc.check import check
from ssmc.errors import SpecError
from ssmc.frontend import parse

MAMBA1 = {
    "dims": "dims channels = 16, state = 8, groups = 2",
    "A": "A diagonal = -exp(A_log)",
    "delta": "delta selective = softplus(dt + dt_bias)",
    "bc": "B, C selective per group",
    "D": "D per channel",
    "discretize": "discretize exp_euler",
    "compute": "compute scan",
}
MAMBA2 = {
    "dims": "dims heads = 8, head_dim = 4, state = 16, groups = 2",
    "A": "A scalar per head = -exp(A_log)",
    "delta": "delta selective = softplus(dt + dt_bias)",
    "bc": "B, C selective per group",
    "D": "D per head",
    "discretize": "discretize exp_euler",
    "compute": "compute chunked(64)",
}
LTI = dict(MAMBA1, delta="delta constant = dt", bc="B, C constant per channel", compute="compute conv")


def spec(base=MAMBA1, name="F", **statements) -> str:
    """A family (line 1: 'ssm F {', then one statement per line in ``base`` order)."""
    merged = dict(base)
    merged.update(statements)
    body = "\n".join(f"  {line}" for line in merged.values() if line is not None)
    return f"ssm {name} {{\n{body}\n}}\n"


def model(layers: str, dims: str = "dims d_model = 64", name: str = "M") -> str:
    """A model after ``spec()`` (which is 9 lines): 'model' on line 10, layers on line 12."""
    return f"model {name} {{\n  {dims}\n  layers {layers}\n}}\n"


def error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, file="spec.ssm")
    return info.value


def assert_error(err: SpecError, line: int, col: int, *fragments: str):
    text = str(err)
    assert text.startswith(f"spec.ssm:{line}:{col}: error: "), text
    assert (err.loc.line, err.loc.column) == (line, col)
    assert text.split("\n")[2].index("^") == col - 1 + 4, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_valid_specs_pass():
    assert parse(spec()).families[0].name == "F"
    assert parse(spec(MAMBA2)).families[0].compute.chunk_size == 64
    assert parse(spec(LTI)).families[0].is_lti


# ---- dims -------------------------------------------------------------------------------------

def test_unknown_dimension_lists_the_known_ones():
    err = error(spec(dims="dims channels = 16, state = 8, width = 3"))
    assert_error(err, 2, 34, "unknown dimension 'width'",
                 "known: heads, head_dim, channels, state, groups, rank")


def test_dimension_given_twice():
    err = error(spec(dims="dims channels = 16, state = 8, state = 4"))
    assert_error(err, 2, 34, "dimension 'state' is given twice (first at line 2)")


@pytest.mark.parametrize("base, dims, missing", [
    (MAMBA1, "dims channels = 16", "dims lacks state"),
    (MAMBA1, "dims state = 8", "dims lacks channels: A diagonal needs channels, state"),
    (MAMBA2, "dims head_dim = 4, state = 16", "dims lacks heads: A scalar per head needs heads, head_dim, state"),
    (MAMBA2, "dims heads = 8, state = 16, groups = 2", "dims lacks head_dim"),
])
def test_missing_required_dimension(base, dims, missing):
    assert_error(error(spec(base, dims=dims)), 2, 3, missing)


@pytest.mark.parametrize("dims, col, what", [
    ("dims channels = 0, state = 8", 19, "channels must be a positive whole number, got 0"),
    ("dims channels = 16, state = -8", 31, "state must be a positive whole number, got -8"),
    ("dims channels = 16, state = 8, groups = 0", 43, "groups must be a positive whole number, got 0"),
])
def test_non_positive_dimension(dims, col, what):
    assert_error(error(spec(dims=dims)), 2, col, what)


def test_sizes_are_whole_numbers():
    assert_error(error(spec(dims="dims channels = 16.5, state = 8")), 2, 19,
                 "channels must be a whole number, got 16.5")


def test_size_must_be_a_number():
    assert_error(error(spec(dims="dims channels = many, state = 8")), 2, 19,
                 "channels must be a number or 'any' (a size each call's tensors give), got 'many'")


def test_channels_not_divisible_by_groups():
    assert_error(error(spec(dims="dims channels = 16, state = 8, groups = 3")), 2, 3,
                 "channels = 16 is not divisible by groups = 3")


def test_heads_not_divisible_by_groups():
    assert_error(error(spec(MAMBA2, dims="dims heads = 6, head_dim = 4, state = 16, groups = 4")), 2, 3,
                 "heads = 6 is not divisible by groups = 4")


def test_scalar_family_channels_must_match_heads_times_head_dim():
    ok = parse(spec(MAMBA2, dims="dims heads = 8, head_dim = 4, channels = 32, state = 16"))
    assert ok.families[0].dims.d_inner == 32
    err = error(spec(MAMBA2, dims="dims heads = 8, head_dim = 4, channels = 30, state = 16"))
    assert_error(err, 2, 3, "channels = 30 but heads * head_dim = 32")


def test_heads_and_head_dim_only_for_scalar_a():
    assert_error(error(spec(dims="dims heads = 4, channels = 16, state = 8")), 2, 3,
                 "A diagonal is sized by channels, not heads")
    assert_error(error(spec(dims="dims head_dim = 4, channels = 16, state = 8")), 2, 3,
                 "head_dim applies only to A scalar per head")


# ---- A ------------------------------------------------------------------------------------------

def test_dplr_without_rank():
    assert_error(error(spec(LTI, A="A dplr")), 3, 3, "A dplr needs a rank",
                 "A dplr(rank = 1)")


def test_dplr_rank_not_below_state():
    err = error(spec(LTI, A="A dplr(rank = 8)"))
    assert_error(err, 2, 3, "rank = 8 must be smaller than state = 8")


def test_rank_on_non_dplr():
    err = error(spec(dims="dims channels = 16, state = 8, rank = 1"))
    assert_error(err, 2, 3, "rank applies only to A dplr, not to A diagonal")


def test_rank_given_twice_with_different_values():
    err = error(spec(LTI, dims="dims channels = 16, state = 8, rank = 2", A="A dplr(rank = 1)"))
    assert_error(err, 3, 17, "rank 1 in dplr(...) contradicts dims rank = 2 (line 2)")


def test_selective_a_only_for_elementwise_structures():
    err = error(spec(A="A selective dense = A"))
    assert_error(err, 3, 3, "a selective A is supported for scalar, diagonal and complex diagonal "
                            "structures, not dense")
    assert parse(spec(A="A selective complex diagonal")).families[0].A.selective


# ---- delta, B, C, D -------------------------------------------------------------------------------

def test_clamp_low_not_below_high():
    err = error(spec(delta="delta = softplus(dt + dt_bias) clamp(0.1, 0.01)"))
    assert_error(err, 4, 3, "clamp(0.1, 0.01): the lower bound must be below the upper bound")
    assert_error(error(spec(delta="delta clamp(inf, inf)")), 4, 3, "lower bound must be below")


def test_clamp_low_negative():
    err = error(spec(delta="delta = softplus(dt) clamp(-1, inf)"))
    assert_error(err, 4, 3, "clamp(-1, inf): the lower bound must be >= 0")


def test_b_c_sharing_choices_are_allowed():
    f = parse(spec(bc="B, C constant per group")).families[0]
    assert (f.B.selective, f.B.sharing, f.C.sharing) == (False, ir.Sharing.GROUP, ir.Sharing.GROUP)
    g = parse(spec(bc="B, C selective per head")).families[0]
    assert (g.B.selective, g.B.sharing) == (True, ir.Sharing.HEAD)


def test_per_channel_is_ambiguous_on_scalar_a():
    assert_error(error(spec(MAMBA2, D="D per channel")), 6, 9, "'per channel' is ambiguous here",
                 "per head_dim")
    assert_error(error(spec(MAMBA2, bc="B, C constant per channel")), 5, 21, "ambiguous")


def test_d_per_head_dim_needs_scalar_a():
    err = error(spec(D="D per head_dim"))
    assert_error(err, 6, 3, "D per head_dim needs A scalar per head", "write 'D per channel'")
    assert parse(spec(MAMBA2, D="D per head_dim")).families[0].D.sharing is ir.Sharing.HEAD_DIM


# ---- compute --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [100, 3, 0, -64])
def test_chunk_size_power_of_two(size):
    assert_error(error(spec(MAMBA2, compute=f"compute chunked({size})")), 8, 3,
                 f"chunk size {size} is not a positive power of two")


def test_chunked_needs_a_size():
    assert_error(error(spec(MAMBA2, compute="compute chunked")), 8, 3,
                 "compute chunked needs a chunk size", "chunked(256)")


def test_chunked_needs_scalar_a():
    err = error(spec(compute="compute chunked(64)"))
    assert_error(err, 8, 3, "compute chunked (SSD) needs A scalar per head, but A is diagonal",
                 "use compute scan")
    err = error(spec(LTI, A="A complex diagonal", compute="compute chunked(64)"))
    assert_error(err, 8, 3, "but A is complex diagonal", "(or conv, the system being LTI)")


def test_conv_names_the_selective_parameters():
    err = error(spec(compute="compute conv"))
    assert_error(err, 8, 3, "compute conv needs a time-invariant (LTI) system, but delta, B and C "
                            "are selective")
    err = error(spec(LTI, bc="B constant", c="C selective"))
    assert_error(err, 8, 3, "but C is selective", "make C constant")
    err = error(spec(LTI, A="A selective diagonal"))
    assert_error(err, 8, 3, "but A is selective")


# ---- dtypes -------------------------------------------------------------------------------------

def test_unknown_dtype_name():
    err = error(spec(dtype="dtype inputs = [fp32, fp8]"))
    assert_error(err, 9, 25, "unknown dtype 'fp8'", "known: fp16, bf16, fp32, fp64")
    assert_error(error(spec(dtype="dtype state = 32")), 9, 17, "unknown dtype '32'")


def test_unknown_dtype_field():
    assert_error(error(spec(dtype="dtype output = fp32")), 9, 9, "unknown dtype field 'output'",
                 "known: inputs, state, accum")


def test_empty_input_dtypes():
    assert_error(error(spec(dtype="dtype inputs = []")), 9, 18, "dtype inputs lists no dtype")


def test_state_dtype_is_fp32_or_fp64():
    assert_error(error(spec(dtype="dtype state = bf16")), 9, 3,
                 "dtype state = bf16: the state and the accumulation are kept in fp32")
    assert parse(spec(dtype="dtype state = fp64, accum = fp64")).families[0].dtypes.state is ir.DType.FLOAT64


# ---- statements ---------------------------------------------------------------------------------

def test_duplicate_statement_names_the_first():
    err = error(spec(extra="discretize zoh"))
    assert_error(err, 9, 3, "duplicate 'discretize' statement in ssm F (first at line 7)")


def test_duplicate_through_combined_b_c():
    err = error(spec(extra="C constant"))
    assert_error(err, 9, 3, "duplicate 'C' statement in ssm F (first at line 5)")


@pytest.mark.parametrize("drop, words", [
    ("A", ["'A'", "A scalar per head | diagonal"]),
    ("discretize", ["'discretize'", "discretize zoh | bilinear | euler | exp_euler | trapezoidal"]),
    ("compute", ["'compute'", "compute step | scan | chunked(256) | conv"]),
    ("dims", ["'dims'", "dims heads = H, head_dim = P, state = N"]),
])
def test_missing_required_statement(drop, words):
    err = error(spec(**{drop: None}))
    assert_error(err, 1, 5, "ssm F has no", *words)


def test_missing_several_statements_at_once():
    err = error("ssm F {\n  dims channels = 4, state = 2\n}\n")
    assert_error(err, 1, 5, "ssm F has no 'A', 'discretize', 'compute' statements")


# ---- models -------------------------------------------------------------------------------------

def test_layer_names_undefined_family():
    err = error(spec() + model("[F x 2, G]"))
    assert_error(err, 12, 18, "layer 'G' names no ssm family; known families: F")
    err = error(model("[G]"))
    assert_error(err, 3, 11, "known families: none (this file defines no ssm family)")


def test_attention_heads_divisible_by_kv_heads():
    err = error(spec() + model("F, attention(heads = 8, kv_heads = 3)"))
    assert_error(err, 12, 13, "attention heads = 8 is not divisible by kv_heads = 3")


def test_attention_head_dim_defaults_need_divisible_d_model():
    err = error(spec() + model("attention(heads = 6)"))
    assert_error(err, 12, 10, "d_model = 64 is not divisible by attention heads = 6", "head_dim")
    assert parse(spec() + model("attention(heads = 6, head_dim = 16)")).models[0].blocks()[0].head_dim == 16


def test_attention_needs_heads_and_knows_its_arguments():
    assert_error(error(spec() + model("attention")), 12, 10, "attention needs heads")
    err = error(spec() + model("attention(heads = 8, kv = 2)"))
    assert_error(err, 12, 31, "unknown attention argument 'kv'",
                 "known: heads, kv_heads, head_dim, window", "did you mean 'kv_heads'?")


@pytest.mark.parametrize("layer, col, what", [
    ("attention(heads = 0)", 10, "attention heads must be a positive whole number, got 0"),
    ("attention(heads = 8, window = 0)", 10, "attention window must be a positive whole number"),
    ("mlp(hidden = 0)", 10, "mlp hidden must be a positive whole number"),
    ("moe(experts = 0, top_k = 0)", 10, "moe experts must be a positive whole number"),
])
def test_non_positive_layer_sizes(layer, col, what):
    assert_error(error(spec() + model(layer)), 12, col, what)


def test_non_positive_model_dims():
    err = error(spec() + model("F", dims="dims d_model = 0"))
    assert_error(err, 10, 7, "d_model must be a positive whole number, got 0")


def test_top_k_not_above_experts():
    err = error(spec() + model("F, moe(experts = 4, top_k = 8)"))
    assert_error(err, 12, 13, "moe top_k = 8 exceeds experts = 4")


def test_moe_needs_experts_and_top_k():
    assert_error(error(spec() + model("moe(experts = 4)")), 12, 10, "moe needs top_k")


def test_unknown_mlp_activation():
    assert_error(error(spec() + model("mlp(activation = tanh)")), 12, 10,
                 "unknown mlp activation 'tanh'; known: silu, gelu, relu")


@pytest.mark.parametrize("count", [0, -2])
def test_repeat_count_at_least_one(count):
    err = error(spec() + model(f"[F, mlp] x {count}"))
    assert_error(err, 12, 21, f"repeat count must be at least 1, got {count}")


def test_model_dims_and_statements():
    assert_error(error(spec() + model("F", dims="dims d_model = 64, hidden = 3")), 11, 22,
                 "unknown model dimension 'hidden'; known: d_model, vocab")
    assert_error(error(spec() + model("F", dims="dims vocab = 3")), 11, 3, "dims has no d_model")
    err = error(spec() + "model M {\n  dims d_model = 8\n}\n")
    assert_error(err, 10, 7, "model M has no 'layers' statement", "layers [ ... ]")


# ---- names --------------------------------------------------------------------------------------

def test_duplicate_family_names_point_at_the_second():
    err = error(spec() + "\n" + spec())
    assert_error(err, 11, 5, "ssm family 'F' is defined twice (first at line 1)")


def test_duplicate_model_names():
    err = error(spec() + model("F") + model("F"))
    assert_error(err, 14, 7, "model 'M' is defined twice (first at line 10)")


def test_family_and_model_with_the_same_name():
    err = error(spec() + model("F", name="F"))
    assert_error(err, 10, 7, "'F' is already the name of the ssm family at line 1")
    err = error(model("G", name="G") + spec(name="G"))
    assert_error(err, 5, 5, "'G' is already the name of the model at line 1")


def test_layer_keyword_cannot_name_a_family():
    assert_error(error(spec(name="mlp")), 1, 5, "'mlp' is a layer keyword")


# ---- IR built in Python gets the same checks ----------------------------------------------------

@pytest.mark.parametrize("build", [families.mamba1, families.mamba2, families.s4d, families.s5,
                                   families.s4_dplr, families.dense])
def test_ir_builders_pass_and_check_returns_its_input(build):
    specfile = ir.SpecFile((build(),), ())
    assert check(specfile) is specfile


def test_ir_without_locations_names_the_family():
    bad = families.mamba1(algorithm=ir.Algorithm.CONV)
    with pytest.raises(SpecError) as info:
        check(ir.SpecFile((bad,), ()))
    assert str(info.value) == ("error: ssm Mamba1: compute conv needs a time-invariant (LTI) system, "
                               "but delta, B and C are selective\n  use compute scan, or make delta, "
                               "B and C constant")


def test_ir_checks_hand_built_sizes():
    fam = families.mamba2()
    zero_state = dataclasses.replace(fam, dims=dataclasses.replace(fam.dims, state=0))
    with pytest.raises(SpecError, match="dims lacks state"):
        check(ir.SpecFile((zero_state,), ()))
    bad_sharing = dataclasses.replace(fam, B=ir.BCSpec(sharing=ir.Sharing.HEAD_DIM))
    with pytest.raises(SpecError, match="B cannot be per head_dim"):
        check(ir.SpecFile((bad_sharing,), ()))
    m = ir.ModelSpec("M", 64, (ir.Repeat((ir.SSMBlock("Mamba2"),), 0),))
    with pytest.raises(SpecError, match="model M: repeat count must be at least 1, got 0"):
        check(ir.SpecFile((fam,), (m,)))


def test_layout_that_unrolls_to_absurdly_many_blocks():
    err = error(spec() + model("[[F] x 1000] x 1001"))
    assert_error(err, 12, 25, "the layout unrolls to more than 1000000 blocks")
    at_the_limit = parse(spec() + model("[[F] x 1000] x 1000")).models[0]
    assert at_the_limit.layout[0].count * at_the_limit.layout[0].items[0].count == 1_000_000
