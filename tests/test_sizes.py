"""Sizes come from the tensors: one compiled family runs at sizes its spec does not name, on
every target, against the float64 oracle (which is compiled at the spec's sizes too, and
specializes the same way).

One suite for target x algorithm x family, with a state and a head_dim that are not powers of
two and several groups. Kernels specialize per size on first use and are kept per size.
"""
import shutil

import pytest
import torch

import families as F
import ssmc
from ssmc.ir import Algorithm

from conftest import ON_CUDA, TOL, rel_err, require_cuda_device

require_cuda_device()

# The target x algorithm x family matrix against the oracle at such sizes is tests/test_oracle.py
# (it builds the backend kernels directly, outputs poisoned); here one case per target goes
# through ssmc.compile's callable and checks that it keeps one kernel per size.
CASES = [
    # family builder, algorithm, sizes at call time (none of them the builder's)
    ("mamba2", F.mamba2, Algorithm.STEP, dict(heads=6, head_dim=10, state=12, groups=3)),
]
TARGETS = ["cpu", "c", "cuda"]


def _ids(case):
    return f"{case[0]}-{case[2].value}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_a_family_runs_at_sizes_its_spec_does_not_name(target, case, seed):
    _, make, algorithm, sizes = case
    if target == "cpu":
        pytest.importorskip("tvm", reason="the cpu target needs apache-tvm")
    if target == "c" and shutil.which("gcc") is None:
        pytest.skip("the c target builds with gcc, which is not on PATH")
    family = make()
    device = "cuda" if target == "cuda" and ON_CUDA else "cpu"
    oracle = ssmc.compile(family, target="reference", algorithm=algorithm)
    kernel = ssmc.compile(family, target=target, algorithm=algorithm)
    step = algorithm is Algorithm.STEP
    inputs = oracle.example_inputs(batch=2, seqlen=19, seed=seed, with_state=not step, **sizes)
    # Separate copies for the oracle and the kernel: the step updates its state in place.
    oracle_call = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    call = {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}
    expected = oracle(**oracle_call)
    got = kernel(**call)
    if step:
        assert_close("y", got, expected)
        assert not torch.equal(oracle_call["state"], inputs["state"]), "the oracle's step moved"
        assert_close("state", call["state"], oracle_call["state"])
    else:
        assert_close("y", got[0], expected[0])
        assert_close("final state", got[1], expected[1])
    assert [d for d in kernel._sized] == [kernel_dims(family, sizes)], "one kernel per size"
    kernel(**call)                                       # a second call reuses it
    assert len(kernel._sized) == 1


def kernel_dims(family, sizes):
    from ssmc.signature import resized
    return resized(family, **sizes).dims


def assert_close(name, got, expected):
    err = rel_err(got, expected)
    assert err <= TOL["float32"], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("make", [F.mamba2, F.mamba1], ids=["ssd", "selective_scan"])
def test_the_custom_op_states_shapes_at_any_size(make, seed):
    """torch.compile's fake implementation takes the state size from the tensors too: opcheck
    compares the fake outputs' shapes with the real ones at sizes the spec does not name."""
    from ssmc.runtime.ops import ARGUMENT_NAMES, as_op, get_op
    kernel = ssmc.compile(make(), target="reference")
    sizes = dict(heads=3, head_dim=5, state=7) if make is F.mamba2 else dict(channels=6, state=7)
    inputs = kernel.example_inputs(batch=1, seqlen=9, seed=seed, with_state=True, **sizes)
    args = tuple(inputs.get(name) for name in ARGUMENT_NAMES[kernel.convention])
    torch.library.opcheck(get_op(kernel), args, test_utils=("test_faketensor",))
    fn = torch.compile(as_op(kernel), fullgraph=True, backend="aot_eager")
    y, final = fn(**inputs)
    expected_y, expected_final = kernel(**inputs)
    assert final.shape[-1] == 7
    assert rel_err(y, expected_y) <= TOL["float32"]
    assert rel_err(final, expected_final) <= TOL["float32"]


def test_example_inputs_take_sizes_as_keywords():
    kernel = ssmc.compile(F.mamba2(), target="reference")
    inputs = kernel.example_inputs(batch=2, seqlen=5, heads=3, head_dim=7, state=9, groups=3)
    assert inputs["x"].shape == (2, 5, 3, 7) and inputs["B"].shape == (2, 5, 3, 9)
    with pytest.raises(ssmc.CallError, match="unknown size 'width'"):
        kernel.example_inputs(width=3)
