"""Compiled kernels as torch custom ops: same results, correct fake implementations, and layers
that compile under torch.compile(fullgraph=True)."""
import pytest
import torch

import ssmc
from conftest import assert_rel_close
from families import mamba1, mamba2
from ssmc.runtime.modules import SSMLayer
from ssmc.runtime.ops import as_op, get_op, op_name

SSD = mamba2(heads=2, head_dim=4, state=4, chunk=4)
SCAN = mamba1(channels=8, state=4)


def _kernel(family):
    return ssmc.compile(family, target="reference")


@pytest.mark.parametrize("family", [SSD, SCAN], ids=["ssd", "selective_scan"])
def test_op_returns_what_the_kernel_returns(family, seed):
    kernel = _kernel(family)
    fn = as_op(kernel)
    inputs = kernel.example_inputs(batch=2, seqlen=9, seed=seed)
    y_ref, state_ref = kernel(**inputs, **{_flag(family): True})
    y, state = fn(**inputs, **{_flag(family): True})
    assert_rel_close("y", y, y_ref, "float32", tol=0)
    assert_rel_close("final state", state, state_ref, "float32", tol=0)
    assert_rel_close("y alone", fn(**inputs), y_ref, "float32", tol=0)


def _flag(family):
    return "return_final_states" if family is SSD else "return_last_state"


@pytest.mark.parametrize("family", [SSD, SCAN], ids=["ssd", "selective_scan"])
def test_step_op_updates_the_state_in_place(family, seed):
    step = _kernel(family).step
    fn = as_op(step)
    inputs = step.example_inputs(batch=3, seed=seed)
    expected_state = inputs["state"].clone()
    expected_y = step(**dict(inputs, state=expected_state))
    y = fn(**inputs)
    assert_rel_close("y", y, expected_y, "float32", tol=0)
    assert_rel_close("state", inputs["state"], expected_state, "float32", tol=0)


@pytest.mark.parametrize("family", [SSD, SCAN], ids=["ssd", "selective_scan"])
def test_fake_implementations_agree_with_the_kernels(family, seed):
    """opcheck runs the op under fake tensors and AOT dispatch and compares with the real one."""
    kernel = _kernel(family)
    op = get_op(kernel)
    inputs = kernel.example_inputs(batch=2, seqlen=5, seed=seed)
    from ssmc.runtime.ops import ARGUMENT_NAMES
    for wants_state in (False, True):
        call = dict(inputs, **{_flag(family): wants_state})
        args = tuple(call.get(name) for name in ARGUMENT_NAMES[kernel.convention])
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                     "test_aot_dispatch_static"))
    step = kernel.step
    step_inputs = step.example_inputs(batch=2, seed=seed)
    args = tuple(step_inputs.get(name) for name in ARGUMENT_NAMES[step.convention])
    torch.library.opcheck(get_op(step), args, test_utils=("test_schema", "test_faketensor"))


def test_one_op_per_kernel_identity():
    a, b = _kernel(SSD), _kernel(SSD)
    assert op_name(a) == op_name(b)
    assert get_op(a) is get_op(b)
    assert op_name(a) != op_name(a.step)
    assert op_name(a).startswith("Mamba2_chunked_reference_")


@pytest.mark.parametrize("family", [SSD, SCAN], ids=["mamba2_block", "mamba1_block"])
def test_layer_compiles_fullgraph(family, seed):
    torch.manual_seed(seed)
    layer = SSMLayer(family, d_model=8)
    hidden = torch.randn(2, 6, 8)
    with torch.no_grad():
        eager = layer(hidden)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert_rel_close("compiled forward", compiled(hidden), eager, "float32")

        state_eager, state_compiled = layer.allocate_state(2), layer.allocate_state(2)
        step = torch.compile(layer.step, fullgraph=True, backend="aot_eager")
        for t in range(3):
            want = layer.step(hidden[:, t], state_eager)
            got = step(hidden[:, t], state_compiled)
            assert_rel_close(f"compiled step {t}", got, want, "float32")
        assert_rel_close("state after compiled steps", state_compiled.ssm, state_eager.ssm, "float32")
        assert_rel_close("conv state", state_compiled.conv, state_eager.conv, "float32")


def test_a_layer_calling_the_kernel_itself_compiles_fullgraph(seed):
    """The oracle's numpy cannot be traced; a layer that calls the compiled callable directly
    (not through as_op) still compiles in fullgraph mode, since the callable under dynamo is
    its op."""
    torch.manual_seed(seed)
    layer = SSMLayer(SCAN, d_model=8, use_custom_op=False)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        eager = layer(x)
        got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert_rel_close("y", got, eager, "float32")


def test_hybrid_model_compiles_fullgraph(seed):
    from ssmc.ir import AttentionBlock, MLPBlock, ModelSpec, MoEBlock, SSMBlock
    from ssmc.runtime.models import Model
    spec = ModelSpec("Hybrid", d_model=8, vocab=20, layout=(
        SSMBlock("Mamba2"), AttentionBlock(heads=2, kv_heads=1), MoEBlock(experts=3, top_k=2, hidden=8),
        SSMBlock("Mamba1"), AttentionBlock(heads=2, kv_heads=2, window=2), MLPBlock(hidden=8)))
    torch.manual_seed(seed)
    model = Model(spec, target="reference", families=[SSD, SCAN]).eval()
    tokens = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        eager = model(tokens)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(tokens)
    assert_rel_close("compiled hybrid model", compiled, eager, "float32")


def test_op_schemas_and_wrappers_are_read_off_the_problem_dataclasses():
    """One statement of each convention's arguments (ssmc/problems.py): the op schema lists
    them in order with their optionality, and the wrapper takes exactly them."""
    import dataclasses
    import inspect
    from ssmc.ir import Convention
    from ssmc.problems import PROBLEMS
    from ssmc.runtime.ops import schema_of
    for convention, problem in PROBLEMS.items():
        schema = schema_of(convention)
        listed = [part.split()[-1] for part in schema.split(") ->")[0].strip("(").split(", ")]
        assert listed == list(problem.argument_names())
        for f in dataclasses.fields(problem):
            if f.name in listed:
                optional = f.default is not dataclasses.MISSING
                assert (f"? {f.name}," in schema or f"? {f.name})" in schema) == optional, f.name
    assert "Tensor(a!) state" in schema_of(Convention.STATE_UPDATE)
    fn = as_op(_kernel(SCAN))
    assert list(inspect.signature(fn).parameters) == list(PROBLEMS[Convention.SELECTIVE_SCAN]
                                                          .argument_names())
    with pytest.raises(ssmc.CallError, match="unexpected keyword argument 'delta_bias_'"):
        fn(**_kernel(SCAN).example_inputs(batch=1, seqlen=3), delta_bias_=None)


@pytest.mark.parametrize("family", [SSD, SCAN], ids=["ssd", "selective_scan"])
def test_code_calling_a_compiled_callable_compiles_fullgraph(family, seed):
    """torch.compile over user code that calls ``ssmc.compile(...)``'s callable itself (not an
    nn layer): the call is traced as the registered op, and gives the eager result."""
    kernel = _kernel(family)
    step = kernel.step
    inputs = kernel.example_inputs(batch=2, seqlen=9, seed=seed)
    step_inputs = step.example_inputs(batch=2, seed=seed)

    def block(inputs, step_inputs):
        y, final = kernel(**inputs, **{_flag(family): True})
        out = step(**step_inputs)
        return y * 2.0, final, out + 1.0

    eager_state = step_inputs["state"].clone()
    expected = block(inputs, dict(step_inputs, state=eager_state))
    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(inputs, step_inputs)
    for a, b in zip(got, expected):
        assert_rel_close("output", a, b, "float32", tol=0)
    assert_rel_close("state", step_inputs["state"], eager_state, "float32", tol=0)


def test_varlen_states_through_the_op(seed):
    kernel = _kernel(SSD)
    inputs = kernel.example_inputs(varlen=[3, 6], seed=seed)
    y, final, varlen = kernel(**inputs, return_final_states=True, return_varlen_states=True)
    y2, final2, varlen2 = as_op(kernel)(**inputs, return_final_states=True,
                                       return_varlen_states=True)
    assert final.shape[0] == 1 and varlen.shape[0] == 2
    for a, b in ((y, y2), (final, final2), (varlen, varlen2)):
        assert_rel_close("output", b, a, "float32", tol=0)
    compiled = torch.compile(lambda kw: kernel(**kw, return_varlen_states=True),
                             fullgraph=True, backend="aot_eager")
    y3, varlen3 = compiled(inputs)
    assert_rel_close("varlen states", varlen3, varlen, "float32", tol=0)
