"""The cpu target's SSD (scalar A) backward (backends/cpu/ssd_backward.py) against the float64
oracle, at sizes that exercise its layout: several vectors of state lanes per row, several row
blocks per head, checkpoint chunks (and a config that moves them), and the discretizations
whose B̄ depends on A (zoh) or that have a previous-token term (trapezoidal)."""
from __future__ import annotations

import pytest

import families as F
from conftest import assert_rel_close, require_target_tools
import ssmc
from ssmc import signature
from ssmc.ir import Method
from test_scan_backward import SSD_NAMES, _poisoned, oracle_gradients

CASES = {
    # state 32: two 16-lane vectors per row; head_dim 12: three row blocks of 4
    "exp_euler": dict(kw=dict(heads=4, head_dim=12, state=32, groups=2), seqlen=41),
    "zoh": dict(kw=dict(heads=2, head_dim=8, state=32, method=Method.ZOH), seqlen=37),
    "trapezoidal": dict(kw=dict(heads=2, head_dim=8, state=16, method=Method.TRAPEZOIDAL),
                        seqlen=35),
    "trapezoidal_varlen": dict(kw=dict(heads=2, head_dim=8, state=16,
                                       method=Method.TRAPEZOIDAL), varlen=[17, 1, 0, 40]),
    "clamp_no_gate": dict(kw=dict(heads=2, head_dim=8, state=32, gate=False,
                                  clamp=(1e-3, 0.1)), seqlen=29),
    "rows_and_chunks": dict(kw=dict(heads=2, head_dim=8, state=32), seqlen=45,
                            config={"bwd_rows": 2, "ckpt": 7}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ssd_backward_layouts(case, seed):
    require_target_tools("cpu")
    spec = CASES[case]
    fam = F.mamba2(chunk=16, **spec["kw"])
    kernel = ssmc.compile(fam, target="cpu", config=spec.get("config"))
    varlen = spec.get("varlen")
    options = {"with_state": True, **({"varlen": varlen} if varlen else {})}
    inputs = signature.example_inputs(fam, None, 1 if varlen else 2,
                                      0 if varlen else spec["seqlen"], seed=seed, **options)
    flag = "return_varlen_states" if varlen else "return_final_states"
    problem = signature.bind(fam, fam.convention, (), {**inputs, flag: True})
    names, dy, dlast, want = oracle_gradients(problem, SSD_NAMES, True, seed)
    backend_kernel = kernel.kernel_for(problem.family)
    with _poisoned(backend_kernel, "cpu"):
        got = backend_kernel.backward(problem, dy.float(), dlast.float())
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert_rel_close(f"d{name}", got[name], want[name], "float32")
