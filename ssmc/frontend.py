"""The spec language front end: text -> lark parse tree -> ``ir.SpecFile`` -> ``check``.

The grammar (grammar/ssmc.lark, installed as ``ssmc.grammar``) fixes the shape of every
statement; this module reads the tree into IR nodes, each with the ``Loc`` of its first token,
and rejects what the IR could not hold: duplicate or missing statements, unknown names in
``name = value`` lists, values of the wrong kind, unknown dtypes. Everything else that is
semantic lives in ``ssmc.check``. Parsing and syntax errors (in words, never a terminal name
like RBRACE) live in ``ssmc.syntax``.

docs/language.md is the reference for the language itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from lark import Token, Tree

from . import ir
from .check import check, require_positive
from .errors import SpecError
from .syntax import MODEL_STATEMENTS, SSM_STATEMENTS, source_loc, suggest, syntax_tree
from .syntax import parser as _parser  # noqa: F401  (tests/test_grammar.py reads the terminals)

__all__ = ["parse", "parse_file", "SSM_STATEMENTS", "MODEL_STATEMENTS", "DIM_NAMES"]

DIM_NAMES = ("heads", "head_dim", "channels", "state", "groups", "rank")
# What a spec may leave to the call (``channels = any``): the sizes mamba_ssm's functions take
# from their tensors. (A DPLR rank changes the algorithm's structure, so it is always written.)
OPEN_DIM_NAMES = ("heads", "head_dim", "channels", "state", "groups")
MODEL_DIM_NAMES = ("d_model", "vocab")
DTYPE_FIELDS = ("inputs", "state", "accum")

# Statements without which a family has no meaning, with what to write.
REQUIRED_SSM = {
    "dims": "dims heads = H, head_dim = P, state = N (scalar A) or dims channels = D, state = N",
    "A": "A scalar per head | diagonal | complex diagonal | dplr | dense",
    "discretize": "discretize zoh | bilinear | euler | exp_euler | trapezoidal",
    "compute": "compute step | scan | chunked(256) | conv",
}
REQUIRED_MODEL = {
    "dims": "dims d_model = N",
    "layers": "layers [ ... ]",
}

DTYPE_NAMES = {
    "fp16": ir.DType.FLOAT16, "float16": ir.DType.FLOAT16, "half": ir.DType.FLOAT16,
    "bf16": ir.DType.BFLOAT16, "bfloat16": ir.DType.BFLOAT16,
    "fp32": ir.DType.FLOAT32, "float32": ir.DType.FLOAT32, "float": ir.DType.FLOAT32,
    "fp64": ir.DType.FLOAT64, "float64": ir.DType.FLOAT64, "double": ir.DType.FLOAT64,
}

_METHODS = {"ZOH": ir.Method.ZOH, "BILINEAR": ir.Method.BILINEAR, "EULER": ir.Method.EULER,
            "EXP_EULER": ir.Method.EXP_EULER, "EXP_EULER_DASHED": ir.Method.EXP_EULER,
            "TRAPEZOIDAL": ir.Method.TRAPEZOIDAL}
_ALGORITHMS = {"STEP": ir.Algorithm.STEP, "SCAN": ir.Algorithm.SCAN,
               "CHUNKED": ir.Algorithm.CHUNKED, "CONV": ir.Algorithm.CONV}
_STRUCTURES = {"scalar": ir.AStructure.SCALAR, "diagonal": ir.AStructure.DIAGONAL,
               "complex_diagonal": ir.AStructure.COMPLEX_DIAGONAL, "dplr": ir.AStructure.DPLR,
               "dense": ir.AStructure.DENSE}
_STATEMENT_KEYS = {"dims_stmt": ("dims",), "a_stmt": ("A",), "delta_stmt": ("delta",),
                   "d_stmt": ("D",), "d_none": ("D",), "gate_stmt": ("gate",),
                   "gate_none": ("gate",), "discretize_stmt": ("discretize",),
                   "compute_stmt": ("compute",), "dtype_stmt": ("dtype",),
                   "norm_stmt": ("norm",), "layers_stmt": ("layers",)}
_BC_KEYS = {"b": ("B",), "c": ("C",), "b_and_c": ("B", "C")}


# --------------------------------------------------------------------------------------------
# Entry points

def parse(text: str, file: str = "<spec>") -> ir.SpecFile:
    """Parse spec text into a checked ``ir.SpecFile``; raises ``SpecError`` on any problem."""
    if not isinstance(text, str):
        raise SpecError(f"a spec is text, got {type(text).__name__}")
    lines = text.splitlines()
    tree = syntax_tree(text, file, lines)
    try:
        specfile = _Builder(file, text, lines).spec_file(tree)
    except RecursionError:
        raise SpecError("the layout is nested too deeply", source_loc(file, lines, 1, 1))
    return check(specfile)


def parse_file(path) -> ir.SpecFile:
    """Parse and check the spec file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {str(path)!r}: {exc}") from None
    return parse(text, file=str(path))


# --------------------------------------------------------------------------------------------
# Tree -> IR

@dataclass
class _Stmt:
    tree: Tree
    loc: ir.Loc


def _tokens(tree: Tree) -> List[Token]:
    return [c for c in tree.children if isinstance(c, Token)]


def _subtrees(tree: Tree) -> List[Tree]:
    return [c for c in tree.children if isinstance(c, Tree)]


def _first_tree(tree: Tree, *names) -> Optional[Tree]:
    return next((c for c in _subtrees(tree) if c.data in names), None)


class _Builder:
    def __init__(self, file: str, text: str, lines: List[str]):
        self.file, self.text, self.lines = file, text, lines

    # ---- locations and values -------------------------------------------------------------

    def loc(self, node) -> ir.Loc:
        where = node if isinstance(node, Token) else node.meta
        return source_loc(self.file, self.lines, where.line, where.column)

    def fail(self, message: str, node, hint: Optional[str] = None):
        raise SpecError(message, self.loc(node), hint)

    def whole(self, node, what: str) -> int:
        """A whole number from a NUMBER token or a ``value`` subtree (``1e3`` is 1000)."""
        if isinstance(node, Tree):
            if node.data != "number":
                self.fail(f"{what} must be a number, got {self.show(node)}", node)
            node = node.children[0]
        if re.fullmatch(r"[+-]?\d+", node.value):
            return int(node.value)
        number = float(node.value)
        if not number.is_integer():
            self.fail(f"{what} must be a whole number, got {node.value}", node)
        return int(number)

    def optional(self, args, key: str) -> Optional[int]:
        return self.whole(args[key][1], key) if key in args else None

    def word(self, value: Tree, what: str) -> str:
        if value.data != "word":
            self.fail(f"{what} must be a name, got {self.show(value)}", value)
        return str(value.children[0])

    def show(self, value: Tree) -> str:
        return "a list" if value.data == "list" else f"'{value.children[0]}'"

    def kwargs(self, tree: Optional[Tree], allowed, what: str) -> Dict[str, Tuple[Token, Tree]]:
        """name = value pairs, each name known to ``allowed`` and given once."""
        out: Dict[str, Tuple[Token, Tree]] = {}
        if tree is None:
            return out
        for kw in _subtrees(tree):
            name, value = kw.children
            if name not in allowed:
                self.fail(f"unknown {what} '{name}'; known: {', '.join(allowed)}", name,
                          suggest(str(name), allowed))
            if name in out:
                self.fail(f"{what} '{name}' is given twice (first at line {out[name][0].line})", name)
            out[str(name)] = (name, value)
        return out

    # ---- file -------------------------------------------------------------------------------

    def spec_file(self, tree: Tree) -> ir.SpecFile:
        families, models = [], []
        for definition in _subtrees(tree):
            if definition.data == "ssm_def":
                families.append(self.family(definition))
            else:
                models.append(self.model(definition))
        return ir.SpecFile(tuple(families), tuple(models), file=self.file, text=self.text)

    def statements(self, tree: Tree, kind: str, name: Token) -> Dict[str, _Stmt]:
        """Each statement of a block by key, rejecting a second one of any kind."""
        seen: Dict[str, _Stmt] = {}
        for stmt in _subtrees(tree):
            if stmt.data == "bc_stmt":
                keys = _BC_KEYS[_subtrees(stmt)[0].data]
            else:
                keys = _STATEMENT_KEYS[stmt.data]
            for key in keys:
                if key in seen:
                    self.fail(f"duplicate '{key}' statement in {kind} {name} "
                              f"(first at line {seen[key].loc.line})", stmt,
                              "each statement may appear once per block")
                seen[key] = _Stmt(stmt, self.loc(stmt))
        return seen

    def require(self, stmts, required: Dict[str, str], kind: str, name: Token):
        missing = [key for key in required if key not in stmts]
        if missing:
            listed = ", ".join(f"'{k}'" for k in missing)
            wanted = "".join(f"\n      {required[k]}" for k in missing)
            self.fail(f"{kind} {name} has no {listed} statement{'s' if len(missing) > 1 else ''}",
                      name, f"add:{wanted}")

    # ---- ssm families -----------------------------------------------------------------------

    def family(self, tree: Tree) -> ir.SSMFamily:
        name = _tokens(tree)[0]
        stmts = self.statements(tree, "ssm", name)
        self.require(stmts, REQUIRED_SSM, "ssm", name)
        A, rank = self.a_spec(stmts["A"])
        dims = self.dims(stmts["dims"], A.structure, rank)
        B = self.bc(stmts.get("B"), A.structure)
        C = self.bc(stmts.get("C"), A.structure)
        return ir.SSMFamily(
            name=str(name), dims=dims, A=A, delta=self.delta(stmts.get("delta")), B=B, C=C,
            method=self.method(stmts["discretize"]), compute=self.compute(stmts["compute"]),
            D=self.d_spec(stmts.get("D"), A.structure), gate=self.gate(stmts.get("gate")),
            dtypes=self.dtypes(stmts.get("dtype")), loc=self.loc(name))

    def dims(self, stmt: _Stmt, structure: ir.AStructure, rank: Optional[Tuple[int, Token]]) -> ir.Dims:
        given = self.kwargs(_first_tree(stmt.tree, "kwargs"), DIM_NAMES, "dimension")
        sizes, open_sizes = {}, []
        for key, (name, value) in given.items():
            if value.data == "word" and str(value.children[0]) == "any":
                if key not in OPEN_DIM_NAMES:
                    self.fail(f"{key} cannot be left open", value,
                              f"sizes a call may set: {', '.join(OPEN_DIM_NAMES)}")
                sizes[key] = 0
                open_sizes.append(key)
                continue
            if value.data == "word":
                self.fail(f"{key} must be a number or 'any' (a size each call's tensors give), "
                          f"got {self.show(value)}", value, f"e.g. {key} = 16 or {key} = any")
            sizes[key] = self.whole(value, key)
            # 0 stands for "not given" in ir.Dims, so a written size must be >= 1 right here.
            require_positive(sizes[key], key, self.loc(value))
        if rank is not None:
            value, where = rank
            if "rank" in sizes and sizes["rank"] != value:
                self.fail(f"rank {value} in dplr(...) contradicts dims rank = {sizes['rank']} "
                          f"(line {given['rank'][0].line})", where)
            sizes["rank"] = value
        if "head_dim" not in sizes:
            # Scalar A needs head_dim written (0 = missing, reported by check); elsewhere a
            # channel is a head of size 1.
            sizes["head_dim"] = 0 if structure is ir.AStructure.SCALAR else 1
        sizes.setdefault("state", 0)
        return ir.Dims(loc=stmt.loc, open=tuple(sorted(open_sizes)), **sizes)

    def selective(self, tree: Tree, default: bool) -> bool:
        sel = _first_tree(tree, "selective", "constant")
        return default if sel is None else sel.data == "selective"

    def a_spec(self, stmt: _Stmt) -> Tuple[ir.ASpec, Optional[Tuple[int, Token]]]:
        structure = _first_tree(stmt.tree, *_STRUCTURES)
        rank = None
        if structure.data == "dplr":
            args = self.kwargs(_first_tree(structure, "kwargs"), ("rank",), "dplr argument")
            if "rank" in args:
                name, value = args["rank"]
                rank = (self.whole(value, "rank"), value)
                require_positive(rank[0], "rank", self.loc(value))
        param = _first_tree(stmt.tree, "log_param", "plain_param")
        return ir.ASpec(structure=_STRUCTURES[structure.data],
                        selective=self.selective(stmt.tree, False),
                        log_param=param is None or param.data == "log_param",
                        loc=stmt.loc), rank

    def delta(self, stmt: Optional[_Stmt]) -> ir.DeltaSpec:
        if stmt is None:
            return ir.DeltaSpec()
        expr = _first_tree(stmt.tree, "softplus", "identity")
        softplus, bias = True, True
        if expr is not None:
            softplus = expr.data == "softplus"
            bias = any(t.type == "PLUS" for t in _tokens(_subtrees(expr)[0]))
        clamp_tree = _first_tree(stmt.tree, "clamp")
        clamp = None if clamp_tree is None else tuple(self.bound(b) for b in _subtrees(clamp_tree))
        return ir.DeltaSpec(selective=self.selective(stmt.tree, True), softplus=softplus,
                            bias=bias, clamp=clamp, loc=stmt.loc)

    def bound(self, tree: Tree) -> float:
        tok = _tokens(tree)[0]
        return math.inf if tok.type == "INF" else float(tok.value)

    def bc(self, stmt: Optional[_Stmt], structure: ir.AStructure) -> ir.BCSpec:
        if stmt is None:
            return ir.BCSpec()
        selective = self.selective(stmt.tree, True)
        sharing_tree = _first_tree(stmt.tree, "bc_sharing")
        if sharing_tree is None:
            # Selective B/C come per group (mamba_ssm's layout); a learned constant per head.
            sharing = ir.Sharing.GROUP if selective else ir.Sharing.HEAD
        else:
            sharing = self.sharing(_tokens(sharing_tree)[0], structure)
        return ir.BCSpec(selective=selective, sharing=sharing, loc=stmt.loc)

    def sharing(self, tok: Token, structure: ir.AStructure) -> ir.Sharing:
        if tok.type == "SHARE_CHANNEL" and structure is ir.AStructure.SCALAR:
            self.fail("a scalar-A family has heads, not channels: 'per channel' is ambiguous here",
                      tok, "say 'per head' (one per head) or, for D, 'per head_dim' (one per head "
                           "and head_dim element)")
        return {"SHARE_GROUP": ir.Sharing.GROUP, "SHARE_HEAD": ir.Sharing.HEAD,
                "SHARE_CHANNEL": ir.Sharing.HEAD, "SHARE_HEAD_DIM": ir.Sharing.HEAD_DIM}[tok.type]

    def d_spec(self, stmt: Optional[_Stmt], structure: ir.AStructure) -> Optional[ir.DSpec]:
        if stmt is None or stmt.tree.data == "d_none":
            return None
        sharing_tree = _first_tree(stmt.tree, "d_sharing")
        sharing = ir.Sharing.HEAD if sharing_tree is None else self.sharing(_tokens(sharing_tree)[0], structure)
        return ir.DSpec(sharing=sharing, loc=stmt.loc)

    def gate(self, stmt: Optional[_Stmt]) -> Optional[ir.GateSpec]:
        none = stmt is None or stmt.tree.data == "gate_none"
        return None if none else ir.GateSpec(kind="silu", loc=stmt.loc)

    def method(self, stmt: _Stmt) -> ir.Method:
        return _METHODS[_tokens(_first_tree(stmt.tree, "method"))[0].type]

    def compute(self, stmt: _Stmt) -> ir.ComputeSpec:
        algorithm = _first_tree(stmt.tree, "algorithm")
        toks = _tokens(algorithm)
        chunk = None
        if len(toks) > 1 and toks[1] is not None:
            chunk = self.whole(toks[1], "chunk size")
        return ir.ComputeSpec(_ALGORITHMS[toks[0].type], chunk_size=chunk, loc=stmt.loc)

    def dtypes(self, stmt: Optional[_Stmt]) -> ir.DTypes:
        if stmt is None:
            return ir.DTypes()
        given = self.kwargs(_first_tree(stmt.tree, "kwargs"), DTYPE_FIELDS, "dtype field")
        fields = {}
        for key, (name, value) in given.items():
            if key == "inputs":
                items = [v for v in value.children if v is not None] if value.data == "list" else [value]
                if not items:
                    self.fail("dtype inputs lists no dtype", value, "e.g. inputs = [fp32, bf16]")
                fields[key] = tuple(self.dtype(v) for v in items)
            else:
                fields[key] = self.dtype(value)
        return ir.DTypes(loc=stmt.loc, **fields)

    def dtype(self, value: Tree) -> ir.DType:
        if value.data != "word" or str(value.children[0]) not in DTYPE_NAMES:
            shown = self.show(value)
            known = "fp16, bf16, fp32, fp64 (also float16, bfloat16, float32, float64)"
            self.fail(f"unknown dtype {shown}; known: {known}", value)
        return DTYPE_NAMES[str(value.children[0])]

    # ---- models -----------------------------------------------------------------------------

    def model(self, tree: Tree) -> ir.ModelSpec:
        name = _tokens(tree)[0]
        stmts = self.statements(tree, "model", name)
        self.require(stmts, REQUIRED_MODEL, "model", name)
        dims = self.kwargs(_first_tree(stmts["dims"].tree, "kwargs"), MODEL_DIM_NAMES, "model dimension")
        if "d_model" not in dims:
            self.fail(f"model {name}: dims has no d_model", stmts["dims"].tree, "e.g. dims d_model = 4096")
        d_model = self.whole(dims["d_model"][1], "d_model")
        vocab = self.optional(dims, "vocab")
        norm = str(_tokens(stmts["norm"].tree)[0]) if "norm" in stmts else "rmsnorm"
        layout = self.layout(_first_tree(stmts["layers"].tree, "layout"))
        return ir.ModelSpec(name=str(name), d_model=d_model, layout=layout, vocab=vocab,
                            norm=norm, loc=self.loc(name))

    def layout(self, tree: Tree) -> Tuple[ir.LayoutItem, ...]:
        items: List[ir.LayoutItem] = []
        for layer in _subtrees(tree):
            if layer.data == "group":     # [ ... ] without a count: its layers, in place
                items.extend(self.layout(_first_tree(layer, "layout")))
            else:
                items.append(self.layer(layer))
        return tuple(items)

    def layer(self, tree: Tree) -> ir.LayoutItem:
        kind = tree.data
        if kind == "repeat":
            inner, _, count_tok = tree.children
            count = self.whole(count_tok, "repeat count")
            items = self.layout(_first_tree(inner, "layout")) if inner.data == "group" else (self.layer(inner),)
            return ir.Repeat(items=items, count=count, loc=self.loc(count_tok))
        if kind == "ssm_ref":
            tok = tree.children[0]
            return ir.SSMBlock(family=str(tok), loc=self.loc(tok))
        args_tree = _first_tree(tree, "kwargs")
        if kind == "attention":
            args = self.kwargs(args_tree, ("heads", "kv_heads", "head_dim", "window"), "attention argument")
            if "heads" not in args:
                self.fail("attention needs heads", tree, "e.g. attention(heads = 32, kv_heads = 8)")
            heads = self.whole(args["heads"][1], "heads")
            return ir.AttentionBlock(
                heads=heads,
                kv_heads=heads if "kv_heads" not in args else self.whole(args["kv_heads"][1], "kv_heads"),
                head_dim=self.optional(args, "head_dim"), window=self.optional(args, "window"),
                loc=self.loc(tree))
        if kind == "mlp":
            args = self.kwargs(args_tree, ("hidden", "activation"), "mlp argument")
            return ir.MLPBlock(
                hidden=self.optional(args, "hidden"),
                activation=self.word(args["activation"][1], "activation") if "activation" in args else "silu",
                loc=self.loc(tree))
        args = self.kwargs(args_tree, ("experts", "top_k", "hidden"), "moe argument")
        for required in ("experts", "top_k"):
            if required not in args:
                self.fail(f"moe needs {required}", tree, "e.g. moe(experts = 16, top_k = 2)")
        return ir.MoEBlock(
            experts=self.whole(args["experts"][1], "experts"),
            top_k=self.whole(args["top_k"][1], "top_k"),
            hidden=self.optional(args, "hidden"), loc=self.loc(tree))
