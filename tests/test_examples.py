"""The example specs: each parses and checks, and their IR is the model it claims to be."""
from __future__ import annotations

import dataclasses
import math

import pytest
import sympy as sp

from conftest import EXAMPLES
from ssmc import ir
from ssmc.discretize import derive_elementwise
from ssmc.frontend import parse_file
from ssmc.ir import (Algorithm, ASpec, AStructure, AttentionBlock, BCSpec, ComputeSpec, DeltaSpec,
                     Dims, DSpec, GateSpec, Method, MLPBlock, MoEBlock, Sharing, SSMBlock, SSMFamily)

ALL = sorted(p.name for p in EXAMPLES.glob("*.ssm"))


def without_locs(node):
    """The node with every Loc reset, so that IR can be compared with IR built by hand."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            changes[f.name] = ir.NOLOC if isinstance(value, ir.Loc) else without_locs(value)
        return dataclasses.replace(node, **changes)
    if isinstance(node, tuple):
        return tuple(without_locs(v) for v in node)
    return node


def load(name: str) -> ir.SpecFile:
    return parse_file(EXAMPLES / name)


def test_the_examples_are_all_here():
    assert ALL == ["jamba.ssm", "mamba1.ssm", "mamba2.ssm", "s4.ssm", "s4d.ssm", "s5.ssm", "samba.ssm"]


@pytest.mark.parametrize("name", ALL)
def test_example_parses_with_a_leading_comment_and_locations(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith("# "), f"{name} must open with a comment saying what it is"
    spec = load(name)
    assert spec.families, name
    for family in spec.families:
        assert family.loc.file.endswith(name) and family.loc.line > 1
        assert family.loc.source_line.startswith("ssm ")
        for node in (family.dims, family.A, family.compute):
            assert node.loc.line > family.loc.line


# ---- the Mamba families match mamba_ssm's computation ----------------------------------------

MAMBA_DELTA = DeltaSpec(selective=True, softplus=True, bias=True, clamp=None)
SELECTIVE_GROUP = BCSpec(selective=True, sharing=Sharing.GROUP)


def test_mamba1_is_selective_scan_fn():
    family = without_locs(load("mamba1.ssm").family())
    assert family == SSMFamily(
        name="Mamba1", dims=Dims(state=16, channels=1536, groups=1),
        A=ASpec(AStructure.DIAGONAL, selective=False, log_param=True), delta=MAMBA_DELTA,
        B=SELECTIVE_GROUP, C=SELECTIVE_GROUP, method=Method.EXP_EULER,
        compute=ComputeSpec(Algorithm.SCAN), D=DSpec(Sharing.HEAD), gate=GateSpec("silu"))
    assert family.convention is ir.Convention.SELECTIVE_SCAN and not family.is_lti


def test_mamba2_is_mamba_chunk_scan_combined():
    spec = load("mamba2.ssm")
    family = without_locs(spec.family("Mamba2"))
    assert family == SSMFamily(
        name="Mamba2", dims=Dims(state=128, heads=80, head_dim=64, groups=1),
        A=ASpec(AStructure.SCALAR, selective=False, log_param=True), delta=MAMBA_DELTA,
        B=SELECTIVE_GROUP, C=SELECTIVE_GROUP, method=Method.EXP_EULER,
        compute=ComputeSpec(Algorithm.CHUNKED, chunk_size=256), D=DSpec(Sharing.HEAD),
        gate=GateSpec("silu"))
    assert family.convention is ir.Convention.SSD and family.dims.d_inner == 5120
    decode = spec.family("Mamba2Decode")
    assert (decode.compute.algorithm, decode.dims.groups, decode.D.sharing) == (
        Algorithm.STEP, 8, Sharing.HEAD_DIM)
    assert decode.delta.clamp == (0.0, math.inf)      # mamba_ssm's default dt_limit
    assert decode.dtypes.inputs == (ir.DType.BFLOAT16, ir.DType.FLOAT16, ir.DType.FLOAT32)


@pytest.mark.parametrize("name", ["mamba1.ssm", "mamba2.ssm", "jamba.ssm", "samba.ssm"])
def test_mamba_discretization_is_exp_of_delta_a_and_delta_b(name):
    """mamba_ssm computes dA = exp(delta * A) and dB x = delta * B * x."""
    family = load(name).families[0]
    disc = derive_elementwise(family.method)
    assert sp.simplify(disc.abar - sp.exp(disc.dt * disc.a)) == 0
    assert sp.simplify(disc.bbar - disc.dt) == 0
    assert disc.bbar_prev == 0


# ---- the LTI families ------------------------------------------------------------------------

CONSTANT_DELTA = DeltaSpec(selective=False, softplus=False, bias=False)
CONSTANT_PER_CHANNEL = BCSpec(selective=False, sharing=Sharing.HEAD)


@pytest.mark.parametrize("name, structure, log_param, rank, method, algorithm", [
    ("s4d.ssm", AStructure.DIAGONAL, True, 0, Method.ZOH, Algorithm.CONV),
    ("s4.ssm", AStructure.DPLR, False, 1, Method.BILINEAR, Algorithm.CONV),
    ("s5.ssm", AStructure.COMPLEX_DIAGONAL, False, 0, Method.ZOH, Algorithm.SCAN),
])
def test_lti_families(name, structure, log_param, rank, method, algorithm):
    family = without_locs(load(name).family())
    assert family == SSMFamily(
        name=family.name, dims=Dims(state=64, channels=256, rank=rank),
        A=ASpec(structure, selective=False, log_param=log_param), delta=CONSTANT_DELTA,
        B=CONSTANT_PER_CHANNEL, C=CONSTANT_PER_CHANNEL, method=method,
        compute=ComputeSpec(algorithm), D=DSpec(Sharing.HEAD), gate=None)
    assert family.is_lti


# ---- hybrid models ---------------------------------------------------------------------------

def kinds(blocks):
    names = {SSMBlock: "ssm", AttentionBlock: "attn", MLPBlock: "mlp", MoEBlock: "moe"}
    return [names[type(b)] for b in blocks]


def test_jamba_layout():
    spec = load("jamba.ssm")
    model = spec.models[0]
    assert (model.name, model.d_model, model.vocab, model.norm) == ("Jamba", 4096, 65536, "rmsnorm")
    blocks = model.blocks()
    assert len(blocks) == 64                        # 32 layers, each a mixer and an FFN
    mixers, ffns = blocks[0::2], blocks[1::2]
    for layer, (mixer, ffn) in enumerate(zip(mixers, ffns)):
        if layer % 8 == 4:
            assert mixer == AttentionBlock(32, 8, loc=mixer.loc), layer
        else:
            assert mixer == SSMBlock("JambaMamba", loc=mixer.loc), layer
        if layer % 2 == 1:
            assert ffn == MoEBlock(16, 2, hidden=14336, loc=ffn.loc), layer
        else:
            assert ffn == MLPBlock(14336, loc=ffn.loc), layer
    assert kinds(blocks).count("attn") == 4 and kinds(blocks).count("moe") == 16
    family = spec.family("JambaMamba")
    assert (family.dims.channels, family.dims.state, family.method) == (8192, 16, Method.EXP_EULER)


def test_samba_layout():
    spec = load("samba.ssm")
    model = spec.models[0]
    assert (model.name, model.d_model, model.vocab) == ("Samba", 2304, 32000)
    blocks = model.blocks()
    assert len(blocks) == 36                        # 18 layers, alternating Mamba and SWA
    assert kinds(blocks) == ["ssm", "mlp", "attn", "mlp"] * 9
    swa = blocks[2]
    assert (swa.heads, swa.kv_heads, swa.head_dim, swa.window) == (18, 18, 128, 2048)
    assert all(b.hidden == 6144 for b in blocks if isinstance(b, MLPBlock))
    assert spec.family("SambaMamba").dims.channels == 2 * model.d_model
