"""Mutated example specs: ``parse`` succeeds or raises a well-formed SpecError, never anything else."""
from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from ssmc import ir
from ssmc.errors import SpecError
from ssmc.frontend import parse

SOURCES = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.ssm"))}
# The examples are mostly comments; mutate their code without them as often as with them.
SOURCES.update({f"{name} (no comments)": re.sub(r"#[^\n]*", "", text)
                for name, text in list(SOURCES.items())})
NAMES = sorted(SOURCES)

# Words and symbols the language uses, plus near misses, for token-level mutations.
VOCABULARY = [
    "ssm", "model", "dims", "A", "delta", "B", "C", "D", "gate", "discretize", "compute", "dtype",
    "norm", "layers", "selective", "constant", "per", "group", "head", "channel", "head_dim",
    "scalar", "diagonal", "complex", "dplr", "dense", "-exp(A_log)", "A_log", "softplus", "dt",
    "dt_bias", "clamp", "inf", "silu(z)", "none", "zoh", "bilinear", "euler", "exp_euler",
    "exp-euler", "trapezoidal", "step", "scan", "chunked", "conv", "attention", "mlp", "moe", "x",
    "rmsnorm", "layernorm", "heads", "state", "channels", "groups", "rank", "fp32", "bf16",
    "{", "}", "(", ")", "[", "]", ",", "=", "+", "-", "#", "//", "\n", "0", "1", "-1", "3", "7.5",
    "1e-3", "1e400", "256", "99999999999999999999", "Mamba1", "x4", ":", "$", "\t", "\r\n", "é",
]
TOKEN = re.compile(r"\s+|[A-Za-z_][\w-]*|[-+]?\d[\w.+-]*|.", re.S)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_clean(text: str):
    """Success, or a SpecError that renders file:line:col within the text."""
    try:
        result = parse(text, file="fuzz.ssm")
    except SpecError as err:
        rendered = str(err)
        assert "error: " in rendered and err.message
        if err.loc is not None and err.loc.line > 0:
            lines = max(len(text.splitlines()), 1)
            assert 1 <= err.loc.line <= lines + 1, rendered
            assert err.loc.column >= 1, rendered
            assert rendered.startswith(f"fuzz.ssm:{err.loc.line}:{err.loc.column}: error: ")
        assert "__ANON" not in rendered and "Token(" not in rendered
        return None
    assert isinstance(result, ir.SpecFile)
    for model in result.models:
        model.blocks()
    return result


@st.composite
def char_mutations(draw):
    text = SOURCES[draw(st.sampled_from(NAMES))]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "replace", "truncate"]))
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(1, 12)))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(VOCABULARY + list("{}[](),=#x-+.:\n "))) + text[i:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "replace" and i < len(text):
            text = text[:i] + draw(st.characters(codec="utf-8")) + text[i + 1:]
        elif kind == "truncate":
            text = text[:i]
    return text


@st.composite
def token_mutations(draw):
    tokens = TOKEN.findall(SOURCES[draw(st.sampled_from(NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        if not tokens:
            break
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "replace", "swap"]))
        if kind == "delete":
            del tokens[i]
        elif kind == "insert":
            tokens.insert(i, " " + draw(st.sampled_from(VOCABULARY)) + " ")
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "replace":
            tokens[i] = draw(st.sampled_from(VOCABULARY))
        elif kind == "swap" and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return "".join(tokens)


@FUZZ
@given(char_mutations())
def test_character_mutations_fail_cleanly(text):
    assert_clean(text)


@FUZZ
@given(token_mutations())
def test_token_mutations_fail_cleanly(text):
    assert_clean(text)


def test_unmutated_examples_parse():
    for name, text in SOURCES.items():   # with and without their comments
        assert assert_clean(text) is not None, name
