"""The spec language's syntax: text -> lark parse tree, with syntax errors in words.

The grammar (grammar/ssmc.lark, installed as ``ssmc.grammar``) fixes the shape of every
statement. A post-lexer (``_LineJoiner``) decides where newlines end statements and remembers
the context an error message needs; a syntax error becomes a ``SpecError`` with
``file:line:col``, the line, a caret and what was expected, named from lark's
expected-terminal sets in words (see ``_Vocabulary``), so that no user ever sees a name like
RBRACE, with a hint for the common mistakes. ``ssmc.frontend`` reads the tree into IR nodes.
"""
from __future__ import annotations

import difflib
import re
import threading
from functools import lru_cache
from importlib import resources
from typing import List, Optional, Tuple

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ir
from .errors import SpecError

# What each block takes, in the order the docs list them (also the order error messages use).
SSM_STATEMENTS = ("dims", "A", "delta", "B", "C", "D", "gate", "discretize", "compute", "dtype")
MODEL_STATEMENTS = ("dims", "norm", "layers")


def source_loc(file: str, lines: List[str], line: int, column: int) -> ir.Loc:
    """The ``Loc`` of line:column, with the source line (empty when out of range)."""
    return ir.Loc(file, line, column, lines[line - 1] if 0 < line <= len(lines) else "")


# --------------------------------------------------------------------------------------------
# Lexing and parsing

class _LineJoiner:
    """Post-lexer: newlines end statements except inside () and [], after ',' or '{', and when
    repeated. It also remembers the recent tokens and the open brackets, for error messages."""

    always_accept = ("NAME", "_NL")

    def __init__(self):
        self.recent: List[Token] = []
        self.open: List[Token] = []        # unclosed '{', '(' and '['

    def process(self, stream):
        self.recent, self.open = [], []
        closing = {"RBRACE": "LBRACE", "RPAR": "LPAR", "RSQB": "LSQB"}
        for tok in stream:
            kind = tok.type
            if kind == "_NL":
                last = self.recent[-1].type if self.recent else None
                inside = any(t.type != "LBRACE" for t in self.open)
                if inside or last in (None, "_NL", "LBRACE", "COMMA"):
                    continue
            elif kind in ("LBRACE", "LPAR", "LSQB"):
                self.open.append(tok)
            elif kind in closing and self.open and self.open[-1].type == closing[kind]:
                self.open.pop()
            self.recent = self.recent[-2:] + [tok]
            yield tok

    def before(self, tok: Token) -> Optional[Token]:
        """The last word or symbol before ``tok`` (which the parser may or may not have seen)."""
        for earlier in reversed(self.recent):
            if earlier.type != "_NL" and (tok.type in _END or earlier.start_pos < tok.start_pos):
                return earlier
        return None


_PARSE_LOCK = threading.Lock()   # the post-lexer keeps per-parse state for error messages


@lru_cache(maxsize=1)
def parser() -> Tuple[Lark, _LineJoiner, "_Vocabulary"]:
    grammar = resources.files("ssmc.grammar").joinpath("ssmc.lark").read_text(encoding="utf-8")
    joiner = _LineJoiner()
    lark = Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, postlex=joiner)
    return lark, joiner, _Vocabulary(lark, grammar)


def syntax_tree(text: str, file: str, lines: List[str]) -> Tree:
    """The lark tree of ``text``; a syntax error raises ``SpecError`` (see ``_syntax_error``)."""
    lark, joiner, vocab = parser()
    with _PARSE_LOCK:
        try:
            return lark.parse(text)
        except UnexpectedInput as exc:
            err = _syntax_error(exc, text, file, lines, joiner, vocab)
        # Raised outside the except block so that the lark traceback is not chained to it.
    raise err


# --------------------------------------------------------------------------------------------
# Syntax errors in words

class _Vocabulary:
    """Readable names for the grammar's terminals, and the groups that messages name at once.

    A terminal is known by its key: its text for a string terminal ("zoh", "}"), else its name."""

    GROUPS = (({"ssm", "model"}, "a definition ('ssm <name> {' or 'model <name> {')"),
              (set(SSM_STATEMENTS), "a statement (" + ", ".join(SSM_STATEMENTS) + ")"),
              (set(MODEL_STATEMENTS), "a statement (" + ", ".join(MODEL_STATEMENTS) + ")"),
              ({"NAME", "attention", "mlp", "moe", "["},
               "a layer (an ssm family name, attention(...), mlp(...), moe(...) or [...])"))

    def __init__(self, lark: Lark, grammar: str):
        self.ignored = set(lark.lexer_conf.ignore)
        self.key = {t.name: t.pattern.value if t.pattern.type == "str" else t.name
                    for t in lark.terminals}
        self.words = {"NAME": "a name", "NUMBER": "a number", "_NL": "end of line",
                      "$END": "end of file", "x": "x N"}
        self.rank = {"NAME": -2, "NUMBER": -1, "_NL": 10**6, "$END": 10**6 + 1}
        for key in self.key.values():
            if key not in self.words:
                self.words[key] = key if re.fullmatch(r"[A-Za-z_][\w-]*", key) else f"'{key}'"
            # Keywords in the order the grammar first uses them: the order a reader expects.
            pos = grammar.find(f'"{key}"')
            self.rank.setdefault(key, pos if pos >= 0 else 10**5)

    def keys(self, terminals) -> set:
        keys = {self.key.get(t, t) for t in terminals if t not in self.ignored}
        if "exp_euler" in keys:
            keys.discard("exp-euler")        # an alias: name the canonical spelling only
        return keys & set(self.words)

    def describe_token(self, tok: Token) -> str:
        if tok.type == "_NL":
            return "end of line"
        if tok.type in _END:
            return "end of file"
        return f"number {tok.value}" if tok.type == "NUMBER" else f"'{tok.value}'"

    def expected(self, terminals) -> str:
        """'one of: zoh, bilinear, ...' for a set of terminal names."""
        keys, phrases = self.keys(terminals), []
        for group, phrase in self.GROUPS:
            if group <= keys:
                phrases.append(phrase)
                keys -= group
        words = phrases + [self.words[k] for k in sorted(keys, key=lambda k: (self.rank[k], k))]
        if len(words) <= 1:
            return words[0] if words else "nothing more here"
        if len(words) == 2 or phrases:
            return ", ".join(words[:-1]) + f" or {words[-1]}"
        return "one of: " + ", ".join(words)


def _expected_terminals(exc: UnexpectedInput) -> set:
    """The terminals that would let the parser go on where it failed.

    lark's own sets come from one LALR state, whose lookaheads are merged across contexts (a
    ']' after 'x 4' even outside brackets); the interactive parser tries each one for real."""
    interactive = getattr(exc, "interactive_parser", None)
    if interactive is not None:
        return set(interactive.accepts())
    state = getattr(exc, "state", None)
    if state is not None:
        return {t for t in state.parse_conf.states[state.position] if t.isupper()}
    return set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())


def _syntax_error(exc: UnexpectedInput, text: str, file: str, lines: List[str],
                  joiner: _LineJoiner, vocab: _Vocabulary) -> SpecError:
    def loc(line: int, column: int) -> ir.Loc:
        return source_loc(file, lines, line, column)

    expected = _expected_terminals(exc)
    if isinstance(exc, (UnexpectedToken, UnexpectedEOF)):
        tok = exc.token
        previous = joiner.before(tok)
        if tok.type == "_NL" or tok.type in _END:
            # Point just after the last word: that is where something is missing.
            where = loc(previous.end_line, previous.end_column) if previous else loc(1, 1)
        else:
            where = loc(tok.line, tok.column)
        message = f"unexpected {vocab.describe_token(tok)}; expected {vocab.expected(expected)}"
        return SpecError(message, where, _hint(tok, expected, previous, joiner, vocab))
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else "?"
        hint = None
        if char == ":" and "=" in vocab.keys(expected):
            hint = "names and values are joined by '=', as in: heads = 80"
        message = f"unexpected character {char!r}; expected {vocab.expected(expected)}"
        return SpecError(message, loc(exc.line, exc.column), hint)
    # lark's LALR parser raises only the kinds above; keep any other one a SpecError all the same.
    line, column = getattr(exc, "line", 1) or 1, getattr(exc, "column", 1) or 1
    return SpecError(f"syntax error ({exc.__class__.__name__})", loc(line, column))


def _hint(tok: Token, expected: set, previous: Optional[Token], joiner: _LineJoiner,
          vocab: _Vocabulary) -> Optional[str]:
    literals = vocab.keys(expected)
    value = str(tok.value)
    word = tok.type == "NAME"
    unclosed = joiner.open[-1] if joiner.open else None
    if word and value in ("ssm", "model") and unclosed is not None:
        return (f"'{value}' starts a new definition, but the '{{' at line {unclosed.line}:"
                f"{unclosed.column} is not closed: add '}}' before it")
    if word and set(SSM_STATEMENTS) <= literals:
        return _unknown_statement(value, SSM_STATEMENTS, "an ssm block", MODEL_STATEMENTS, "a model")
    if word and set(MODEL_STATEMENTS) <= literals:
        return _unknown_statement(value, MODEL_STATEMENTS, "a model block", SSM_STATEMENTS, "an ssm")
    if word and re.fullmatch(r"x\d+", value) and "x" in literals:
        return f"write the repetition with a space: 'x {value[1:]}'"
    if value == "=" and previous is not None and previous.value in _STATEMENT_WORDS:
        return f"'{previous.value}' takes no '=': write e.g. 'discretize zoh', 'compute scan'"
    # An open '(' or '[' is to blame when what follows looks like the next statement.
    at_end = tok.type in _END
    next_statement = at_end or tok.type == "RBRACE" or value in _STATEMENT_WORDS | {"ssm", "model"}
    if unclosed is not None and next_statement and (at_end or unclosed.type != "LBRACE") \
            and vocab.key[_CLOSER[unclosed.type]] in literals:
        opener = vocab.key[unclosed.type]
        return f"the '{opener}' at line {unclosed.line}:{unclosed.column} is not closed"
    if word and literals:
        return suggest(value, literals - {"NAME", "NUMBER", "_NL", "$END"})
    return None


_CLOSER = {"LBRACE": "RBRACE", "LPAR": "RPAR", "LSQB": "RSQB"}
_END = ("$END", "<EOF>")     # what lark's LALR and its other parsers call the end of the text
_STATEMENT_WORDS = set(SSM_STATEMENTS) | set(MODEL_STATEMENTS)


def suggest(word: str, candidates) -> Optional[str]:
    """The nearest keyword: by case, by its start, by spelling, or a word missing a space."""
    candidates = sorted(candidates)
    close = [c for c in candidates if c.lower() == word.lower()]
    close = close or [c for c in candidates if c.startswith(word) and len(word) >= 2]
    close = close or difflib.get_close_matches(word, candidates, n=1, cutoff=0.7)
    if close:
        return f"did you mean '{close[0]}'?"
    prefixes = [c for c in candidates if word.startswith(c) and len(word) > len(c)]
    if prefixes:
        keyword = max(prefixes, key=len)
        return f"is a space missing after '{keyword}'?"
    return None


def _unknown_statement(word: str, allowed, block: str, other, other_block: str) -> str:
    if word in other:
        return f"'{word}' is a statement of {other_block} block, not of {block}"
    text = f"'{word}' is not a statement of {block}; it takes: " + ", ".join(allowed)
    suggestion = suggest(word, allowed)
    return text + (f" ({suggestion})" if suggestion else "")
