"""The operand table (ssmc/operands.py) is the one statement of the calling convention: what
validation, the op's fake shapes, the C entry point, the Triton launchers and the TVM kernels
take is read off it, so these tests check that each consumer agrees with it."""
from __future__ import annotations

import pytest
import torch

import families as F
from ssmc import signature
from ssmc.errors import CallError
from ssmc.ir import Algorithm, AStructure, Convention
from ssmc.operands import DIM_WORDS, Need, Role, operand_table, shape_of
from ssmc.plan import make_plan
from ssmc.problems import PROBLEMS

FAMILIES = {
    "mamba1": F.mamba1(),
    "mamba1-plain": F.mamba1(D=False, gate=False, bias=False, softplus=False),
    "mamba2": F.mamba2(),
    "mamba2-plain": F.mamba2(D=None, gate=False, bias=False),
    "s5": F.s5(),
    "s4d": F.s4d(),
    "s4-dplr": F.s4_dplr(),
}
ALGORITHMS = {"mamba1": Algorithm.SCAN, "mamba1-plain": Algorithm.SCAN,
              "mamba2": Algorithm.CHUNKED, "mamba2-plain": Algorithm.CHUNKED,
              "s5": Algorithm.SCAN, "s4d": Algorithm.CONV, "s4-dplr": Algorithm.CONV}


def _plans():
    for name, fam in FAMILIES.items():
        yield pytest.param(make_plan(fam, ALGORITHMS[name]), id=f"{name}-{ALGORITHMS[name].value}")
        if fam.method.value != "trapezoidal":
            yield pytest.param(make_plan(fam, Algorithm.STEP), id=f"{name}-step")


@pytest.mark.parametrize("plan", list(_plans()))
def test_table_lists_exactly_the_normalized_call(plan):
    table = plan.operands
    assert table is operand_table(plan.family, plan.convention)
    assert tuple(op.name for op in table.arguments) == PROBLEMS[table.convention].argument_names()
    letters = set(DIM_WORDS) | {"s+1"}
    for op in table.arguments + table.outputs:
        # sizes are letters, never the spec's numbers: one table serves every size
        assert all(d in letters for form in op.forms for d in form.dims), op
        assert op.is_tensor == bool(op.forms), op
        assert (op.need is Need.ABSENT) == bool(op.why), op
    fam = plan.family
    has = {"D": fam.D is not None, "z": fam.gate is not None,
           table.keyword["dt_bias"]: fam.delta.bias}
    for name, present in has.items():
        assert table[name].present == present
    assert set(table.droppable_terms()) == {table.key_of(n) for n, p in has.items() if p}


@pytest.mark.parametrize("name", ["mamba1-plain", "mamba2-plain"])
def test_bind_refuses_what_the_table_marks_absent(name):
    fam = FAMILIES[name]
    conv = fam.convention
    kwargs = signature.example_inputs(fam, conv, batch=1, seqlen=5)
    table = operand_table(fam, conv)
    for absent in ("D", "z", table.keyword["dt_bias"]):
        assert table[absent].need is Need.ABSENT
        extra = dict(kwargs, **{absent: torch.zeros(3)})
        with pytest.raises(CallError, match=f"argument '{absent}' was given but {fam.name}"):
            signature.bind(fam, conv, (), extra)


@pytest.mark.parametrize("plan", list(_plans()))
def test_c_entry_point_takes_the_table_tensors(plan):
    from ssmc.backends import c as c_backend
    from ssmc.backends.c.layout import make_layout
    if c_backend.supports(plan):
        pytest.skip(c_backend.supports(plan))
    layout = make_layout(plan)
    table = plan.operands
    tensors = {p.name: p for p in layout.params if p.kind == "tensor"}
    host_side = plan.algorithm is Algorithm.CONV and plan.family.A.structure in (
        AStructure.DPLR, AStructure.DENSE)
    for op in table.tensors() + table.outputs:
        if op.role is Role.INDEX or op.name in ("P", "Q"):
            continue
        if host_side and op.name in ("delta", "A", "B", "C", "delta_bias"):
            continue   # the host discretizes a matrix A (backends/c/matrix_conv.py)
        p = tensors.pop(op.name)
        assert p.dims == op.dims and p.is_complex == op.complex and p.nullable == op.nullable
    # what is left is C's own: the conv's workspace and the host's discretized coefficients
    assert set(tensors) <= {"conv_kernel", "abar", "bbar_B", "bbar_prev_B", "C"}


@pytest.mark.parametrize("plan", [p for p in _plans()
                                  if p.values[0].algorithm is not Algorithm.CHUNKED])
def test_triton_forward_takes_the_table_tensors(plan):
    from ssmc.backends import triton as tb
    args = tb.forward_arguments(plan)
    table = plan.operands
    assert args[:len(table.tensors())] == [op.name for op in table.tensors()]
    assert all(name in table for name in args)


@pytest.mark.parametrize("plan", [p for p in _plans()
                                  if p.values[0].family.A.structure is not AStructure.DPLR
                                  and p.values[0].algorithm is not Algorithm.CONV])
def test_tvm_kernels_take_the_table_tensors(plan):
    from ssmc.backends.cpu import buffers
    table = plan.operands
    names = [op.name for _, op in buffers.inputs(plan)]
    assert names == [op.name for op in table.tensors() if op.role is not Role.INDEX]
    assert [op.name for _, op in buffers.outputs(plan)] == [op.name for op in table.outputs]


def test_final_state_shape_comes_from_the_table():
    fam = F.mamba2(heads=3, head_dim=4, state=6)
    final = operand_table(fam, Convention.SSD).outputs[1]
    assert final.role is Role.FINAL_STATE and final.dims == ("s", "h", "p", "n")
    assert shape_of(final, {"s": 2, "h": 3, "p": 4, "n": 6}) == (2, 3, 4, 6)
