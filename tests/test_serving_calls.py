"""The calls serving engines and mamba_ssm's own callers make, on every target, against the
float64 oracle called in the plain way (one state per row, each sequence on its own):

- the decode step on a pool of states picked by ``state_batch_indices``, with padded rows
  (``pad_slot_id``): the picked slots advance exactly as a plain step of those rows would, every
  other slot is untouched, a padded row's y is zero;
- a chunked prefill whose initial states come from a pool (``state_batch_indices``, a padded
  sequence starts from zeros), ``return_varlen_states`` (each packed sequence's final state) and
  mamba_ssm's ``final_states`` (each batch row's: the last packed sequence's);
- mamba_ssm's D of shape (h, p) for a family whose spec has D per head;
- a repeated call (same shapes, replayed validation) with new values gives the new result.
"""

import pytest
import torch

import ssmc
from conftest import ON_CUDA, TOL, rel_err, require_cuda_device, require_target_tools, target_device

require_cuda_device()

MAMBA2 = "examples/mamba2.ssm"
TARGETS = ["reference", "cpu", "c", "cuda"]


def _kernels(target, family):
    """(oracle, kernel) of a family of examples/mamba2.ssm, or of mamba1.ssm."""
    require_target_tools(target)
    spec, name = (MAMBA2, family) if family.startswith("Mamba2") else ("examples/mamba1.ssm", None)
    return (ssmc.compile(spec, target="reference", family=name),
            ssmc.compile(spec, target=target, family=name))


def _on(device, inputs):
    return {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


STEP_FAMILIES = {"mamba2": ("Mamba2Decode", dict(heads=4, groups=1)),
                 "mamba1": ("Mamba1", dict(channels=12))}


@pytest.mark.parametrize("which", sorted(STEP_FAMILIES))
@pytest.mark.parametrize("target", TARGETS)
def test_step_on_a_state_pool_with_padded_rows(target, which, seed):
    family, sizes = STEP_FAMILIES[which]
    oracle, kernel = _kernels(target, family)
    oracle, kernel = oracle.step, kernel.step
    inputs = oracle.example_inputs(batch=4, seed=seed, **sizes)
    gen = torch.Generator().manual_seed(seed)
    slots = 7
    pool = torch.randn((slots,) + tuple(inputs["state"].shape[1:]), generator=gen)
    index = torch.tensor([5, -1, 0, 3], dtype=torch.int32)          # row 1 is padding
    live = [0, 2, 3]

    # The oracle: a plain step of the live rows, each from its slot's state.
    plain = {k: (v[live] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 4
                 and k not in ("A", "D", "dt_bias") else v) for k, v in inputs.items()}
    plain["state"] = pool[index[live].long()].clone()
    y_live = oracle(**plain)
    expected = pool.clone()
    expected[index[live].long()] = plain["state"]

    device = target_device(target)
    call = _on(device, dict(inputs, state=pool, state_batch_indices=index))
    y = kernel(**call)
    got = call["state"].cpu()
    assert rel_err(got, expected) <= 4 * TOL["float32"]
    assert torch.equal(got[[1, 2, 4, 6]], pool[[1, 2, 4, 6]]), "a slot no row names changed"
    assert rel_err(y.cpu()[live], y_live) <= TOL["float32"]
    assert torch.count_nonzero(y.cpu()[1]) == 0, "a padded row's y is not zero"
    with pytest.raises(ssmc.CallError, match="state_batch_indices"):
        kernel(**_on(device, dict(inputs, state=pool, state_batch_indices=index[:3])))
    # The same slots as a strided view (a column of a table): the same result.
    table = torch.stack([index, torch.full_like(index, 6)], 1)
    strided = dict(_on(device, dict(inputs, state=pool)), state_batch_indices=table.to(device)[:, 0])
    assert strided["state_batch_indices"].stride(0) == 2
    y2 = kernel(**strided)
    assert rel_err(strided["state"].cpu(), expected) <= 4 * TOL["float32"]
    assert rel_err(y2.cpu()[live], y_live) <= TOL["float32"]
    if device == "cpu":
        with pytest.raises(ssmc.CallError, match="outside the pool of 7 slots"):
            kernel(**dict(inputs, state=pool, state_batch_indices=torch.tensor([5, -1, 7, 3])))


@pytest.mark.parametrize("target", TARGETS)
def test_chunked_prefill_from_a_pool_and_varlen_states(target, seed):
    oracle, kernel = _kernels(target, "Mamba2")
    lengths = [5, 0, 9, 4]
    inputs = oracle.example_inputs(seed=seed, varlen=lengths, heads=4, groups=1)
    gen = torch.Generator().manual_seed(seed)
    h, p, n = inputs["x"].shape[2], inputs["x"].shape[3], inputs["B"].shape[-1]
    pool = torch.randn(6, h, p, n, generator=gen)
    index = torch.tensor([4, 2, -1, 0])                  # the third sequence starts from zeros
    device = target_device(target)

    y, final, varlen = kernel(**_on(device, dict(inputs, initial_states=pool,
                                                  state_batch_indices=index)),
                              return_final_states=True, return_varlen_states=True)
    assert final.shape == (1, h, p, n) and varlen.shape == (4, h, p, n)

    # The oracle: each sequence alone, from its slot's state (zeros for the padded one).
    cu = [0, 5, 5, 14, 18]
    for k in range(4):
        a, b = cu[k], cu[k + 1]
        start = pool[index[k]] if index[k] >= 0 else torch.zeros(h, p, n)
        if a == b:
            assert rel_err(varlen[k].cpu(), start) <= TOL["float32"]
            continue
        alone = {key: (v[:, a:b].contiguous() if key in ("x", "dt", "B", "C", "z") else v)
                 for key, v in inputs.items() if key != "cu_seqlens"}
        y64, s64 = oracle(**dict(alone, initial_states=start[None].clone()),
                          return_final_states=True)
        assert rel_err(y.cpu()[:, a:b], y64) <= TOL["float32"], f"sequence {k}"
        assert rel_err(varlen[k].cpu(), s64[0]) <= 4 * TOL["float32"], f"sequence {k}"
    assert torch.equal(final.cpu()[0], varlen.cpu()[-1])

    # mamba_ssm's initial_states of one batch row with packed sequences: the first one's.
    y1, v1 = kernel(**_on(device, dict(inputs, initial_states=pool[:1])),
                    return_varlen_states=True)
    y2, v2 = kernel(**_on(device, dict(inputs, initial_states=pool[:1].expand(4, h, p, n)
                                       * torch.tensor([1.0, 0, 0, 0]).view(4, 1, 1, 1))),
                    return_varlen_states=True)
    assert rel_err(y1.cpu(), y2.cpu()) <= TOL["float32"]
    assert rel_err(v1.cpu(), v2.cpu()) <= TOL["float32"]


@pytest.mark.parametrize("conv", ["ssd", "step"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_whole_d_of_shape_h_p(target, conv, seed):
    """D (h, p) on a family whose spec says D per head: used elementwise, as mamba_ssm does."""
    oracle, kernel = _kernels(target, "Mamba2")
    if conv == "step":
        oracle, kernel = oracle.step, kernel.step
    inputs = oracle.example_inputs(batch=2, seqlen=7, seed=seed, heads=4, groups=1)
    h, p = inputs["x"].shape[-2:]
    D = torch.randn(h, p, generator=torch.Generator().manual_seed(seed))
    inputs["z"] = None            # the gate multiplies y + D x: without it the skip adds alone
    x = inputs["x"]
    without = _on("cpu", dict(inputs, D=None))
    y0 = oracle(**without)
    y0 = y0[0] if isinstance(y0, tuple) else y0
    expected = y0 + D * x if conv == "step" else y0 + D[None, None] * x
    call = _on(target_device(target), dict(inputs, D=D))
    y = kernel(**call)
    y = y[0] if isinstance(y, tuple) else y
    assert rel_err(y.cpu(), expected) <= TOL["float32"]


@pytest.mark.parametrize("which", sorted(STEP_FAMILIES))
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_a_repeated_call_is_replayed_with_the_new_values(target, which, seed):
    """The second call of a shape signature skips the checks and reuses the launch (the Triton
    step keeps one per signature), not the work: fresh values give fresh results, calls of
    another shape interleaved with it get their own, and a call that differs in shape is
    checked again."""
    family, sizes = STEP_FAMILIES[which]
    oracle, kernel = _kernels(target, family)
    oracle, kernel = oracle.step, kernel.step
    device = target_device(target)
    for k, batch in enumerate((3, 5, 3, 5, 3)):
        inputs = oracle.example_inputs(batch=batch, seed=seed + k, **sizes)
        expected_state = inputs["state"].clone()
        y64 = oracle(**dict(inputs, state=expected_state))
        call = _on(device, inputs)
        y = kernel(**call)
        assert rel_err(y.cpu(), y64) <= TOL["float32"], f"call {k}"
        assert rel_err(call["state"].cpu(), expected_state) <= 4 * TOL["float32"]
    bad = _on(device, oracle.example_inputs(batch=3, seed=seed, **sizes))
    bad["x"] = bad["x"][:2]
    with pytest.raises(ssmc.CallError, match="'x'|'state'"):
        kernel(**bad)


def test_varlen_states_need_packed_sequences():
    kernel = ssmc.compile(MAMBA2, target="reference", family="Mamba2")
    inputs = kernel.example_inputs(batch=2, seqlen=8)
    with pytest.raises(ssmc.CallError, match="return_varlen_states=True needs"):
        kernel(**inputs, return_varlen_states=True)


@pytest.mark.parametrize("target", ["reference", "cuda"])
def test_final_states_with_trailing_empty_sequences(target, seed):
    """Padding cu_seqlens with empty sequences (a CUDA graph's fixed count) keeps mamba_ssm's
    final_states: the state after the row's last token, not the empty sequence's zeros."""
    oracle, kernel = _kernels(target, "Mamba2")
    inputs = oracle.example_inputs(seed=seed, varlen=[5, 9, 0, 0], heads=4, groups=1)
    y, final, varlen = kernel(**_on(target_device(target), inputs), return_final_states=True,
                              return_varlen_states=True)
    assert torch.equal(final.cpu()[0], varlen.cpu()[1])
    assert torch.count_nonzero(varlen.cpu()[1]) > 0


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU (SSMC_TEST_CUDA=1)")
def test_decode_step_replays_in_a_cuda_graph(seed):
    """Captured once, replayed with new token values copied into the captured tensors: each
    replay advances the pool's picked slots as the oracle's plain step does, as a serving
    engine's graph runs decode (mamba_ssm's stride-0 (h, p) forms, a padded row)."""
    oracle, kernel = _kernels("cuda", "Mamba2")
    oracle, step = oracle.step, kernel.step
    gen = torch.Generator().manual_seed(seed)
    draw = lambda s: oracle.example_inputs(batch=4, seed=s, heads=4, groups=1)  # noqa: E731
    inputs = draw(seed)
    h, p, n = inputs["state"].shape[1:]
    pool = torch.randn(6, h, p, n, generator=gen)
    index = torch.tensor([2, 5, -1, 0])
    live = [0, 1, 3]
    static = _on("cuda", dict(inputs, state=pool, state_batch_indices=index))
    static.update(dt=static["dt"][..., None].expand(-1, -1, p),
                  A=static["A"][:, None, None].expand(-1, p, n),
                  D=static["D"][:, None].expand(-1, p),
                  dt_bias=static["dt_bias"][:, None].expand(-1, p))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(**static)                       # the first call of this signature: checked
    torch.cuda.current_stream().wait_stream(side)
    static["state"].copy_(pool)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step(**static)
    expected = pool.clone()
    for k in range(3):
        fresh = draw(seed + 1 + k)
        for name in ("x", "B", "C", "z"):
            static[name].copy_(fresh[name])
        static["dt"].select(2, 0).copy_(fresh["dt"])
        graph.replay()
        plain = {key: (v[live] if key in ("x", "dt", "B", "C", "z") else v)
                 for key, v in dict(inputs, **{m: fresh[m] for m in ("x", "dt", "B", "C", "z")}
                                    ).items() if key != "state"}
        plain["state"] = expected[index[live]].clone()
        y64 = oracle(**plain)
        expected[index[live]] = plain["state"]
        torch.cuda.synchronize()
        assert rel_err(y.cpu()[live], y64) <= TOL["float32"], f"replay {k}"
        assert rel_err(static["state"].cpu(), expected) <= 4 * TOL["float32"], f"replay {k}"
        assert torch.count_nonzero(y.cpu()[2]) == 0
