"""Sizes come from the tensors: one compiled family runs at sizes its spec does not name, on
every target, against the float64 oracle (which is compiled at the spec's sizes too, and
specializes the same way).

One suite for target x algorithm x family, with a state and a head_dim that are not powers of
two and several groups. Kernels specialize per size on first use and are kept per size.
"""

import pytest
import torch

import families as F
import ssmc
from ssmc.ir import Algorithm

from conftest import TOL, rel_err, require_cuda_device, require_target_tools, target_device

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
    require_target_tools(target)
    family = make()
    device = target_device(target)
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
    assert [f.dims for f in kernel._sized] == [kernel_dims(family, sizes)], "one kernel per size"
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


OPEN_SPEC = """
ssm OpenMamba {
  dims       channels = any, state = any
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per channel
  gate       silu(z)
  discretize exp_euler
  compute    scan
}
"""


@pytest.mark.parametrize("target", TARGETS)
def test_a_spec_may_leave_sizes_open(target, seed):
    """``channels = any, state = any``: nothing is built at compile time; each call's sizes get
    their kernel (against the float64 oracle, itself compiled from the same open spec)."""
    require_target_tools(target)
    device = target_device(target)
    oracle = ssmc.compile(OPEN_SPEC, target="reference")
    kernel = ssmc.compile(OPEN_SPEC, target=target)
    assert kernel.config is None and not kernel._sized
    for i, sizes in enumerate([dict(channels=6, state=5), dict(channels=12, state=16)]):
        inputs = oracle.example_inputs(batch=2, seqlen=11, seed=seed + i, with_state=True,
                                       **sizes)
        expected = oracle(**inputs)
        got = kernel(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in inputs.items()})
        assert_close("y", got[0].cpu(), expected[0])
        assert_close("final state", got[1].cpu(), expected[1])
        assert got[1].shape == (2, sizes["channels"], sizes["state"])
    assert len(kernel._sized) == 2


def test_open_sizes_say_what_needs_them(tmp_path):
    from ssmc.errors import SpecError
    from ssmc.cli import main
    kernel = ssmc.compile(OPEN_SPEC, target="reference")
    with pytest.raises(SpecError, match=r"leaves channels, state open .* example_inputs needs "
                                        r"them") as e:
        kernel.example_inputs()
    assert "example_inputs(channels=1536, state=16)" in str(e.value)
    assert "channels = any" in str(e.value)         # the spec line, with a caret under dims
    with pytest.raises(SpecError, match="generating its kernel needs them"):
        kernel.source
    spec = tmp_path / "open.ssm"
    spec.write_text(OPEN_SPEC)
    assert main(["compile", str(spec), "--target", "reference", "-o", str(tmp_path / "a")]) == 1
    assert main(["compile", str(spec), "--target", "reference", "-o", str(tmp_path / "b"),
                 "--size", "channels=24,state=8"]) == 0
    import json
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [k["family"] for k in manifest["kernels"]] == ["OpenMamba"]
    layer = pytest.raises(SpecError, ssmc.nn.SSMLayer, OPEN_SPEC, d_model=16)
    assert "sizes=dict(channels=1536, state=16)" in str(layer.value)
    sized = ssmc.nn.SSMLayer(OPEN_SPEC, d_model=16, sizes=dict(channels=32, state=4))
    assert sized.d_inner == 32 and sized.d_state == 4


@pytest.mark.parametrize("text, message", [
    ("channels = 16, state = 4, rank = any", "rank cannot be left open"),
    ("channels = many, state = 4", "channels must be a number or 'any'"),
])
def test_what_may_be_left_open(text, message):
    from ssmc.errors import SpecError
    with pytest.raises(SpecError, match=message) as e:
        ssmc.parse(OPEN_SPEC.replace("channels = any, state = any", text))
    assert "^" in str(e.value)


def test_a_scalar_family_leaves_heads_open_not_channels():
    from ssmc.errors import SpecError
    spec = """
ssm OpenSSD {
  dims       heads = any, head_dim = 64, state = 128
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per head
  discretize exp_euler
  compute    chunked(64)
}
"""
    assert ssmc.parse(spec).family(None).dims.open == ("heads",)
    with pytest.raises(SpecError, match="sized by heads and head_dim"):
        ssmc.parse(spec.replace("heads = any", "heads = 4, channels = any"))
