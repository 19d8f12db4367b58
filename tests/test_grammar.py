"""The spec language's grammar: every statement form reaches the IR, and syntax errors read well."""
from __future__ import annotations

import math
import re

import pytest

from ssmc import ir
from ssmc.errors import SpecError
from ssmc.frontend import _parser, parse
from ssmc.ir import AStructure, Algorithm, DType, Method, Sharing

DIAGONAL = {
    "dims": "dims channels = 16, state = 8",
    "A": "A diagonal",
    "discretize": "discretize zoh",
    "compute": "compute scan",
}
SCALAR = {
    "dims": "dims heads = 4, head_dim = 8, state = 16, groups = 2",
    "A": "A scalar per head",
    "discretize": "discretize exp_euler",
    "compute": "compute chunked(64)",
}


def family_text(base=DIAGONAL, name="F", **statements) -> str:
    """A family from ``base`` with statements replaced (value None removes one)."""
    merged = dict(base)
    merged.update(statements)
    body = "\n".join(f"  {line}" for line in merged.values() if line is not None)
    return f"ssm {name} {{\n{body}\n}}\n"


def family(base=DIAGONAL, **statements) -> ir.SSMFamily:
    return parse(family_text(base, **statements)).families[0]


def syntax_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, file="spec.ssm")
    return info.value


# --------------------------------------------------------------------------------------------
# Statements -> IR

@pytest.mark.parametrize("line, structure, selective, log_param", [
    ("A scalar per head = -exp(A_log)", AStructure.SCALAR, False, True),
    ("A scalar", AStructure.SCALAR, False, True),
    ("A selective scalar per head = A", AStructure.SCALAR, True, False),
])
def test_a_scalar_forms(line, structure, selective, log_param):
    f = family(SCALAR, A=line)
    assert (f.A.structure, f.A.selective, f.A.log_param) == (structure, selective, log_param)


@pytest.mark.parametrize("line, structure, selective, log_param", [
    ("A diagonal = -exp(A_log)", AStructure.DIAGONAL, False, True),
    ("A constant diagonal = A", AStructure.DIAGONAL, False, False),
    ("A selective diagonal", AStructure.DIAGONAL, True, True),
    ("A complex diagonal = -exp(A_log)", AStructure.COMPLEX_DIAGONAL, False, True),
    ("A selective complex diagonal = A", AStructure.COMPLEX_DIAGONAL, True, False),
    ("A dense = A", AStructure.DENSE, False, False),
])
def test_a_channel_forms(line, structure, selective, log_param):
    f = family(A=line)
    assert (f.A.structure, f.A.selective, f.A.log_param) == (structure, selective, log_param)
    assert f.A.loc.line == 3 and f.A.loc.column == 3


def test_a_dplr_rank_inline_or_in_dims():
    inline = family(A="A dplr(rank = 2) = A")
    in_dims = family(A="A dplr", dims="dims channels = 16, state = 8, rank = 2")
    both = family(A="A dplr(rank = 2)", dims="dims channels = 16, state = 8, rank = 2")
    for f in (inline, in_dims, both):
        assert f.A.structure is AStructure.DPLR and f.dims.rank == 2


@pytest.mark.parametrize("line, selective, softplus, bias, clamp", [
    ("delta selective = softplus(dt + dt_bias)", True, True, True, None),
    ("delta = softplus(dt)", True, True, False, None),
    ("delta constant = dt + dt_bias", False, False, True, None),
    ("delta constant = dt", False, False, False, None),
    ("delta selective", True, True, True, None),
    ("delta = softplus(dt + dt_bias) clamp(1e-3, 1e-1)", True, True, True, (1e-3, 1e-1)),
    ("delta clamp(0, inf)", True, True, True, (0.0, math.inf)),
    (None, True, True, True, None),
])
def test_delta_forms(line, selective, softplus, bias, clamp):
    d = family(delta=line).delta
    assert (d.selective, d.softplus, d.bias, d.clamp) == (selective, softplus, bias, clamp)


@pytest.mark.parametrize("lines, b, c", [
    ({"bc": "B, C selective per group"}, (True, Sharing.GROUP), (True, Sharing.GROUP)),
    ({"bc": "C, B constant per head"}, (False, Sharing.HEAD), (False, Sharing.HEAD)),
    ({"bc": "B, C constant per group"}, (False, Sharing.GROUP), (False, Sharing.GROUP)),
    ({"bc": "B, C selective per channel"}, (True, Sharing.HEAD), (True, Sharing.HEAD)),
    ({"bc": "B, C constant"}, (False, Sharing.HEAD), (False, Sharing.HEAD)),
    ({"bc": "B, C"}, (True, Sharing.GROUP), (True, Sharing.GROUP)),
    ({"b": "B constant per channel", "c": "C selective"}, (False, Sharing.HEAD), (True, Sharing.GROUP)),
    ({}, (True, Sharing.GROUP), (True, Sharing.GROUP)),
])
def test_b_c_forms(lines, b, c):
    f = family(**lines)
    assert (f.B.selective, f.B.sharing) == b
    assert (f.C.selective, f.C.sharing) == c


@pytest.mark.parametrize("base, line, sharing", [
    (DIAGONAL, "D per channel", Sharing.HEAD),
    (DIAGONAL, "D per head", Sharing.HEAD),
    (DIAGONAL, "D", Sharing.HEAD),
    (SCALAR, "D per head", Sharing.HEAD),
    (SCALAR, "D per head_dim", Sharing.HEAD_DIM),
    (DIAGONAL, "D none", None),
    (DIAGONAL, None, None),
])
def test_d_forms(base, line, sharing):
    f = family(base, D=line)
    assert (f.D.sharing if f.D else None) == sharing


@pytest.mark.parametrize("line, kind", [("gate silu(z)", "silu"), ("gate none", None), (None, None)])
def test_gate_forms(line, kind):
    f = family(gate=line)
    assert (f.gate.kind if f.gate else None) == kind


@pytest.mark.parametrize("word, method", [
    ("zoh", Method.ZOH), ("bilinear", Method.BILINEAR), ("euler", Method.EULER),
    ("exp_euler", Method.EXP_EULER), ("exp-euler", Method.EXP_EULER),
    ("trapezoidal", Method.TRAPEZOIDAL),
])
def test_discretize_forms(word, method):
    assert family(discretize=f"discretize {word}").method is method


@pytest.mark.parametrize("base, line, algorithm, chunk", [
    (DIAGONAL, "compute step", Algorithm.STEP, None),
    (DIAGONAL, "compute scan", Algorithm.SCAN, None),
    (SCALAR, "compute chunked(128)", Algorithm.CHUNKED, 128),
    (SCALAR, "compute chunked( 256 )", Algorithm.CHUNKED, 256),
])
def test_compute_forms(base, line, algorithm, chunk):
    c = family(base, compute=line).compute
    assert (c.algorithm, c.chunk_size) == (algorithm, chunk)


def test_compute_conv_on_lti_family():
    f = family(compute="compute conv", delta="delta constant = dt", bc="B, C constant")
    assert f.compute.algorithm is Algorithm.CONV and f.is_lti


@pytest.mark.parametrize("line, inputs, state, accum", [
    ("dtype inputs = [fp32, bf16], state = fp32, accum = fp32",
     (DType.FLOAT32, DType.BFLOAT16), DType.FLOAT32, DType.FLOAT32),
    ("dtype inputs = fp16", (DType.FLOAT16,), DType.FLOAT32, DType.FLOAT32),
    ("dtype inputs = [bfloat16, float32, half], accum = fp64",
     (DType.BFLOAT16, DType.FLOAT32, DType.FLOAT16), DType.FLOAT32, DType.FLOAT64),
    (None, ir.DTypes().inputs, DType.FLOAT32, DType.FLOAT32),
])
def test_dtype_forms(line, inputs, state, accum):
    d = family(dtype=line).dtypes
    assert (d.inputs, d.state, d.accum) == (inputs, state, accum)


def test_dims_fields():
    f = family(SCALAR)
    assert (f.dims.heads, f.dims.head_dim, f.dims.state, f.dims.groups, f.dims.channels) == (4, 8, 16, 2, 0)
    assert f.dims.d_inner == 32
    g = family(dims="dims channels = 1536, state = 16")
    assert (g.dims.channels, g.dims.state, g.dims.groups, g.dims.head_dim) == (1536, 16, 1, 1)


def test_statement_order_comments_blank_lines_and_locations():
    text = """// a family written out of order
ssm   Odd {   # comment after the brace

  compute scan        # trailing comment
  discretize zoh

  # a comment line between statements
  A diagonal
  dims channels = 8,
       state = 4
}
"""
    f = parse(text, file="odd.ssm").families[0]
    assert f.name == "Odd"
    assert f.loc == ir.Loc("odd.ssm", 2, 7, "ssm   Odd {   # comment after the brace")
    assert (f.compute.loc.line, f.method, f.A.loc.line, f.dims.loc.line) == (4, Method.ZOH, 8, 9)
    assert (f.dims.channels, f.dims.state) == (8, 4)


def test_block_may_close_on_its_last_line_and_files_hold_several_definitions():
    text = ("ssm A1 { dims channels = 4, state = 2\n A diagonal\n discretize zoh\n compute scan }\n"
            "ssm A2 {\n dims channels = 4, state = 2\n A diagonal\n discretize euler\n compute step\n}"
            "\nmodel M1 { dims d_model = 8\n layers A1, A2 }\nmodel M2 {\n dims d_model = 8\n layers A2 }")
    spec = parse(text)
    assert [f.name for f in spec.families] == ["A1", "A2"]
    assert [m.name for m in spec.models] == ["M1", "M2"]
    assert spec.family("A2").method is Method.EULER


def test_keywords_are_names_where_they_cannot_be_keywords():
    spec = parse(family_text(name="scan") + "model step {\n dims d_model = 8\n layers scan x 2\n}\n")
    assert spec.families[0].name == "scan"
    assert spec.models[0].blocks() == (ir.SSMBlock("scan", spec.models[0].blocks()[0].loc),) * 2


def test_model_statements_and_layout_forms():
    text = family_text(name="M") + """
model Big {
  norm   layernorm
  dims   d_model = 512, vocab = 1000
  layers [
    [M x 3, attention(heads = 8)] x 2,   # nested repeat
    attention(heads = 8, kv_heads = 2, window = 128, head_dim = 32),
    mlp, mlp(), mlp(hidden = 2048, activation = gelu),
    moe(experts = 8, top_k = 2), moe(experts = 4, top_k = 1, hidden = 64),
    [M, M],                              # a group without a count stays in place
  ]
}
"""
    m = parse(text).models[0]
    assert (m.name, m.d_model, m.vocab, m.norm) == ("Big", 512, 1000, "layernorm")
    outer = m.layout[0]
    assert isinstance(outer, ir.Repeat) and outer.count == 2
    inner = outer.items[0]
    assert isinstance(inner, ir.Repeat) and inner.count == 3 and inner.items[0].family == "M"
    assert outer.items[1] == ir.AttentionBlock(8, 8, loc=outer.items[1].loc)
    kinds = [type(b).__name__ for b in m.blocks()]
    assert kinds == (["SSMBlock"] * 3 + ["AttentionBlock"]) * 2 + [
        "AttentionBlock", "MLPBlock", "MLPBlock", "MLPBlock", "MoEBlock", "MoEBlock",
        "SSMBlock", "SSMBlock"]
    blocks = m.blocks()
    assert blocks[8] == ir.AttentionBlock(8, 2, head_dim=32, window=128, loc=blocks[8].loc)
    assert (blocks[9].hidden, blocks[10].hidden, blocks[11].hidden, blocks[11].activation) == (
        None, None, 2048, "gelu")
    assert (blocks[12].experts, blocks[12].top_k, blocks[12].hidden) == (8, 2, None)
    assert (blocks[13].experts, blocks[13].top_k, blocks[13].hidden) == (4, 1, 64)
    assert m.layout[-1].loc.line == 16   # the group's layers are spliced in with their own locs


def test_model_defaults():
    m = parse(family_text(name="M") + "model S {\n dims d_model = 64\n layers M x 2, mlp\n}").models[0]
    assert (m.vocab, m.norm, len(m.blocks())) == (None, "rmsnorm", 3)


def test_repeat_binds_tighter_than_comma_and_chains():
    m = parse(family_text(name="M") + "model S {\n dims d_model = 64\n layers M x 2 x 3, mlp\n}").models[0]
    assert len(m.blocks()) == 7
    assert m.layout[0].count == 3 and m.layout[0].items[0].count == 2


def test_empty_file_and_comment_only_file():
    assert parse("").families == ()
    assert parse("# nothing here\n\n// nor here\n").models == ()


def test_crlf_line_endings():
    f = parse(family_text().replace("\n", "\r\n")).families[0]
    assert f.dims.channels == 16


# --------------------------------------------------------------------------------------------
# Syntax errors

def _terminal_names():
    lark = _parser()[0]
    return {t.name for t in lark.terminals if len(t.name) > 1} | {"$END"}


def assert_readable(err: SpecError, line: int, col: int, *fragments: str):
    text = str(err)
    head, source, caret = text.split("\n")[:3]
    assert head.startswith(f"spec.ssm:{line}:{col}: error: "), text
    assert caret.strip() == "^" and caret.index("^") - 4 == col - 1, text
    assert source == "    " + err.loc.source_line, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    raw = [name for name in _terminal_names() if re.search(rf"(?<![\w']){re.escape(name)}(?![\w'])", text)]
    assert not raw, f"raw terminal names {raw} in:\n{text}"
    assert "__ANON" not in text


def test_missing_method_names_the_methods():
    err = syntax_error(family_text(discretize="discretize"))
    assert_readable(err, 4, 13, "unexpected end of line",
                    "expected one of: zoh, bilinear, euler, exp_euler, trapezoidal")


def test_unknown_method():
    err = syntax_error(family_text(discretize="discretize rk4"))
    assert_readable(err, 4, 14, "unexpected 'rk4'", "one of: zoh, bilinear, euler, exp_euler, trapezoidal")


def test_unknown_statement_lists_the_statements_and_suggests():
    err = syntax_error(family_text(gate="Delta = softplus(dt)"))
    assert_readable(err, 6, 3, "unexpected 'Delta'",
                    "expected a statement (dims, A, delta, B, C, D, gate, discretize, compute, dtype) or '}'",
                    "did you mean 'delta'?")


def test_keyword_prefix_is_not_a_keyword():
    err = syntax_error(family_text(D="Dx per channel"))
    assert_readable(err, 6, 3, "unexpected 'Dx'", "'Dx' is not a statement of an ssm block")


def test_model_statement_in_ssm_block():
    err = syntax_error(family_text(layers="layers [F]"))
    assert_readable(err, 6, 3, "'layers' is a statement of a model block, not of an ssm block")


def test_unknown_model_statement():
    err = syntax_error(family_text(name="M") + "model X {\n  dims d_model = 8\n  compute scan\n}\n")
    assert_readable(err, 9, 3, "expected a statement (dims, norm, layers) or '}'",
                    "'compute' is a statement of an ssm block, not of a model block")


def test_missing_value_points_after_the_last_word():
    err = syntax_error(family_text(dims="dims channels = 16, state ="))
    assert_readable(err, 2, 30, "unexpected end of line", "a name", "a number", "'['")


def test_missing_comma_between_dims():
    err = syntax_error(family_text(dims="dims channels = 16 state = 8"))
    assert_readable(err, 2, 22, "unexpected 'state'", "','", "end of line")


def test_colon_instead_of_equals():
    err = syntax_error(family_text(dims="dims channels: 16, state = 8"))
    assert_readable(err, 2, 16, "unexpected character ':'", "expected '='",
                    "names and values are joined by '='")


def test_equals_after_statement_keyword():
    err = syntax_error(family_text(compute="compute = scan"))
    assert_readable(err, 5, 11, "unexpected '='", "one of: step, scan, chunked, conv",
                    "'compute' takes no '='")


def test_unclosed_block_at_end_of_file():
    err = syntax_error(family_text()[:-2])
    assert_readable(err, 5, 15, "unexpected end of file", "'}'", "the '{' at line 1:7 is not closed")


def test_new_definition_inside_unclosed_block():
    text = family_text()[:-2] + "\nmodel M {\n dims d_model = 4\n layers F\n}\n"
    err = syntax_error(text)
    assert_readable(err, 7, 1, "unexpected 'model'", "add '}' before it")


def test_unclosed_parenthesis_says_where_it_opened():
    err = syntax_error(family_text(SCALAR, compute="compute chunked(64", D="D per head"))
    assert_readable(err, 6, 3, "unexpected 'D'", "expected ')'", "the '(' at line 5:18 is not closed")


def test_repeat_without_space():
    err = syntax_error(family_text() + "model M {\n dims d_model = 4\n layers [F x4]\n}\n")
    assert_readable(err, 9, 12, "unexpected 'x4'", "write the repetition with a space: 'x 4'")


def test_empty_layer_slot():
    err = syntax_error(family_text() + "model M {\n dims d_model = 4\n layers [F, , F]\n}\n")
    assert_readable(err, 9, 13, "unexpected ','", "expected a layer (an ssm family name, attention(...)")


def test_garbage_at_top_level():
    err = syntax_error("hello world\n")
    assert_readable(err, 1, 1, "unexpected 'hello'", "expected a definition", "or end of file")


def test_missing_family_name():
    err = syntax_error("ssm {\n}\n")
    assert_readable(err, 1, 5, "unexpected '{'; expected a name")


def test_stray_character():
    err = syntax_error(family_text(A="A diagonal $"))
    assert_readable(err, 3, 14, "unexpected character '$'")


def test_structure_typo_suggests():
    err = syntax_error(family_text(A="A diagonl"))
    assert_readable(err, 3, 5, "unexpected 'diagonl'",
                    "one of: selective, constant, scalar, diagonal, complex, dplr, dense",
                    "did you mean 'diagonal'?")


def test_lalr_merged_lookaheads_are_not_offered():
    # After 'x 4' at the top of a layout, ']' is not acceptable (no bracket is open).
    err = syntax_error(family_text() + "model M {\n dims d_model = 4\n layers F x 4 )\n}\n")
    assert "']'" not in str(err).split("\n")[0]
    assert_readable(err, 9, 15, "unexpected ')'", "','", "x N")


def test_missing_space_after_keyword():
    err = syntax_error(family_text(A="Aconstant diagonal"))
    assert_readable(err, 3, 3, "unexpected 'Aconstant'", "is a space missing after 'A'?")


def test_double_equals_is_not_blamed_on_a_statement_keyword():
    err = syntax_error(family_text(dims="dims channels == 16, state = 8"))
    assert_readable(err, 2, 18, "unexpected '='", "a number")
    assert "takes no '='" not in str(err)


def test_the_reference_example_in_the_docs_parses():
    from conftest import ROOT
    doc = (ROOT / "docs" / "language.md").read_text()
    example = re.findall(r"```\n(.*?)```", doc, re.S)[1]
    spec = parse(example)
    assert spec.family("Mamba2").delta.clamp == (0.0, math.inf)
    assert len(spec.models[0].blocks()) == 32
