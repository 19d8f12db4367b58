"""ssmc.compile / ssmc.parse: spec input forms, family selection, targets, the callable's shape."""
import numpy as np
import pytest
import torch

import ssmc
from ssmc.api import parse_target
from ssmc.ir import Algorithm, Convention

from conftest import EXAMPLES, assert_rel_close


def test_compile_from_path_text_and_specfile():
    path = EXAMPLES / "mamba1.ssm"
    by_path = ssmc.compile(path)
    by_str_path = ssmc.compile(str(path))
    by_text = ssmc.compile(path.read_text())
    by_spec = ssmc.compile(ssmc.parse(path))
    assert by_path.family.name == by_str_path.family.name == by_text.family.name == by_spec.family.name
    assert by_path.convention is Convention.SELECTIVE_SCAN


def test_family_selection_in_multi_family_file():
    spec = ssmc.parse(EXAMPLES / "mamba2.ssm")
    assert len(spec.families) >= 2
    with pytest.raises(ssmc.SSMCError, match="pick one with family="):
        ssmc.compile(EXAMPLES / "mamba2.ssm")
    names = [f.name for f in spec.families]
    k = ssmc.compile(EXAMPLES / "mamba2.ssm", family=names[0])
    assert k.family.name == names[0] and k.convention is Convention.SSD
    with pytest.raises(ssmc.SSMCError, match="no family 'Nope'"):
        ssmc.compile(EXAMPLES / "mamba2.ssm", family="Nope")


def test_missing_file_is_an_ssmc_error():
    with pytest.raises(ssmc.SSMCError, match="no such spec file"):
        ssmc.compile("does/not/exist.ssm")


@pytest.mark.parametrize("name,backend", [("reference", "reference"), ("cuda", "triton"),
                                          ("cuda:sm_90", "triton"), ("cpu", "cpu"),
                                          ("llvm -mcpu=skylake", "cpu"), ("c", "c"),
                                          ("aarch64", "c"), ("riscv64", "c")])
def test_parse_target(name, backend):
    assert parse_target(name).backend == backend


def test_bad_targets():
    for name in ("tpu", "cuda:90", "cuda:smx"):
        with pytest.raises(ssmc.TargetError):
            parse_target(name)
    with pytest.raises(ssmc.TargetError, match="cross-compiles"):
        ssmc.compile(EXAMPLES / "mamba1.ssm", target="aarch64")


def test_callable_returns_states_when_asked(seed):
    k = ssmc.compile(EXAMPLES / "s5.ssm")
    kw = k.example_inputs(batch=2, seqlen=9, seed=seed)
    y = k(**kw)
    y2, state = k(**kw, return_last_state=True)
    assert torch.equal(y, y2)
    assert y.shape == kw["u"].shape
    assert state.shape == (2, k.family.dims.d_inner, k.family.dims.state)


def test_example_inputs_are_reproducible_and_numpy_accepted():
    k = ssmc.compile(EXAMPLES / "mamba1.ssm")
    a = k.example_inputs(batch=1, seqlen=5, seed=3)
    b = k.example_inputs(batch=1, seqlen=5, seed=3)
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
    as_numpy = {n: (v.numpy() if isinstance(v, torch.Tensor) else v) for n, v in a.items()}
    assert_rel_close("numpy inputs", k(**as_numpy), k(**a), "float64")


def test_step_is_the_state_update_convention():
    k = ssmc.compile(EXAMPLES / "mamba1.ssm")
    assert k.step.convention is Convention.STATE_UPDATE
    assert k.step.plan.algorithm is Algorithm.STEP
    assert k.step.step is k.step


def test_wrong_tensor_is_named_before_launch():
    k = ssmc.compile(EXAMPLES / "mamba1.ssm")
    kw = k.example_inputs(batch=1, seqlen=4)
    kw["u"] = kw["u"][:, :-1]
    with pytest.raises(ssmc.CallError, match=r"\bu\b"):
        k(**kw)
