"""IR families built directly from the dataclasses, for tests that must not depend on the parser.

Each builder takes the knobs tests sweep (sizes, selectivity, method, algorithm) and returns an
``ir.SSMFamily``; defaults are the standard family (Mamba-1, Mamba-2, S4D, S5, S4, dense).
"""
from __future__ import annotations

from typing import Optional, Tuple

from ssmc.ir import (Algorithm, ASpec, AStructure, BCSpec, ComputeSpec, DeltaSpec, Dims, DSpec,
                     GateSpec, Method, Sharing, SSMFamily)


def mamba2(heads=4, head_dim=8, state=16, groups=1, chunk=16, method=Method.EXP_EULER,
           algorithm=Algorithm.CHUNKED, D: Optional[Sharing] = Sharing.HEAD, gate=True,
           softplus=True, bias=True, clamp: Optional[Tuple[float, float]] = None,
           selective_A=False, selective_B=True, selective_C=True, selective_delta=True,
           name="Mamba2") -> SSMFamily:
    return SSMFamily(
        name=name,
        dims=Dims(state=state, heads=heads, head_dim=head_dim, groups=groups),
        A=ASpec(AStructure.SCALAR, selective=selective_A),
        delta=DeltaSpec(selective=selective_delta, softplus=softplus, bias=bias, clamp=clamp),
        B=BCSpec(selective=selective_B, sharing=Sharing.GROUP if selective_B else Sharing.HEAD),
        C=BCSpec(selective=selective_C, sharing=Sharing.GROUP if selective_C else Sharing.HEAD),
        D=DSpec(D) if D is not None else None,
        gate=GateSpec() if gate else None,
        method=method,
        compute=ComputeSpec(algorithm, chunk_size=chunk if algorithm is Algorithm.CHUNKED else None),
    )


def mamba1(channels=16, state=8, groups=1, method=Method.EXP_EULER, algorithm=Algorithm.SCAN,
           D=True, gate=True, softplus=True, bias=True, clamp=None, selective_A=False,
           selective_B=True, selective_C=True, selective_delta=True,
           structure=AStructure.DIAGONAL, rank=0, name="Mamba1") -> SSMFamily:
    return SSMFamily(
        name=name,
        dims=Dims(state=state, channels=channels, groups=groups, rank=rank),
        A=ASpec(structure, selective=selective_A),
        delta=DeltaSpec(selective=selective_delta, softplus=softplus, bias=bias, clamp=clamp),
        B=BCSpec(selective=selective_B, sharing=Sharing.GROUP if selective_B else Sharing.HEAD),
        C=BCSpec(selective=selective_C, sharing=Sharing.GROUP if selective_C else Sharing.HEAD),
        D=DSpec(Sharing.HEAD) if D else None,
        gate=GateSpec() if gate else None,
        method=method,
        compute=ComputeSpec(algorithm),
    )


def s4d(channels=16, state=8, method=Method.ZOH, algorithm=Algorithm.CONV, complex_a=False,
        name="S4D") -> SSMFamily:
    """LTI, diagonal: learned per-channel Delta (d,), B, C (d, n); D skip, no gate."""
    return mamba1(channels=channels, state=state, method=method, algorithm=algorithm, gate=False,
                  softplus=False, bias=False, selective_B=False, selective_C=False,
                  selective_delta=False,
                  structure=AStructure.COMPLEX_DIAGONAL if complex_a else AStructure.DIAGONAL,
                  name=name)


def s5(channels=16, state=8, method=Method.ZOH, algorithm=Algorithm.SCAN) -> SSMFamily:
    return s4d(channels, state, method, algorithm, complex_a=True, name="S5")


def s4_dplr(channels=8, state=8, rank=1, method=Method.BILINEAR, algorithm=Algorithm.CONV):
    return mamba1(channels=channels, state=state, method=method, algorithm=algorithm, gate=False,
                  softplus=False, bias=False, selective_B=False, selective_C=False,
                  selective_delta=False, structure=AStructure.DPLR, rank=rank, name="S4")


def dense(channels=4, state=4, method=Method.ZOH, algorithm=Algorithm.SCAN, selective=True):
    return mamba1(channels=channels, state=state, method=method, algorithm=algorithm, gate=False,
                  selective_B=selective, selective_C=selective, selective_delta=selective,
                  softplus=selective, bias=False, structure=AStructure.DENSE, name="Dense")


# The matrix-A (DPLR, dense) LTI families every conv backend is checked on, by test id.
MATRIX_CONV_FAMILIES = {
    "s4-dplr-r1-bilinear": lambda: s4_dplr(rank=1, method=Method.BILINEAR),
    "s4-dplr-r1-zoh": lambda: s4_dplr(rank=1, method=Method.ZOH),
    "s4-dplr-r2-bilinear": lambda: s4_dplr(rank=2, method=Method.BILINEAR),
    "s4-dplr-r2-zoh": lambda: s4_dplr(rank=2, method=Method.ZOH),
    "s4-dplr-trapezoidal": lambda: s4_dplr(rank=1, method=Method.TRAPEZOIDAL),
    "dense-zoh": lambda: dense(method=Method.ZOH, algorithm=Algorithm.CONV, selective=False),
}
