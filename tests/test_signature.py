"""ssmc.signature: every malformed call raises CallError naming the argument, before anything
runs; valid calls (positional like mamba_ssm, keyword, numpy) normalize to one Problem."""
from __future__ import annotations

import math

import pytest
import torch

import families as F
from ssmc.errors import CallError
from ssmc.ir import Convention, Method, Sharing
from ssmc.signature import (SelectiveScanProblem, SSDProblem, StateUpdateProblem, bind, resized,
                            sizes_from_shapes,
                            example_inputs)

ALL_FAMILIES = [F.mamba1(), F.mamba2(), F.s4d(), F.s5(), F.s4_dplr(), F.dense(),
                F.dense(selective=False), F.mamba1(selective_A=True), F.mamba2(selective_A=True),
                F.s4d(complex_a=True), F.mamba2(groups=2, D=Sharing.HEAD_DIM, clamp=(1e-3, 0.1)),
                F.mamba1(groups=4, selective_B=False, selective_C=True)]


def raises(family, conv, name, kwargs, *fragments, args=()):
    """bind raises CallError whose message names ``name`` (and holds each fragment)."""
    with pytest.raises(CallError) as info:
        bind(family, conv, args, kwargs)
    text = str(info.value)
    assert f"'{name}'" in text or f"{name}=" in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def ssd_kw(seed=0, **over):
    kw = example_inputs(F.mamba2(), "ssd", 2, 10, seed=seed)
    kw.update(over)
    return kw


def scan_kw(family=None, seed=0, **over):
    kw = example_inputs(family or F.mamba1(), "selective_scan", 2, 10, seed=seed)
    kw.update(over)
    return kw


# --------------------------------------------------------------------------------------------
# Valid calls

def test_positional_call_like_mamba_ssm(seed):
    fam = F.mamba2()
    kw = ssd_kw(seed)
    p = bind(fam, "ssd", (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 16, kw["D"], kw["z"],
                          kw["dt_bias"]), {"dt_softplus": True})
    assert isinstance(p, SSDProblem) and p.convention is Convention.SSD
    assert p.x is kw["x"] and p.chunk_size == 16 and p.dt_softplus is True
    assert p.dt_limit == (0.0, math.inf) and p.cu_seqlens is None and p.seq_idx is None
    assert (p.batch, p.seqlen, p.heads, p.head_dim, p.state_size, p.groups) == (2, 10, 4, 8, 16, 1)
    assert p.nseq == 2 and not p.return_final_states


def test_defaults_come_from_the_spec():
    fam = F.mamba2(chunk=32, clamp=(0.001, 0.1))
    p = bind(fam, "ssd", (), example_inputs(fam, "ssd", 1, 5))
    assert p.chunk_size == 32 and p.dt_softplus is True and p.dt_limit == (0.001, 0.1)
    fam1 = F.mamba1(softplus=False, bias=False)
    p = bind(fam1, "selective_scan", (), example_inputs(fam1, None, 1, 5))
    assert isinstance(p, SelectiveScanProblem) and p.delta_softplus is False


def test_selective_scan_bc_without_group_axis_is_normalized(seed):
    kw = scan_kw(seed=seed)
    kw["B"], kw["C"] = kw["B"][:, 0], kw["C"][:, 0]
    p = bind(F.mamba1(), "selective_scan", (), kw)
    assert p.B.shape == (2, 1, 8, 10) and p.C.shape == (2, 1, 8, 10)


def test_numpy_inputs_are_accepted(seed):
    kw = ssd_kw(seed)
    as_np = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    p = bind(F.mamba2(), "ssd", (), as_np)
    assert isinstance(p.x, torch.Tensor) and torch.equal(p.x, kw["x"])


@pytest.mark.parametrize("family", ALL_FAMILIES, ids=lambda f: f.name)
def test_example_inputs_bind_for_every_family_and_convention(family, seed):
    for conv in (family.convention, Convention.STATE_UPDATE):
        for dtype in ("float32", "bfloat16"):
            kw = example_inputs(family, conv, 2, 7, dtype=dtype, seed=seed, with_state=True)
            p = bind(family, conv, (), kw)
            assert p.convention is conv and p.batch == 2 and p.dtype == getattr(torch, dtype)
    kw = example_inputs(family, family.convention, 1, 0, seed=seed, varlen=[3, 1, 4],
                        with_state=True)
    p = bind(family, family.convention, (), kw)
    assert p.varlen and p.nseq == 3 and p.seq_offsets == (0, 3, 4, 8)
    assert p.cu_seqlens.dtype == torch.int64


@pytest.mark.parametrize("family", ALL_FAMILIES[:6], ids=lambda f: f.name)
def test_example_inputs_reproducible_from_seed(family, seed):
    a = example_inputs(family, None, 2, 9, seed=seed, with_state=True)
    b = example_inputs(family, None, 2, 9, seed=seed, with_state=True)
    c = example_inputs(family, None, 2, 9, seed=seed + 1, with_state=True)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    assert not all(torch.equal(a[k], c[k]) for k in tensors)


def test_example_inputs_follow_mamba_initialization(seed):
    fam = F.mamba2(clamp=None)
    kw = example_inputs(fam, "ssd", 4, 64, seed=seed)
    delta = torch.nn.functional.softplus(kw["dt"] + kw["dt_bias"])
    assert 0.99e-3 <= float(delta.min()) and float(delta.max()) <= 0.101
    assert float(kw["A"].max()) <= -1.0 and float(kw["A"].min()) >= -16.0
    m1 = example_inputs(F.mamba1(state=8), None, 1, 4, seed=seed)["A"]
    ratio = -m1 / torch.arange(1, 9)   # A = -(1..n) up to a small jitter
    assert float((ratio.log()).abs().max()) < 0.6
    s5 = example_inputs(F.s5(), None, 1, 4, seed=seed)["A"]
    assert s5.is_complex() and float(s5.real.max()) < 0


def test_varlen_seq_idx_and_cu_seqlens_derive_each_other(seed):
    fam = F.mamba2()
    kw = example_inputs(fam, "ssd", 1, 0, seed=seed, varlen=[2, 0, 3])
    p = bind(fam, "ssd", (), kw)
    assert p.seq_idx.dtype == torch.int32 and p.seq_idx.tolist() == [[0, 0, 2, 2, 2]]
    del kw["cu_seqlens"]
    q = bind(fam, "ssd", (), dict(kw, seq_idx=torch.tensor([[0, 0, 2, 2, 2]])))
    assert q.cu_seqlens.tolist() == [0, 2, 2, 5] and q.nseq == 3
    r = bind(fam, "ssd", (), dict(kw, seq_idx=p.seq_idx, cu_seqlens=p.cu_seqlens.to(torch.int32)))
    assert r.cu_seqlens.tolist() == [0, 2, 2, 5]


def test_step_expanded_forms_are_broadcasts(seed):
    fam = F.mamba2(heads=3, head_dim=4, state=5, D=Sharing.HEAD)
    kw = example_inputs(fam, "state_update", 2, 0, seed=seed)
    expanded = dict(kw, dt=kw["dt"][..., None].expand(2, 3, 4),
                    A=kw["A"][:, None, None].expand(3, 4, 5),
                    dt_bias=kw["dt_bias"][:, None].expand(3, 4).contiguous(),  # stride != 0
                    D=kw["D"][:, None].expand(3, 4))
    p = bind(fam, "state_update", (), expanded)
    assert isinstance(p, StateUpdateProblem)
    for k in ("dt", "A", "dt_bias", "D"):
        assert torch.equal(getattr(p, k), kw[k]), k
    assert p.family.D.sharing is Sharing.HEAD
    varying = kw["A"][:, None, None].expand(3, 4, 5).clone()
    varying[0, 1, 0] += 1.0
    raises(fam, "state_update", "A", dict(kw, A=varying), "varies along head_dim",
           "A is scalar per head")
    dt = kw["dt"][..., None].expand(2, 3, 4).clone()
    dt[1, 2, 3] = 0.0
    raises(fam, "state_update", "dt", dict(kw, dt=dt), "varies along head_dim")


def test_a_whole_d_of_shape_h_p_runs_the_family_with_d_per_head_dim(seed):
    """mamba_ssm takes D as (h,) or (h, p) for any Mamba-2: a (h, p) D that is not a broadcast
    is used whole (the family with D per head x head_dim), in the chunked form and the step."""
    fam = F.mamba2(heads=3, head_dim=4, state=5, D=Sharing.HEAD)
    for conv, length in (("ssd", 6), ("state_update", 0)):
        kw = example_inputs(fam, conv, 2, length, seed=seed)
        full = torch.randn(3, 4)
        p = bind(fam, conv, (), dict(kw, D=full))
        assert p.family.D.sharing is Sharing.HEAD_DIM and torch.equal(p.D, full)
        same = bind(fam, conv, (), dict(kw, D=kw["D"][:, None].expand(3, 4)))
        assert same.family.D.sharing is Sharing.HEAD and same.D.shape == (3,)


def test_kwargs_round_trip(seed):
    fam = F.mamba1()
    p = bind(fam, "selective_scan", (), scan_kw(seed=seed))
    q = bind(fam, "selective_scan", (), p.kwargs())
    assert all(torch.equal(getattr(p, k), getattr(q, k)) for k in ("u", "delta", "A", "B", "C"))


# --------------------------------------------------------------------------------------------
# Every CallError case, naming the argument

def test_a_shared_size_mismatch_names_both_tensors():
    """Only u got a new length: the message blames delta against u's seqlen, so whichever of the
    two is wrong, the user reads both sizes and where each came from."""
    fam = F.mamba1()
    kw = example_inputs(fam, "selective_scan", 2, 12)
    text = raises(fam, "selective_scan", "delta", dict(kw, u=kw["u"][..., :11].contiguous()),
                  "dim 2 (seqlen) is 12, but argument 'u' has seqlen 11")
    assert text.index("'delta'") < text.index("'u'")
    text = raises(fam, "selective_scan", "initial_state",
                  dict(kw, initial_state=torch.zeros(3, *kw["u"].shape[1:2], fam.dims.state)),
                  "is 3, but argument 'u' has batch 2")


def test_wrong_shapes_name_the_tensor_and_the_dim():
    fam = F.mamba2()
    kw = ssd_kw()
    raises(fam, "ssd", "x", dict(kw, x=kw["x"][0]), "expected (b, l, h, p)")
    # sizes come from the tensors: x fixes head_dim 7 for the call, so z is the one that differs
    raises(fam, "ssd", "z", dict(kw, x=torch.zeros(2, 10, 4, 7)), "head_dim",
           "is 8, but argument 'x' has head_dim 7")
    raises(fam, "ssd", "dt", dict(kw, dt=kw["dt"][:1]), "batch", "is 1, but argument 'x' has batch 2")
    raises(fam, "ssd", "B", dict(kw, B=kw["B"][:, :9]), "seqlen", "is 9, but argument 'x' has seqlen 10")
    raises(fam, "ssd", "C", dict(kw, C=torch.zeros(2, 10, 2, 16)), "groups")
    raises(fam, "ssd", "B", dict(kw, B=torch.zeros(2, 10, 1, 15)), "state")
    raises(fam, "ssd", "A", dict(kw, A=torch.zeros(5)), "heads")
    raises(fam, "ssd", "initial_states", dict(kw, initial_states=torch.zeros(2, 4, 8, 3)),
           "state")
    raises(fam, "ssd", "D", dict(kw, D=torch.zeros(4, 7)), "expected (h,) = (4,) or (h, p)")
    skw = scan_kw()
    raises(F.mamba1(), "selective_scan", "u", dict(skw, u=torch.zeros(2, 15, 10)), "channels")
    raises(F.s4_dplr(), "selective_scan", "P",
           dict(example_inputs(F.s4_dplr(), None, 1, 4), P=torch.zeros(8, 2, 8)), "rank")
    raises(F.dense(), "selective_scan", "A",
           dict(example_inputs(F.dense(), None, 1, 4), A=torch.zeros(4, 4)), "(d, n, n)")


def test_selective_versus_constant_shapes():
    text = raises(F.mamba1(), "selective_scan", "B", scan_kw(B=torch.zeros(16, 8)),
                  "expected (b, g, n, l)")
    assert "selective" in text
    s4d = F.s4d()
    kw = example_inputs(s4d, None, 2, 10)
    raises(s4d, "selective_scan", "C", dict(kw, C=torch.zeros(2, 1, 8, 10)), "constant")
    raises(s4d, "selective_scan", "delta", dict(kw, delta=torch.zeros(2, 16, 10)), "(d,)")


def test_wrong_dtypes():
    fam = F.mamba2()
    kw = ssd_kw()
    raises(fam, "ssd", "x", dict(kw, x=kw["x"].double()), "dtype float64", "input dtypes")
    raises(fam, "ssd", "dt", dict(kw, dt=kw["dt"].half()), "float16", "share the dtype of x")
    raises(fam, "ssd", "A", dict(kw, A=kw["A"].to(torch.int32)), "int32")
    raises(fam, "ssd", "initial_states", dict(kw, initial_states=torch.zeros(2, 4, 8, 16,
                                                                            dtype=torch.bfloat16)),
           "state dtype")
    s5 = F.s5()
    kw5 = example_inputs(s5, None, 1, 4)
    raises(s5, "selective_scan", "A", dict(kw5, A=kw5["A"].real.contiguous()), "complex")
    raises(F.mamba1(), "selective_scan", "B", scan_kw(B=scan_kw()["B"].to(torch.complex64)),
           "complex64")
    # Parameters may stay fp32 when activations are bf16.
    bf = example_inputs(fam, "ssd", 1, 4, dtype="bfloat16")
    assert bind(fam, "ssd", (), bf).A.dtype == torch.float32


def test_mixed_devices():
    kw = ssd_kw()
    raises(F.mamba2(), "ssd", "z", dict(kw, z=torch.empty(2, 10, 4, 8, device="meta")),
           "meta", "one device")


def test_non_contiguous_last_dim():
    kw = ssd_kw()
    x = kw["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    raises(F.mamba2(), "ssd", "x", dict(kw, x=x), "contiguous", "stride 4")
    skw = scan_kw()
    raises(F.mamba1(), "selective_scan", "u",
           dict(skw, u=skw["u"].transpose(1, 2).contiguous().transpose(1, 2)), "seqlen")


def test_missing_and_absent_tensors():
    fam = F.mamba2()
    kw = ssd_kw()
    raises(fam, "ssd", "B", {k: v for k, v in kw.items() if k != "B"}, "missing")
    # D, z and dt_bias may be omitted, as in mamba_ssm: the call runs the family without them
    dropped = bind(fam, "ssd", (), {k: v for k, v in kw.items() if k not in ("D", "z", "dt_bias")})
    assert dropped.D is None and dropped.z is None and dropped.dt_bias is None
    assert dropped.family.D is None and dropped.family.gate is None
    assert not dropped.family.delta.bias and fam.D is not None
    no_gate = F.mamba2(gate=False, D=None, bias=False)
    kw2 = example_inputs(no_gate, "ssd", 2, 10)
    raises(no_gate, "ssd", "z", dict(kw2, z=kw["z"]), "no output gate")
    raises(no_gate, "ssd", "D", dict(kw2, D=kw["D"]), "no D")
    raises(no_gate, "ssd", "dt_bias", dict(kw2, dt_bias=kw["dt_bias"]), "no bias")
    raises(F.mamba1(), "selective_scan", "P", scan_kw(P=torch.zeros(16, 1, 8)), "DPLR")


def test_contradicting_fixed_arguments():
    fam = F.mamba2(chunk=16, clamp=(0.001, 0.1))
    kw = example_inputs(fam, "ssd", 1, 8)
    raises(fam, "ssd", "chunk_size", dict(kw, chunk_size=32), "16")
    raises(fam, "ssd", "dt_softplus", dict(kw, dt_softplus=False), "softplus")
    raises(fam, "ssd", "dt_limit", dict(kw, dt_limit=(0.0, math.inf)), "clamps")
    assert bind(fam, "ssd", (), dict(kw, chunk_size=16, dt_softplus=True,
                                     dt_limit=(1e-3, 1e-1))).chunk_size == 16
    raises(F.mamba1(), "selective_scan", "delta_softplus", scan_kw(delta_softplus=False))


def test_varlen_rules():
    fam = F.mamba2()
    kw = example_inputs(fam, "ssd", 1, 0, varlen=[3, 5], with_state=True)
    raises(fam, "ssd", "cu_seqlens", dict(ssd_kw(), cu_seqlens=torch.tensor([0, 4, 10])),
           "batch must be 1")
    raises(fam, "ssd", "cu_seqlens", dict(kw, cu_seqlens=torch.tensor([0, 5, 3, 8])),
           "non-decreasing")
    raises(fam, "ssd", "cu_seqlens", dict(kw, cu_seqlens=torch.tensor([1, 3, 8])), "from 0")
    raises(fam, "ssd", "cu_seqlens", dict(kw, cu_seqlens=torch.tensor([0, 3, 7])), "seqlen 8")
    raises(fam, "ssd", "cu_seqlens", dict(kw, cu_seqlens=torch.tensor([0.0, 3.0, 8.0])), "int")
    raises(fam, "ssd", "initial_states", dict(kw, initial_states=torch.zeros(3, 4, 8, 16)),
           "sequences", "is 3, but 'cu_seqlens' holds 2 sequences")
    raises(fam, "ssd", "return_varlen_states", dict(ssd_kw(), return_varlen_states=True),
           "needs the packed sequences")
    raises(fam, "ssd", "seq_idx", dict(kw, seq_idx=torch.zeros(1, 8, dtype=torch.int32)),
           "different sequences")
    two = ssd_kw()
    raises(fam, "ssd", "seq_idx", dict(two, seq_idx=torch.zeros(2, 10, dtype=torch.int32)),
           "batch 1")


def test_call_form_errors():
    fam = F.mamba2()
    kw = ssd_kw()
    raises(fam, "ssd", "return_varlen", dict(kw, return_varlen=True), "unexpected keyword")
    raises(fam, "ssd", "x", kw, "both by position and by keyword", args=(kw["x"],))
    with pytest.raises(CallError, match="at most 16 positional"):
        bind(fam, "ssd", tuple(range(17)), {})
    raises(fam, "ssd", "x", dict(kw, x=[[1.0]]), "torch tensor or numpy array")
    with pytest.raises(CallError, match="scalar per head"):
        bind(F.mamba1(), "ssd", (), {})
    fam_t = F.mamba1(method=Method.TRAPEZOIDAL)
    with pytest.raises(CallError, match="previous"):
        bind(fam_t, "state_update", (), example_inputs(F.mamba1(), "state_update", 1, 0))


@pytest.mark.parametrize("make, conv, sizes", [
    (F.mamba1, "selective_scan", dict(channels=20, state=6)),
    (F.mamba1, "state_update", dict(channels=12, state=5, groups=3)),
    (F.mamba2, "ssd", dict(heads=3, head_dim=10, state=12, groups=3)),
    (F.mamba2, "state_update", dict(heads=6, head_dim=5, state=7, groups=2)),
], ids=["scan", "scan-step", "ssd", "ssd-step"])
def test_sizes_the_spec_does_not_name_are_taken_from_the_tensors(make, conv, sizes, seed):
    fam = make()
    kw = example_inputs(resized(fam, **sizes), conv, 2, 9, seed=seed)
    problem = bind(fam, conv, (), kw)
    assert problem.family is resized(fam, **sizes)          # one object per size: a cache key
    for name, value in sizes.items():
        assert getattr(problem.family.dims, name) == value
    assert bind(fam, conv, (), example_inputs(fam, conv, 2, 9, seed=seed)).family is fam


def test_groups_that_do_not_divide_the_heads_are_refused():
    fam = F.mamba2()
    kw = example_inputs(resized(fam, heads=6, groups=3), "ssd", 1, 5)
    kw = dict(kw, x=kw["x"][:, :, :4].contiguous(), dt=kw["dt"][..., :4].contiguous(),
              A=kw["A"][:4], z=kw["z"][:, :, :4].contiguous(), D=kw["D"][:4],
              dt_bias=kw["dt_bias"][:4])
    raises(fam, "ssd", "B", kw, "groups 3, which does not divide the 4 heads")


def test_sizes_from_shapes_reads_shapes_only():
    fam = F.mamba1()
    kw = example_inputs(resized(fam, channels=10, state=3), "selective_scan", 2, 7)
    shapes = {k: tuple(v.shape) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    env = sizes_from_shapes(fam, "selective_scan", shapes)
    assert (env["d"], env["n"], env["l"], env["b"]) == (10, 3, 7, 2)


def test_a_replayed_call_is_refused_as_a_checked_one_would_be():
    """The validation cache keys non-tensor arguments with their type, and never replays a
    dt_limit given as a tensor or a list (its values are what is checked)."""
    fam = F.mamba2()
    kw = ssd_kw()
    bind(fam, "ssd", (), dict(kw, dt_softplus=True))
    raises(fam, "ssd", "dt_softplus", dict(kw, dt_softplus=1.0), "must be a bool")
    bind(fam, "ssd", (), dict(kw, dt_limit=torch.tensor([0.0, float("inf")])))
    raises(fam, "ssd", "dt_limit", dict(kw, dt_limit=torch.tensor([0.5, 0.6])), "contradicts")
