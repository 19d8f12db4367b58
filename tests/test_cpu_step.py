"""The decode step (state_update convention) on the CPU target against the float64 oracle:
the state is updated in place; diagonal, complex-diagonal and scalar A; fp32 and bf16."""
from __future__ import annotations

import pytest
import torch

from families import mamba1, mamba2, s4d, s5
from ssmc.ir import Algorithm, Convention, Method, Sharing
from test_cpu_helpers import check, kernel, problem

STEP = Convention.STATE_UPDATE


_FAMILIES = {
    "mamba1": mamba1(), "mamba1_zoh_g2": mamba1(method=Method.ZOH, groups=2, channels=32),
    "mamba1_selA": mamba1(selective_A=True), "mamba2": mamba2(),
    "mamba2_g2_hd_bilinear": mamba2(heads=4, groups=2, D=Sharing.HEAD_DIM, method=Method.BILINEAR),
    "mamba2_selA_noDz": mamba2(selective_A=True, D=None, gate=False),
    "s5": s5(), "s5_bilinear": s5(method=Method.BILINEAR), "s4d": s4d(),
}
# fp32 mamba1, mamba2, s5 and s4d are test_oracle.py's cpu-step cells (at other sizes).
_IN_TEST_ORACLE = {("float32", name) for name in ("mamba1", "mamba2", "s5", "s4d")}


@pytest.mark.parametrize("dtype,name", [(d, n) for d in ("float32", "bfloat16") for n in _FAMILIES
                                        if (d, n) not in _IN_TEST_ORACLE])
def test_step(name, dtype, seed):
    fam = _FAMILIES[name]
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
