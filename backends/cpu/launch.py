"""From a bound ``Problem`` to the compiled function's arguments and back.

Tensors reach TVM zero-copy (the FFI takes torch CPU tensors through DLPack) when they are
already fp32 and contiguous; bf16/fp16 inputs are converted to fp32 here, once, because the
kernels compute and keep state in fp32 (the convert is O(tokens), the scan O(tokens * n)).
Complex tensors travel as their real view (..., 2).

One runner per algorithm (``runner`` picks it); this is the only module of the backend that
imports torch, and ``build`` imports it only when a kernel is built to be called.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ssmc.errors import CallError
from ssmc.ir import Algorithm, AStructure, KernelPlan
from ssmc.lti import host_coefficients, is_matrix_conv

from . import buffers

_SEG_CACHE: dict = {}
# Tests set this: outputs are then allocated full of NaN, so an element the kernel never
# writes cannot pass the comparison by holding a stale value.
POISON = False


def empty(shape) -> torch.Tensor:
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=torch.float32)
    return torch.empty(tuple(shape), dtype=torch.float32)


def f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """fp32 (complex64 as a real (..., 2) view), contiguous. Free when it already is."""
    if t is None:
        return None
    if t.dtype is torch.float32:
        return t if t.is_contiguous() else t.contiguous()
    if t.is_complex():
        return torch.view_as_real(t.to(torch.complex64).resolve_conj()).contiguous()
    return t.to(torch.float32).contiguous()


def token_major(t: torch.Tensor, selective: bool) -> torch.Tensor:
    """Selective-scan B/C (b, g, n, l) as (b, g, l, n): the scan reads one token's n values per
    step, and n contiguous floats make those loads constant offsets from one base (in the
    (b, g, n, l) layout each of the n loads needs its own address arithmetic). O(n l) copy."""
    if not selective:
        return t
    return t.transpose(2, 3).contiguous()


def segments(problem, batch: int, seqlen: int) -> torch.Tensor:
    """(nseq, 3) int64 rows (batch row, first token, end token): batch rows, or varlen pieces."""
    cu = getattr(problem, "cu_seqlens", None)
    if cu is None:
        key = (batch, seqlen)
        seg = _SEG_CACHE.get(key)
        if seg is None:
            seg = torch.empty((batch, 3), dtype=torch.int64)
            seg[:, 0] = torch.arange(batch)
            seg[:, 1] = 0
            seg[:, 2] = seqlen
            if len(_SEG_CACHE) < 256:
                _SEG_CACHE[key] = seg
        return seg
    cu = cu.to(device="cpu", dtype=torch.int64)
    seg = torch.zeros((cu.numel() - 1, 3), dtype=torch.int64)
    seg[:, 1] = cu[:-1]
    seg[:, 2] = cu[1:]
    return seg


class Placeholders:
    """1-row stand-ins for absent initial/final states (the kernel's flags say not to touch)."""

    def __init__(self):
        self._cache = {}

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        shape = (1,) + tuple(shape)
        t = self._cache.get(shape)
        if t is None:
            t = self._cache[shape] = torch.zeros(shape, dtype=torch.float32)
        return t


def output(y32: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y32 if like.dtype == torch.float32 else y32.to(like.dtype)


def state_out(hT: torch.Tensor, complex_state: bool) -> torch.Tensor:
    return torch.view_as_complex(hT) if complex_state else hT


def check_cpu(*tensors) -> None:
    for t in tensors:
        if t is not None and not t.is_cpu:
            raise CallError(f"the cpu target runs on the CPU, got a tensor on {t.device}",
                            hint="move the inputs with .cpu()")


# --------------------------------------------------------------------------------------------
# The scan (and CHUNKED) kernel's call

def unpack(p, plan):
    """The per-token input, Delta, its bias, the initial state and whether the final one is
    wanted, with batch, seqlen and the state's shape (one sequence's, as the kernel's buffers
    hold it), read off the operand table for either convention's problem."""
    table = plan.operands
    key = table.keyword
    initial = table[key["initial"]]
    state_shape = buffers.shape(initial, buffers.sizes_of(plan.family, s=0))[1:]
    return (getattr(p, key["x"]), getattr(p, key["dt"]), getattr(p, key["dt_bias"]),
            getattr(p, key["initial"]), p.wants_final_state, p.batch, p.seqlen, state_shape)


class _SequenceRunner:
    """What the scan and the conv runners share: the family's layout, and the start of a call
    (the problem unpacked for either convention, checked, its sequences as segments)."""

    def __init__(self, plan):
        self.plan = plan
        self.fam = plan.family
        self.ssd = self.fam.A.structure is AStructure.SCALAR
        self.cplx = self.fam.A.structure is AStructure.COMPLEX_DIAGONAL
        self.placeholders = Placeholders()
        self.inputs = buffers.inputs(plan)   # the scan's tensor parameters, in its order

    def kernel_inputs(self, p, state_shape):
        """The scan's input tensors (``self.inputs``: the kernel's parameters, in its order) as
        it takes them: fp32, B/C token-major in the selective-scan layout, a placeholder for an
        absent initial state. The forward and the backward take the same ones."""
        args = []
        for name, op in self.inputs:
            value = getattr(p, op.name)
            if name == "h0":
                args.append(f32(value) if value is not None else self.placeholders(state_shape))
            elif op.name in ("B", "C") and not self.ssd:
                args.append(f32(token_major(value, getattr(self.fam, op.name).selective)))
            else:
                args.append(f32(value))
        return args

    def _begin(self, p):
        x, dt, bias, init, want, batch, seqlen, state_shape = unpack(p, self.plan)
        check_cpu(x)
        return x, dt, bias, init, want, batch, seqlen, state_shape, segments(p, batch, seqlen)


class ScanRunner(_SequenceRunner):
    """Binds a Problem (SSD or selective-scan convention) to ``ssmc_scan``'s arguments."""

    def __init__(self, plan, function):
        super().__init__(plan)
        self.fn = function

    def __call__(self, p):
        x, dt, bias, init, want, batch, seqlen, state_shape, seg = self._begin(p)
        nseq = seg.shape[0]
        args = self.kernel_inputs(p, state_shape)
        y = empty(args[0].shape)
        hT = empty((nseq,) + state_shape) if want else \
            self.placeholders(state_shape)
        args += [seg, y, hT, int(init is not None), int(bool(want))]
        self.fn(*args)
        final = state_out(hT, self.cplx) if want else None
        return output(y, x), final


class ScanBackwardRunner(_SequenceRunner):
    """Binds a selective-scan Problem (real or complex diagonal A) and the gradients of its
    outputs to ``ssmc_scan_backward`` (scan_backward.py); returns the gradients by argument
    name, fp32."""

    def __init__(self, plan, function, checkpoint: int):
        super().__init__(plan)
        self.fn = function
        self.K = checkpoint

    def __call__(self, p, dout, dfinal):
        import math
        fam = self.fam
        x, dt, bias, init, want, batch, seqlen, state_shape, seg = self._begin(p)
        check_cpu(dout, dfinal)
        nseq, d, n, g = seg.shape[0], fam.dims.d_inner, fam.dims.state, fam.dims.groups
        args = self.kernel_inputs(p, state_shape)
        names = {name for name, _ in self.inputs}
        lengths = seg[:, 2] - seg[:, 1]
        longest = int(lengths.max()) if lengths.numel() else 0
        nck = max(1, math.ceil(longest / self.K))
        from .tir import lanes_for
        units, unit_shape = (d // g) // lanes_for(d // g, 8), (d,)
        parts = max(1, min(units, math.ceil(torch.get_num_threads() / max(1, nseq * g))))
        cx = (2,) if self.cplx else ()   # complex: (re, im) pairs, viewed as complex at the end
        ck = empty((nseq,) + unit_shape + (nck, n) + cx)
        zeroed = torch.zeros if p.cu_seqlens is not None else (lambda shape: empty(shape))
        token = tuple(args[0].shape)
        grads = {"x": zeroed(token)}
        grads["dt"] = zeroed(token) if fam.delta.selective else empty((nseq, d))
        grads["A"] = (zeroed(tuple(p.A.shape) + cx) if fam.A.selective
                      else empty((nseq, d, n) + cx))
        for w in ("B", "C"):
            grads[w] = (torch.zeros((parts, batch, g, seqlen, n) + cx)
                        if getattr(fam, w).selective else empty((nseq, d, n) + cx))
        optional = [k for k in ("D", "z", "bias") if k in names]
        for k in optional:
            grads[k] = zeroed(token) if k == "z" else empty((nseq, d))
        grads["h0"] = empty((nseq,) + unit_shape + (n,) + cx)
        dhT = f32(dfinal) if dfinal is not None else self.placeholders(state_shape)
        self.fn(*args, seg, f32(dout), dhT, ck, grads["x"], grads["dt"], grads["A"], grads["B"],
                grads["C"], *(grads[k] for k in optional), grads["h0"],
                int(init is not None), int(dfinal is not None), parts)
        for key in ("dt", "A"):
            if not getattr(fam, "delta" if key == "dt" else key).selective:
                grads[key] = grads[key].sum(0)
        for w in ("B", "C"):
            grads[w] = (grads[w].sum(0).transpose(2, 3) if getattr(fam, w).selective
                        else grads[w].sum(0))
        for k in ("D", "bias"):
            if k in grads:
                grads[k] = grads[k].sum(0)
        if self.cplx:
            for k in ("A", "B", "C", "h0"):
                grads[k] = torch.view_as_complex(grads[k])
        if init is None:
            grads.pop("h0")
        # the convention's names (buffers.py's short names for x, dt, dt_bias, initial)
        keyword = {name: op.name for name, op in self.inputs}
        return {keyword.get(k, k): v for k, v in grads.items()}


class SSDBackwardRunner(_SequenceRunner):
    """Binds an SSD Problem (scalar A) and the gradients of its outputs to
    ``ssmc_ssd_backward`` (ssd_backward.py); returns the gradients by argument name, fp32."""

    def __init__(self, plan, function, config: dict):
        super().__init__(plan)
        self.fn = function
        from . import ssd_backward
        self.K = ssd_backward.checkpoint(config)
        gen = ssd_backward._Gen(plan, config)
        self.planes = (len(gen.tc), len(gen.tacc))

    def __call__(self, p, dout, dfinal):
        import math
        fam = self.fam
        x, dt, bias, init, want, batch, seqlen, state_shape, seg = self._begin(p)
        check_cpu(dout, dfinal)
        nseq, n, g = seg.shape[0], fam.dims.state, fam.dims.groups
        heads, hdim = fam.dims.heads, fam.dims.head_dim
        args = self.kernel_inputs(p, state_shape)
        names = {name for name, _ in self.inputs}
        lengths = seg[:, 2] - seg[:, 1]
        longest = int(lengths.max()) if lengths.numel() else 0
        nck = max(1, math.ceil(longest / self.K))
        # a part is a range of a group's heads, one task each: enough for the threads
        parts = max(1, min(heads // g, math.ceil(torch.get_num_threads() / max(1, nseq * g))))
        # the checkpoints of the head a task is walking (ssd_backward.py)
        ck = empty((nseq * g * parts, nck, hdim, n))
        tc = empty((batch, heads, self.planes[0], seqlen))
        tacc = empty((batch, heads, self.planes[1], seqlen))
        # tokens outside every packed sequence are never written: zero
        token_alloc = torch.zeros if p.cu_seqlens is not None else (lambda shape: empty(shape))
        token = tuple(args[0].shape)
        grads = {"x": token_alloc(token), "dt": token_alloc((batch, seqlen, heads)),
                 "A": empty((nseq, heads))}
        for w in ("B", "C"):   # each part's sum over its heads, added into by the kernel
            grads[w] = torch.zeros((parts, batch, seqlen, g, n))
        optional = [k for k in ("D", "z", "bias") if k in names]
        for k in optional:
            if k == "z":
                grads[k] = token_alloc(token)
            elif k == "D" and dict(self.inputs)["D"].dims == ("h", "p"):
                grads[k] = empty((nseq, heads, hdim))
            else:
                grads[k] = empty((nseq, heads))
        grads["h0"] = empty((nseq, heads, hdim, n))
        dhT = f32(dfinal) if dfinal is not None else self.placeholders(state_shape)
        self.fn(*args, seg, f32(dout), dhT, ck, tc, tacc, grads["x"], grads["dt"], grads["A"],
                grads["B"], grads["C"], *(grads[k] for k in optional), grads["h0"],
                int(init is not None), int(dfinal is not None), parts)
        for k in ("A", "B", "C", "D", "bias"):
            if k in grads:
                grads[k] = grads[k].sum(0)
        if init is None:
            grads.pop("h0")
        keyword = {name: op.name for name, op in self.inputs}
        return {keyword.get(k, k): v for k, v in grads.items()}


# --------------------------------------------------------------------------------------------
# The decode step's call

class StepRunner:
    """Binds a StateUpdateProblem to ``ssmc_step``; ``problem.state`` is updated in place."""

    def __init__(self, plan: KernelPlan, function):
        self.fam = plan.family
        self.fn = function
        self.inputs = buffers.inputs(plan)   # ssmc_step's parameters, in its order

    def __call__(self, p):
        check_cpu(p.x, p.state)
        state = f32(p.state)
        args = [state] + [f32(getattr(p, op.name)) for _, op in self.inputs[1:]]
        y = empty(args[1].shape)
        args.append(y)
        self.fn(*args)
        if p.state.is_complex():
            shares = torch.view_as_real(p.state).data_ptr() == state.data_ptr() if \
                p.state.dtype == torch.complex64 else False
            if not shares:
                p.state.copy_(torch.view_as_complex(state))
        elif state.data_ptr() != p.state.data_ptr():
            p.state.copy_(state)
        return output(y, p.x), None


# --------------------------------------------------------------------------------------------
# The convolution's call

def _spectra(a: torch.Tensor, b: torch.Tensor):
    """(rfft of a, rfft of b's first L entries, n): float64, zero-padded to a power of two
    >= 2L, so that their products are linear (not circular) convolutions along the last axis."""
    L = a.shape[-1]
    nfft = 1
    while nfft < 2 * L:
        nfft *= 2
    return (torch.fft.rfft(a.to(torch.float64), n=nfft),
            torch.fft.rfft(b[..., :L].to(torch.float64), n=nfft), nfft)


def causal_conv(x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_k K[..., k] x[..., t - k] along the last axis (float64 FFT)."""
    xf, kf, nfft = _spectra(x, K)
    return torch.fft.irfft(xf * kf, n=nfft)[..., :x.shape[-1]].to(torch.float32)


def causal_correlation(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """c[..., k] = sum_t g[..., t] h[..., t - k] for k < L along the last axis (float64 FFT,
    zero-padded to 2L: no wrap-around): the adjoint of ``causal_conv`` in either argument."""
    gf, hf, nfft = _spectra(g, h)
    return torch.fft.irfft(gf * hf.conj(), n=nfft)[..., :g.shape[-1]]


def per_sequence(fn, xt: torch.Tensor, Kt: torch.Tensor, seg: torch.Tensor, varlen: bool):
    """``fn(x, K)`` along time for every sequence: the whole batch, or each packed piece."""
    if not varlen:
        return fn(xt, Kt)
    out = torch.zeros(xt.shape, dtype=torch.float32)
    for start, end in seg[:, 1:].tolist():
        if end > start:
            out[..., start:end] = fn(xt[..., start:end], Kt)
    return out


class ConvRunner(_SequenceRunner):
    """Binds a Problem to the convolution's two TIR functions and the FFT between them
    (conv.py says how the three steps divide the work)."""

    def __init__(self, plan: KernelPlan, module):
        super().__init__(plan)
        self.plan = plan
        self.matrix = is_matrix_conv(plan)
        self.kernel_fn = module["ssmc_conv_kernel"]
        self.boundary_fn = module["ssmc_conv_boundary"]

    def __call__(self, p):
        fam = self.fam
        x, dt, bias, init, want, batch, seqlen, state_shape, seg = self._begin(p)
        lengths = (seg[:, 2] - seg[:, 1])
        longest = max(int(lengths.max()) if lengths.numel() else 0, 1)
        units = fam.dims.heads if self.ssd else fam.dims.d_inner
        x32, dt32, A, B, C = (f32(t) for t in (x, dt, p.A, p.B, p.C))
        K = empty((units, longest))
        if self.matrix:   # the host's float64 Abar, Bbar B (Bbar_prev B) replace dt, A, B
            host = host_coefficients(self.plan, p)
            coefs = [host[k] for k in ("abar", "bbar_B", "bbar_prev_B", "C") if k in host]
            self.kernel_fn(*coefs, K)
        else:
            kargs = [dt32, A, B, C] + ([f32(bias)] if fam.delta.bias else []) + [K]
            self.kernel_fn(*kargs)
        # the convolution runs along time: (b, d, L) as is; SSD's (b, L, h, p) as (b, h, p, L)
        xt = x32.permute(0, 2, 3, 1) if self.ssd else x32
        Kt = K[:, None, :] if self.ssd else K
        ylin_t = per_sequence(causal_conv, xt, Kt, seg, p.cu_seqlens is not None)
        ylin = ylin_t.permute(0, 3, 1, 2).contiguous() if self.ssd else ylin_t
        if self.matrix:
            args = [x32] + coefs
        else:
            if not self.ssd:   # the boundary pass (scan generator) reads B/C token-major
                B = f32(token_major(p.B, fam.B.selective))
                C = f32(token_major(p.C, fam.C.selective))
            args = [x32, dt32, A, B, C]
        if fam.D is not None:
            args.append(f32(p.D))
        if fam.gate is not None:
            args.append(f32(p.z))
        if fam.delta.bias and not self.matrix:
            args.append(f32(bias))
        h0 = f32(init) if init is not None else self.placeholders(state_shape)
        y = empty(x32.shape)
        hT = empty((seg.shape[0],) + state_shape) if want else \
            self.placeholders(state_shape)
        args += [h0, seg, y, hT, ylin, int(init is not None), int(bool(want))]
        self.boundary_fn(*args)
        final = state_out(hT, self.cplx) if want else None
        return output(y, x), final


class ConvBackwardRunner(_SequenceRunner):
    """Binds a Problem (real or complex diagonal A, selective-scan layout) and the gradients
    of its outputs to the convolution's backward (conv_backward.py says how the three steps
    divide the work): K from the forward's generator, dK and the convolution's share of dx
    by FFT correlations here. Returns the gradients by argument name, fp32."""

    def __init__(self, plan: KernelPlan, forward_module, backward_module):
        super().__init__(plan)
        from . import conv_backward
        self.kernel_fn = forward_module["ssmc_conv_kernel"]
        self.boundary_fn = backward_module[conv_backward.BOUNDARY]
        self.adjoint_fn = backward_module[conv_backward.ADJOINT]
        self.trap = conv_backward._Gen(plan, {}).trap

    def __call__(self, p, dout, dfinal):
        fam = self.fam
        x, dt, bias, init, want, batch, seqlen, state_shape, seg = self._begin(p)
        check_cpu(dout, dfinal)
        varlen = p.cu_seqlens is not None
        lengths = seg[:, 2] - seg[:, 1]
        longest = max(int(lengths.max()) if lengths.numel() else 0, 1)
        nseq, d = seg.shape[0], fam.dims.d_inner
        x32, dt32, A, B, C = (f32(t) for t in (x, dt, p.A, p.B, p.C))
        params = [dt32, A, B, C] + ([f32(bias)] if fam.delta.bias else [])
        K = empty((d, longest))
        self.kernel_fn(*params, K)
        ylin = per_sequence(causal_conv, x32, K, seg, varlen)
        token = tuple(x32.shape)
        alloc = torch.zeros if varlen else empty   # packed tokens outside every piece stay 0
        dpre, dx = alloc(token), alloc(token)
        grads = {"D": empty((nseq, d))} if fam.D is not None else {}
        if fam.gate is not None:
            grads["z"] = alloc(token)
        part = state_shape[1:]                     # (n,) or (n, 2)
        names = ["gabar", "gbbar"] + (["gbprev"] if self.trap else []) + ["gB", "gC"]
        partial = {k: empty((nseq, d) + part) for k in names}
        dh0 = empty((nseq, d) + part)
        h0 = f32(init) if init is not None else self.placeholders(state_shape)
        dhT = f32(dfinal) if dfinal is not None else self.placeholders(state_shape)
        optional = ([f32(p.D)] if fam.D is not None else []) + \
            ([f32(p.z)] if fam.gate is not None else [])
        self.boundary_fn(x32, *params, *optional, h0, dhT, seg, ylin, f32(dout), dpre, dx,
                         *grads.values(), *partial.values(), dh0, int(init is not None),
                         int(dfinal is not None))
        # dK_k = sum over the batch of sum_t dpre_t x_(t-k); dx_s += sum_t dpre_t K_(t-s)
        if varlen:
            dK = torch.zeros((d, longest), dtype=torch.float64)
            for start, end in seg[:, 1:].tolist():
                if end > start:
                    piece = causal_correlation(dpre[..., start:end], x32[..., start:end])
                    dK[:, :end - start] += piece.sum(0)
        else:
            dK = causal_correlation(dpre, x32).sum(0)
        dx += per_sequence(lambda g, k: causal_correlation(g, k).to(torch.float32), dpre, K,
                           seg, varlen)
        out = {k: empty((d,) + part) for k in ("A", "B", "C")}
        out["dt"] = empty((d,))
        if fam.delta.bias:
            out["bias"] = empty((d,))
        self.adjoint_fn(*params, dK.to(torch.float32).contiguous(),
                        *(v.sum(0) for v in partial.values()), *out.values())
        key = self.plan.operands.keyword
        result = {key["x"]: dx, key["dt"]: out["dt"], "A": out["A"]}
        for name in ("B", "C"):   # per channel; a group's channels share one row
            g = out[name]
            rows = getattr(p, name).shape[0]
            result[name] = g.reshape((rows, d // rows) + part).sum(1) if rows != d else g
        if fam.delta.bias:
            result[key["dt_bias"]] = out["bias"]
        if fam.D is not None:
            result["D"] = grads["D"].sum(0)
        if fam.gate is not None:
            result["z"] = grads["z"]
        if init is not None:
            result[key["initial"]] = dh0
        if self.cplx:
            for name in ("A", "B", "C", key["initial"]):
                if name in result:
                    result[name] = torch.view_as_complex(result[name].contiguous())
        return result


def runner(plan: KernelPlan, module):
    """``runner(problem) -> (y, final_state_or_None)`` for the plan's compiled module."""
    if plan.algorithm is Algorithm.CONV:
        return ConvRunner(plan, module)
    if plan.algorithm is Algorithm.STEP:
        return StepRunner(plan, module["ssmc_step"])
    return ScanRunner(plan, module["ssmc_scan"])   # SCAN, and CHUNKED (chunked.py says why)
