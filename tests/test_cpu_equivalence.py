"""scan ≡ chunked ≡ conv ≡ step on the CPU target, for one spec where all four apply (an LTI
family with scalar A), and scan ≡ conv ≡ step for a diagonal LTI family. Each algorithm is
checked against the float64 oracle on the same inputs (never against each other)."""
from __future__ import annotations

import torch

from families import mamba2, s4d
from ssmc import signature
from ssmc.backends import reference
from ssmc.ir import Algorithm, Convention
from test_cpu_helpers import check, kernel, problem

from conftest import TOL, rel_err


def _step_by_step(fam, p_scan, seed):
    """Feed the scan problem's tokens one at a time to the decode step; compare with the oracle."""
    k = kernel(fam, Algorithm.STEP)
    ssd = fam.convention is Convention.SSD
    y64, h64 = reference.run_float64(p_scan)
    state = (p_scan.initial_states if ssd else p_scan.initial_state).clone()
    ys = []
    L = p_scan.seqlen
    for t in range(L):
        kw = dict(state=state, A=p_scan.A, B=p_scan.B, C=p_scan.C, D=p_scan.D, z=None)
        if ssd:
            kw.update(x=p_scan.x[:, t], dt=p_scan.dt, z=p_scan.z[:, t] if p_scan.z is not None else None,
                      dt_bias=p_scan.dt_bias)
        else:
            kw.update(x=p_scan.u[..., t].contiguous(), dt=p_scan.delta,
                      z=p_scan.z[..., t].contiguous() if p_scan.z is not None else None,
                      dt_bias=p_scan.delta_bias)
        kw = {k_: v for k_, v in kw.items() if v is not None}
        y, _ = k(signature.bind(fam, Convention.STATE_UPDATE, (), kw))
        ys.append(y)
    y = torch.stack(ys, 1 if ssd else -1)
    assert rel_err(y, y64) <= TOL["float32"], f"step-by-step y: {rel_err(y, y64):.2e}"
    assert rel_err(state, h64) <= TOL["float32"], f"step-by-step state: {rel_err(state, h64):.2e}"


def test_scan_chunked_conv_step_scalar_lti(seed):
    fam = mamba2(selective_B=False, selective_C=False, selective_delta=False)
    p = problem(fam, batch=2, seqlen=21, with_state=True, seed=seed)
    for algorithm in (Algorithm.SCAN, Algorithm.CHUNKED, Algorithm.CONV):
        check(kernel(fam, algorithm), p, what=algorithm.value)
    _step_by_step(fam, p, seed)


def test_scan_conv_step_diagonal_lti(seed):
    fam = s4d()
    p = problem(fam, batch=2, seqlen=21, with_state=True, seed=seed)
    for algorithm in (Algorithm.SCAN, Algorithm.CONV):
        check(kernel(fam, algorithm), p, what=algorithm.value)
    _step_by_step(fam, p, seed)
