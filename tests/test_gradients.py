"""The gradient oracle (issue 13's foundation): torch autograd through the float64 torch print
of the reference recurrence, checked with ``torch.autograd.gradcheck`` (finite differences)
on every input of the scan and SSD conventions; and the derivatives the discretize pass
derives for backward kernels, checked against finite differences of Ā and B̄ themselves."""

import dataclasses

import pytest
import sympy as sp
import torch

import ssmc
from ssmc.backends import reference
from ssmc.discretize import (DT, DT_BIAS, DT_RAW, delta_map, derive_derivatives,
                             derive_elementwise)
from ssmc.ir import Convention, Method
from ssmc.signature import bind, resized

TRAPEZOIDAL_SPEC = """
ssm Trap {
  dims       channels = 3, state = 2
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per channel
  gate       silu(z)
  discretize trapezoidal
  compute    scan
}
"""

CASES = {"trapezoidal": (TRAPEZOIDAL_SPEC, None, Convention.SELECTIVE_SCAN,
                         dict(channels=3, state=2), ("u", "delta", "A", "B", "C", "D", "z",
                                                     "delta_bias", "initial_state")),
         "mamba1": ("examples/mamba1.ssm", None, Convention.SELECTIVE_SCAN,
                    dict(channels=3, state=2), ("u", "delta", "A", "B", "C", "D", "z",
                                                "delta_bias", "initial_state")),
         "mamba2": ("examples/mamba2.ssm", "Mamba2", Convention.SSD,
                    dict(heads=2, head_dim=2, state=3), ("x", "dt", "A", "B", "C", "D", "z",
                                                         "dt_bias", "initial_states"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_oracle_passes_gradcheck(case, seed):
    spec, name, conv, sizes, names = CASES[case]
    family = resized(ssmc.parse(spec).family(name), **sizes)
    kernel = ssmc.compile(family, target="reference")
    flag = "return_last_state" if conv is Convention.SELECTIVE_SCAN else "return_final_states"
    inputs = kernel.example_inputs(batch=2, seqlen=5, seed=seed, with_state=True)
    # Bound (validated) in the spec's dtype; the oracle then runs on float64 leaves, which
    # gradcheck needs (the layout takes any floating dtype to float64).
    problem = bind(family, conv, (), {**inputs, flag: True})
    leaves = [getattr(problem, k).detach().double().requires_grad_(True) for k in names]

    def f(*tensors):
        bound = dataclasses.replace(problem, **dict(zip(names, tensors)))
        y, final = reference.run_float64_differentiable(bound)
        return y, final

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    y, final = f(*leaves)
    grads = torch.autograd.grad((y.sum() + final.sum()), leaves)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", list(Method))
def test_derivatives_match_finite_differences(method):
    disc = derive_elementwise(method)
    a = disc.a
    fam = ssmc.parse("examples/mamba1.ssm").families[0]
    der = derive_derivatives(disc.abar, disc.bbar, disc.bbar_prev, a, delta_map(fam.delta))
    point = {DT: 0.37, a: -1.3}
    h = 1e-6
    for field in ("abar", "bbar", "bbar_prev"):
        e = getattr(disc, field)
        for var, name in ((DT, "dt"), (a, "a")):
            num = (float(e.subs({**point, var: point[var] + h}))
                   - float(e.subs({**point, var: point[var] - h}))) / (2 * h)
            got = float(sp.sympify(getattr(der, f"{field}_{name}")).subs(point))
            assert abs(got - num) <= 1e-6 * max(1.0, abs(num)), (method, field, name)
    x = {DT_RAW: 0.4, DT_BIAS: -0.1}
    num = (float(delta_map(fam.delta).subs({**x, DT_RAW: 0.4 + h}).evalf())
           - float(delta_map(fam.delta).subs({**x, DT_RAW: 0.4 - h}).evalf())) / (2 * h)
    assert abs(float(der.delta_raw.subs(x).evalf()) - num) <= 1e-6
