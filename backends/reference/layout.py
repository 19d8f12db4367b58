"""Bring every convention's tensors to the oracle's one layout, and back.

The generated recurrence sees time-major float64 arrays with heads x head_dim (SSD) or
channels (selective scan) flattened into one channel axis c, each channel owning a state
vector of size n: x (L, R, c), dt (L|1, R|1, c), a (L|1, R|1, c, n[, n]), B/C (L|1, R|1, c, n),
h0 (S, c, n). Group sharing, per-head parameters and DPLR's diag(Λ) - PᵀQ are resolved here by
indexing, so the generated math never depends on the convention. A decode step is a scan of
length one whose initial state is the cache.

The same layout runs in numpy (the oracle of every forward kernel) or in float64 torch
(``Arrays.TORCH``: the gradient oracle, differentiated by torch autograd through the
generated recurrence printed in the torch dialect); an ``Arrays`` names the few calls that
differ between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import numpy as np
import torch

from ssmc.ir import AStructure, Convention, Sharing
from ssmc.signature import SelectiveScanProblem, SSDProblem, StateUpdateProblem


def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """float64 (complex128 for complex) numpy copy of a tensor, on the host."""
    if t is None:
        return None
    t = t.detach().to("cpu")
    return t.to(torch.complex128 if t.is_complex() else torch.float64).numpy()


def to_float64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float64 (complex128) torch form of a tensor on the host, still in autograd's graph."""
    if t is None:
        return None
    return t.to("cpu").to(torch.complex128 if t.is_complex() else torch.float64)


@dataclass(frozen=True)
class Arrays:
    """The array library the layout runs in: numpy, or float64 torch for gradients."""
    convert: Callable
    moveaxis: Callable
    concatenate: Callable
    zeros: Callable
    eye: Callable
    einsum: Callable
    copy: Callable


Arrays.NUMPY = Arrays(to_numpy, np.moveaxis, np.concatenate, np.zeros, np.eye, np.einsum,
                      np.copy)
Arrays.TORCH = Arrays(to_float64, torch.movedim, torch.cat,
                      lambda shape: torch.zeros(shape, dtype=torch.float64),
                      lambda n: torch.eye(n, dtype=torch.float64), torch.einsum, torch.clone)


@dataclass
class Canonical:
    arrays: Dict[str, Optional[np.ndarray]]     # recurrence() keyword arguments except h0
    timed: Set[str]                             # arrays whose axis 0 runs over tokens
    h0: np.ndarray                              # (S, c, n): one initial state per sequence
    y_out: Callable[[np.ndarray], np.ndarray]   # (l, b, c) -> the convention's y
    state_out: Callable[[np.ndarray], np.ndarray]  # (S, c, n) -> the convention's state
    offsets: List[int] = field(default_factory=list)


def as_sequence(problem):
    """A decode step as an SSD / selective-scan problem of one token starting from the cache."""
    if not isinstance(problem, StateUpdateProblem):
        return problem
    fam, p = problem.family, problem
    sel = {"dt": fam.delta.selective, "A": fam.A.selective, "B": fam.B.selective,
           "C": fam.C.selective}

    def tok(name, t, axis):
        return t.unsqueeze(axis) if t is not None and sel.get(name, True) else t

    common = dict(family=fam, D=p.D, dt_limit=p.dt_limit, nseq=p.batch)
    if fam.A.structure is AStructure.SCALAR:
        return SSDProblem(x=tok("x", p.x, 1), dt=tok("dt", p.dt, 1), A=tok("A", p.A, 1),
                          B=tok("B", p.B, 1), C=tok("C", p.C, 1), z=tok("z", p.z, 1),
                          dt_bias=p.dt_bias, initial_states=p.state, dt_softplus=p.dt_softplus,
                          return_final_states=True, **common)
    return SelectiveScanProblem(u=tok("x", p.x, -1), delta=tok("dt", p.dt, -1),
                                A=tok("A", p.A, -1), B=tok("B", p.B, -1), C=tok("C", p.C, -1),
                                z=tok("z", p.z, -1), delta_bias=p.dt_bias,
                                delta_softplus=p.dt_softplus, initial_state=p.state,
                                return_last_state=True, P=p.P, Q=p.Q, **common)


def _ssd(p: SSDProblem, xp: Arrays) -> Canonical:
    fam = p.family
    x = xp.convert(p.x)
    b, l, h, hd = x.shape
    n, g = fam.dims.state, fam.dims.groups
    c = h * hd
    head = np.repeat(np.arange(h), hd)            # channel -> head
    group = (np.arange(h) // (h // g))[head]      # channel -> group (heads split evenly)

    def tm(a):                                    # (b, l, ...) -> (l, b, ...)
        return xp.moveaxis(a, 1, 0)

    def per_token_or_head(t):                     # (b, l, h) -> (l, b, c); (h,) -> (1, 1, c)
        a = xp.convert(t)
        return tm(a)[..., head] if a.ndim == 3 else a[head][None, None]

    def bc(t, spec):
        a = xp.convert(t)
        if a.ndim == 4:
            return tm(a)[:, :, group, :]
        return a[group if spec.sharing is Sharing.GROUP else head][None, None]

    D = xp.convert(p.D)
    if D is not None:
        D = D.reshape(c) if D.ndim == 2 else D[head]
    h0 = xp.convert(p.initial_states)
    h0 = xp.zeros((p.nseq, c, n)) if h0 is None else h0.reshape(-1, c, n)
    arrays = dict(x=tm(x).reshape(l, b, c), dt=per_token_or_head(p.dt),
                  dt_bias=None if p.dt_bias is None else xp.convert(p.dt_bias)[head],
                  a=per_token_or_head(p.A)[..., None], B=bc(p.B, fam.B), C=bc(p.C, fam.C),
                  D=D, z=None if p.z is None else tm(xp.convert(p.z)).reshape(l, b, c))
    timed = {"x", "z"} | {k for k, s in (("dt", fam.delta), ("a", fam.A), ("B", fam.B),
                                          ("C", fam.C)) if s.selective}
    return Canonical(arrays, timed, h0,
                     y_out=lambda y: xp.moveaxis(y.reshape(l, b, h, hd), 0, 1),
                     state_out=lambda s: s.reshape(-1, h, hd, n))


def _scan(p: SelectiveScanProblem, xp: Arrays) -> Canonical:
    fam = p.family
    u = xp.convert(p.u)
    b, d, l = u.shape
    n, g = fam.dims.state, fam.dims.groups
    group = np.arange(d) // (d // g)              # channel -> group

    def tm(a):                                    # (b, ..., l) -> (l, b, ...)
        return xp.moveaxis(a, -1, 0)

    def bc(t, spec):
        a = xp.convert(t)
        if spec.selective:
            return tm(a)[:, :, group, :]
        return (a[group] if spec.sharing is Sharing.GROUP else a)[None, None]

    a = xp.convert(p.A)
    a = tm(a) if fam.A.selective else a[None, None]
    if fam.A.structure is AStructure.DPLR:
        # The full matrix diag(Λ) - Pᵀ Q per channel (P, Q: (d, r, n)).
        low_rank = xp.einsum("drn,drm->dnm", xp.convert(p.P), xp.convert(p.Q))
        a = a[..., :, None] * xp.eye(n) - low_rank
    delta = xp.convert(p.delta)
    h0 = xp.convert(p.initial_state)
    h0 = xp.zeros((p.nseq, d, n)) if h0 is None else h0
    arrays = dict(x=tm(u), dt=tm(delta) if fam.delta.selective else delta[None, None],
                  dt_bias=xp.convert(p.delta_bias), a=a, B=bc(p.B, fam.B), C=bc(p.C, fam.C),
                  D=xp.convert(p.D), z=None if p.z is None else tm(xp.convert(p.z)))
    timed = {"x", "z"} | {k for k, s in (("dt", fam.delta), ("a", fam.A), ("B", fam.B),
                                          ("C", fam.C)) if s.selective}
    return Canonical(arrays, timed, h0, y_out=lambda y: xp.moveaxis(y, 0, -1),
                     state_out=lambda s: s)


def canonical(problem, xp: Arrays = Arrays.NUMPY) -> Canonical:
    """The oracle's layout of any problem (a decode step becomes a one-token sequence)."""
    p = as_sequence(problem)
    can = _ssd(p, xp) if p.convention is Convention.SSD else _scan(p, xp)
    can.offsets = list(p.seq_offsets)
    return can


def run(recurrence, problem, xp: Arrays = Arrays.NUMPY):
    """y and final states (float64 / complex128 arrays of ``xp``, the convention's shapes) of
    a problem: the recurrence runs once per packed sequence, each from its own initial state."""
    can = canonical(problem, xp)
    ys, finals = [], []
    varlen = len(can.offsets) > 2 or problem.varlen
    for i, (start, end) in enumerate(zip(can.offsets[:-1], can.offsets[1:])):
        h0 = can.h0[i:i + 1] if varlen else can.h0
        if end == start:
            finals.append(xp.copy(h0))
            continue
        args = {k: (v[start:end] if k in can.timed and v is not None else v)
                for k, v in can.arrays.items()}
        y, h = recurrence(h0=h0, **args)
        ys.append(y)
        finals.append(h)
    x = can.arrays["x"]
    y = xp.concatenate(ys, 0) if ys else xp.zeros(x.shape)
    y, state = can.y_out(y), can.state_out(xp.concatenate(finals, 0))
    if isinstance(problem, StateUpdateProblem):
        y = y[:, 0] if problem.family.A.structure is AStructure.SCALAR else y[..., 0]
    return y, state
