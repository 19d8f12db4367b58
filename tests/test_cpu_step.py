"""The decode step (state_update convention) on the CPU target against the float64 oracle:
the state is updated in place; diagonal, complex-diagonal and scalar A; fp32 and bf16."""
from __future__ import annotations

import pytest
import torch

from families import mamba1, mamba2, s4d, s5
from ssmc.ir import Algorithm, Convention, Method, Sharing
from test_cpu_helpers import check, kernel, problem

STEP = Convention.STATE_UPDATE


@pytest.mark.parametrize("fam", [
    mamba1(), mamba1(method=Method.ZOH, groups=2, channels=32), mamba1(selective_A=True),
    mamba2(), mamba2(heads=4, groups=2, D=Sharing.HEAD_DIM, method=Method.BILINEAR),
    mamba2(selective_A=True, D=None, gate=False),
    s5(), s5(method=Method.BILINEAR), s4d(),
], ids=["mamba1", "mamba1_zoh_g2", "mamba1_selA", "mamba2", "mamba2_g2_hd_bilinear",
        "mamba2_selA_noDz", "s5", "s5_bilinear", "s4d"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step(fam, dtype, seed):
    k = kernel(fam, Algorithm.STEP)
    for batch in (1, 3):
        p = problem(fam, STEP, batch=batch, dtype=dtype, seed=seed + batch)
        before = p.state.clone()
        check(k, p, dtype, f"{fam.name} step b{batch}")
        assert not torch.equal(before, p.state), "the state was not updated in place"


def test_step_trapezoidal_is_refused():
    from ssmc.backends import cpu
    from ssmc.plan import make_plan
    plan = make_plan(mamba1(method=Method.TRAPEZOIDAL), Algorithm.STEP)
    assert "previous token" in cpu.supports(plan)
