"""Layer and model inputs are checked like kernel calls: a hidden, tokens or state that does not
fit raises ``CallError`` naming the argument and its expected shape, before anything runs, and
the checks read shapes, dtypes and devices only (never tensor values)."""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from families import mamba1, mamba2, s5
from ssmc.errors import CallError
from ssmc.ir import AttentionBlock, MLPBlock, ModelSpec, MoEBlock, SSMBlock
from ssmc.runtime.models import MLP, Attention, KVCache, Model, ModelState, MoE
from ssmc.runtime.modules import SSMLayer, SSMState, check_input

D_MODEL = 8
# Mamba-1 (b, d, n) states, Mamba-2 (b, h, p, n), S5 complex64 (b, d, n).
LAYER_FAMILIES = {
    "mamba1": (mamba1(channels=8, state=4), "(batch, channels, state) = ({b}, 8, 4)"),
    "mamba2": (mamba2(heads=2, head_dim=4, state=4, chunk=4),
               "(batch, heads, head_dim, state) = ({b}, 2, 4, 4)"),
    "s5_complex": (s5(channels=8, state=4), "(batch, channels, state) = ({b}, 8, 4)"),
}


def raises(*fragments):
    """pytest.raises(CallError) whose message holds every fragment, verbatim."""
    return pytest.raises(CallError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})"
                                                            for f in fragments))


@pytest.fixture(params=list(LAYER_FAMILIES), scope="module")
def layer_case(request):
    fam, ssm_form = LAYER_FAMILIES[request.param]
    torch.manual_seed(0)
    return SSMLayer(fam, d_model=D_MODEL, target="reference"), ssm_form


class CountCalls:
    """Counts calls into a layer's in_proj: a check that fires first leaves it at 0."""

    def __init__(self, layer):
        self.calls = 0
        self.handle = layer.in_proj.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# SSMLayer: hidden

FORWARD = "expected (batch, seqlen, d_model) = (batch, seqlen, 8)"
STEP = "expected (batch, d_model) = (batch, 8)"


@pytest.mark.parametrize("shape,expected,detail", [
    ((2, 16, 32), FORWARD, "dim 2 (d_model) is 32, expected 8"),
    ((2, 8), FORWARD, "2 dims instead of 3"),
    ((1, 2, 5, 8), FORWARD, "4 dims instead of 3"),
], ids=["d_model", "rank2", "rank4"])
def test_forward_hidden_of_the_wrong_shape(layer_case, shape, expected, detail):
    layer, _ = layer_case
    with CountCalls(layer) as count, raises(f"argument 'hidden' has shape {shape}; {expected}",
                                            detail):
        layer(torch.randn(shape))
    assert count.calls == 0


@pytest.mark.parametrize("shape,detail", [
    ((2, 6), "dim 1 (d_model) is 6, expected 8"),
    ((2, 1, 8), "3 dims instead of 2"),
], ids=["d_model", "rank3"])
def test_step_hidden_of_the_wrong_shape(layer_case, shape, detail):
    layer, _ = layer_case
    state = layer.allocate_state(2)
    conv_before, ssm_before = state.conv.clone(), state.ssm.clone()
    with CountCalls(layer) as count, raises(f"argument 'hidden' has shape {shape}; {STEP}",
                                            detail, "goes through forward(hidden, state)"):
        layer.step(torch.randn(shape), state)
    assert count.calls == 0
    assert torch.equal(state.conv, conv_before) and torch.equal(state.ssm, ssm_before)


def test_a_2d_hidden_points_forward_callers_to_step(layer_case):
    layer, _ = layer_case
    with raises("argument 'hidden' has shape (2, 8)", "goes through step(hidden, state)"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("method", ["forward", "step"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_hidden_of_another_dtype(layer_case, method, dtype):
    layer, _ = layer_case
    shape = (2, 3, D_MODEL) if method == "forward" else (2, D_MODEL)
    hidden = torch.zeros(shape, dtype=dtype)
    args = (hidden,) if method == "forward" else (hidden, layer.allocate_state(2))
    name = str(dtype).replace("torch.", "")
    with CountCalls(layer) as count, raises(
            f"argument 'hidden' has dtype {name}; expected float32, the dtype of the layer's "
            "parameters", "convert it with hidden.to(torch.float32)"):
        getattr(layer, method)(*args)
    assert count.calls == 0


def test_hidden_dtype_follows_the_parameters():
    layer = SSMLayer(mamba2(heads=2, head_dim=4, state=4, chunk=4), d_model=D_MODEL,
                     dtype=torch.bfloat16)
    with raises("argument 'hidden' has dtype float32; expected bfloat16",
                "hidden.to(torch.bfloat16)"):
        layer(torch.randn(2, 3, D_MODEL))
    with torch.no_grad():
        assert layer(torch.randn(2, 3, D_MODEL, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_autocast_dtype_is_accepted(layer_case):
    """Inside torch.autocast a layer of fp32 parameters runs on the autocast dtype, as before."""
    layer, _ = layer_case
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, D_MODEL, dtype=torch.bfloat16))
    assert out.shape == (2, 3, D_MODEL)
    with raises("argument 'hidden' has dtype float16; expected float32"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 3, D_MODEL, dtype=torch.float16))


@pytest.mark.parametrize("method", ["forward", "step"])
def test_hidden_on_another_device(layer_case, method):
    layer, _ = layer_case
    shape = (2, 3, D_MODEL) if method == "forward" else (2, D_MODEL)
    hidden = torch.empty(shape, device="meta")
    args = (hidden,) if method == "forward" else (hidden, layer.allocate_state(2))
    with raises("argument 'hidden' is on meta but the layer's parameters are on cpu",
                "hidden.to('cpu')"):
        getattr(layer, method)(*args)


def test_hidden_that_is_not_a_tensor(layer_case):
    layer, _ = layer_case
    with raises("argument 'hidden' must be a torch tensor, got list"):
        layer([[0.0] * D_MODEL])


# --------------------------------------------------------------------------------------------
# SSMLayer: state

@pytest.mark.parametrize("method", ["forward", "step"])
def test_state_of_another_batch_blames_the_state(layer_case, method):
    layer, ssm_form = layer_case
    hidden = torch.randn((2, 3, D_MODEL) if method == "forward" else (2, D_MODEL))
    state = layer.allocate_state(3)
    ssm_before = state.ssm.clone()
    shape = tuple(state.ssm.shape)
    with CountCalls(layer) as count, raises(
            f"argument 'state' (state.ssm) has shape {shape}; expected "
            + ssm_form.format(b=2), "dim 0 (batch) is 3, expected 2 (the batch of 'hidden')"):
        getattr(layer, method)(hidden, state)
    assert count.calls == 0 and torch.equal(state.ssm, ssm_before)


def test_state_of_another_layer(layer_case):
    """A state allocated by a layer of other sizes: the first dim that differs is named."""
    layer, ssm_form = layer_case
    other = SSMLayer(mamba1(channels=8, state=2), d_model=D_MODEL)
    state = other.allocate_state(2)
    detail = "3 dims instead of 4" if layer.is_ssd else "dim 2 (state) is 2, expected 4"
    with raises(f"argument 'state' (state.ssm) has shape {tuple(state.ssm.shape)}; expected "
                + ssm_form.format(b=2), detail):
        layer.step(torch.randn(2, D_MODEL), state)


def test_conv_state_of_the_wrong_width(layer_case):
    layer, _ = layer_case
    state = layer.allocate_state(2)
    state.conv = torch.zeros(2, layer.conv_dim, layer.d_conv + 1)
    with raises(f"argument 'state' (state.conv) has shape (2, {layer.conv_dim}, 5); expected "
                f"(batch, conv_dim, d_conv) = (2, {layer.conv_dim}, 4)",
                "dim 2 (d_conv) is 5, expected 4"):
        layer(torch.randn(2, 3, D_MODEL), state)


def test_state_of_the_wrong_dtype(layer_case):
    layer, _ = layer_case
    state = layer.allocate_state(2)
    want = "complex64" if layer.is_complex else "float32"
    state.ssm = state.ssm.to(torch.complex128 if layer.is_complex else torch.float64)
    got = "complex128" if layer.is_complex else "float64"
    with raises(f"argument 'state' (state.ssm) has dtype {got}; expected {want}",
                f"state.ssm.to(torch.{want})"):
        layer.step(torch.randn(2, D_MODEL), state)
    state = layer.allocate_state(2)
    state.conv = state.conv.to(torch.int32)
    with raises("argument 'state' (state.conv) has dtype int32; expected float32"):
        layer(torch.randn(2, 3, D_MODEL), state)


def test_state_on_another_device(layer_case):
    layer, _ = layer_case
    state = layer.allocate_state(2, device="meta")
    with raises("argument 'state' (state.ssm) is on meta but the layer's parameters are on cpu"):
        layer.step(torch.randn(2, D_MODEL), state)


def test_step_needs_an_ssm_state(layer_case):
    layer, _ = layer_case
    with raises("argument 'state' is missing; expected an SSMState of batch 2", "allocate_state"):
        layer.step(torch.randn(2, D_MODEL), None)
    with raises("argument 'state' is a dict; expected an SSMState of batch 2"):
        layer(torch.randn(2, 3, D_MODEL), {"ssm": None})


def test_state_with_a_missing_tensor(layer_case):
    layer, _ = layer_case
    state = SSMState(layer.allocate_state(2).conv, None)
    with raises("argument 'state' (state.ssm) must be a torch tensor, got NoneType"):
        layer.step(torch.randn(2, D_MODEL), state)


def test_compiled_layer_raises_the_same_error():
    """Under torch.compile (graph breaks allowed) a bad input still gets the CallError;
    test_runtime_ops checks fullgraph=True over valid inputs."""
    layer = SSMLayer(mamba2(heads=2, head_dim=4, state=4, chunk=4), d_model=D_MODEL)
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        assert compiled(torch.randn(2, 3, D_MODEL)).shape == (2, 3, D_MODEL)
        with raises("argument 'hidden' has shape (2, 3, 6); " + FORWARD):
            compiled(torch.randn(2, 3, 6))


def test_valid_inputs_still_run(layer_case):
    layer, _ = layer_case
    state = layer.allocate_state(2)
    with torch.no_grad():
        assert layer(torch.randn(2, 3, D_MODEL), state).shape == (2, 3, D_MODEL)
        assert layer.step(torch.randn(2, D_MODEL), state).shape == (2, D_MODEL)


# --------------------------------------------------------------------------------------------
# The checks read no tensor values (no sync; CUDA-graph friendly)

class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_checks_run_no_tensor_ops(layer_case):
    layer, _ = layer_case
    hidden, step_hidden = torch.randn(2, 3, D_MODEL), torch.randn(2, D_MODEL)
    state = layer.allocate_state(2)
    model = _model()
    tokens, model_state = torch.randint(0, 20, (2, 4)), model.allocate_state(2)
    next_tokens = tokens[:, 0]
    with RecordOps() as record:
        layer._check(hidden, state, step=False)
        layer._check(step_hidden, state, step=True)
        model._check(tokens, model_state, step=False)
        model._check(next_tokens, model_state, step=True)
        check_input("x", hidden, (("batch", 2), ("seqlen", None), ("d_model", 8)),
                    torch.float32, torch.device("cpu"))
    assert record.ops == []


def test_check_input_names_where_a_size_comes_from():
    dims = (("batch", 4, "the batch of 'x'"), ("width", None), ("n", 3))
    with raises("argument 'y' (y.k) has shape (2, 5, 3); expected (batch, width, n) = "
                "(4, width, 3)",
                "dim 0 (batch) is 2, expected 4 (the batch of 'x')"):
        check_input("y", torch.zeros(2, 5, 3), dims, field="k")
    with raises("argument 'y' has shape (3,); expected (n,) = (2,)"):
        check_input("y", torch.zeros(3), (("n", 2),))


# --------------------------------------------------------------------------------------------
# Model

M2 = mamba2(heads=2, head_dim=4, state=4, chunk=4, name="M2")
M1 = mamba1(channels=16, state=4, name="M1")
TINY = ModelSpec("Tiny", d_model=D_MODEL, vocab=20, layout=(
    SSMBlock("M2"), AttentionBlock(heads=2, kv_heads=1), MoEBlock(experts=3, top_k=2, hidden=8),
    SSMBlock("M1"), MLPBlock(hidden=8)))
_MODEL = []


def _model():
    if not _MODEL:
        torch.manual_seed(0)
        _MODEL.append(Model(TINY, target="reference", families=[M1, M2]).eval())
    return _MODEL[0]


@pytest.mark.parametrize("shape,detail", [((5,), "1 dims instead of 2"),
                                          ((2, 5, 1), "3 dims instead of 2")],
                         ids=["rank1", "rank3"])
def test_model_forward_tokens_of_the_wrong_rank(shape, detail):
    with raises(f"argument 'tokens' has shape {shape}; expected (batch, seqlen) = "
                "(batch, seqlen)", detail, "step(tokens, state)"):
        _model()(torch.zeros(shape, dtype=torch.long))


def test_model_step_tokens_of_the_wrong_rank():
    model = _model()
    with raises("argument 'tokens' has shape (2, 1); expected (batch,) = (batch,)",
                "forward(tokens, state)"):
        model.step(torch.zeros(2, 1, dtype=torch.long), model.allocate_state(2))


@pytest.mark.parametrize("method", ["forward", "step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_model_tokens_must_be_integer_ids(method, dtype):
    model = _model()
    tokens = torch.zeros((2, 4) if method == "forward" else (2,), dtype=dtype)
    args = (tokens,) if method == "forward" else (tokens, model.allocate_state(2))
    name = str(dtype).replace("torch.", "")
    with raises(f"argument 'tokens' has dtype {name}; expected int64 or int32 (token ids)",
                "tokens.to(torch.int64)"):
        getattr(model, method)(*args)


def test_generate_checks_the_prompt():
    with raises("argument 'tokens' has dtype float32; expected int64 or int32 (token ids)"):
        _model().generate(torch.zeros(1, 3), max_new_tokens=2)


def test_model_int32_tokens_run():
    model = _model()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, dtype=torch.int32)).shape == (1, 3, 20)


@pytest.mark.parametrize("method", ["forward", "step"])
def test_model_tokens_on_another_device(method):
    model = _model()
    tokens = torch.zeros((2, 4) if method == "forward" else (2,), dtype=torch.long, device="meta")
    args = (tokens,) if method == "forward" else (tokens, model.allocate_state(2))
    with raises("argument 'tokens' is on meta but the model's parameters are on cpu"):
        getattr(model, method)(*args)


@pytest.mark.parametrize("method", ["forward", "step"])
def test_model_state_of_another_batch_blames_the_state(method):
    model = _model()
    tokens = torch.zeros((2, 4) if method == "forward" else (2,), dtype=torch.long)
    state = model.allocate_state(3)
    with raises("argument 'state' holds batch 3; expected batch = 2 (the batch of 'tokens')",
                "allocate_state(2)"):
        getattr(model, method)(tokens, state)
    assert state.position == 0


def test_model_state_of_another_model_or_kind():
    model = _model()
    tokens = torch.zeros(2, dtype=torch.long)
    short = model.allocate_state(2)
    short.layers = short.layers[:3]
    with raises("argument 'state' holds 3 layer states; expected layers = 5 "
                "(one per layer of Tiny)"):
        model.step(tokens, short)
    with raises("argument 'state' is missing; expected a ModelState of batch 2"):
        model.step(tokens, None)
    layer_state = model.layers[0].mixer.allocate_state(2)
    with raises("argument 'state' is a SSMState; expected a ModelState of batch 2"):
        model(tokens[:, None], layer_state)


def test_model_layer_states_are_checked_by_their_layers():
    """A ModelState without a batch (hand-made): the first layer names its part of the state."""
    model = _model()
    state = model.allocate_state(3)
    state = ModelState(state.layers)          # batch 0: unknown
    with raises("argument 'state' (state.ssm) has shape (3, 2, 4, 4); expected "
                "(batch, heads, head_dim, state) = (2, 2, 4, 4)"):
        model.step(torch.zeros(2, dtype=torch.long), state)


# --------------------------------------------------------------------------------------------
# Attention, MLP, MoE

def _mixers():
    torch.manual_seed(0)
    return {"attention": Attention(D_MODEL, 2, 1), "mlp": MLP(D_MODEL, 12),
            "moe": MoE(D_MODEL, experts=3, top_k=2, hidden=12)}


MIXERS = _mixers()




@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("method,shape,detail", [
    ("forward", (2, 3, 6), "dim 2 (d_model) is 6, expected 8"),
    ("forward", (2, 8), "2 dims instead of 3"),
    ("step", (2, 6), "dim 1 (d_model) is 6, expected 8"),
    ("step", (2, 1, 8), "3 dims instead of 2"),
], ids=["forward_d_model", "forward_rank", "step_d_model", "step_rank"])
def test_mixer_input_of_the_wrong_shape(name, method, shape, detail):
    mixer = MIXERS[name]
    expected = FORWARD if method == "forward" else STEP
    with raises(f"argument 'x' has shape {shape}; {expected}", detail):
        getattr(mixer, method)(torch.randn(shape), mixer.allocate_state(2))


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("method", ["forward", "step"])
def test_mixer_input_of_another_dtype_or_device(name, method):
    mixer = MIXERS[name]
    shape = (2, 3, D_MODEL) if method == "forward" else (2, D_MODEL)
    with raises("argument 'x' has dtype float64; expected float32, the dtype of the layer's "
                "parameters", "x.to(torch.float32)"):
        getattr(mixer, method)(torch.randn(shape, dtype=torch.float64), mixer.allocate_state(2))
    with raises("argument 'x' is on meta but the layer's parameters are on cpu"):
        getattr(mixer, method)(torch.empty(shape, device="meta"), mixer.allocate_state(2))


@pytest.mark.parametrize("method", ["forward", "step"])
def test_attention_cache_of_another_batch_blames_the_cache(method):
    attn = MIXERS["attention"]
    cache = attn.allocate_state(3, capacity=16)
    x = torch.randn((2, 3, D_MODEL) if method == "forward" else (2, D_MODEL))
    with raises("argument 'cache' (cache.k) has shape (3, 1, 16, 4); expected "
                "(batch, kv_heads, capacity, head_dim) = (2, 1, capacity, 4)",
                "dim 0 (batch) is 3, expected 2 (the batch of 'x')"):
        getattr(attn, method)(x, cache)
    assert cache.length == 0


def test_attention_step_needs_a_cache():
    attn = MIXERS["attention"]
    with raises("argument 'cache' is missing; expected a KVCache of batch 2"):
        attn.step(torch.randn(2, D_MODEL), None)
    cache = KVCache(2, 2, 4, 8, None, "cpu", torch.float32)   # 2 kv heads; the layer has 1
    with raises("argument 'cache' (cache.k) has shape (2, 2, 8, 4)",
                "dim 1 (kv_heads) is 2, expected 1"):
        attn.step(torch.randn(2, D_MODEL), cache)


def test_moe_step_equals_forward_of_one_token():
    moe = MIXERS["moe"]
    x = torch.randn(4, D_MODEL)
    with torch.no_grad():
        assert torch.allclose(moe.step(x), moe(x[:, None])[:, 0], atol=1e-6)
