"""Gradients through ssmc kernels: the generated backward where the backend has one, else a
clear error.

A compiled kernel's outputs are computed outside autograd (Triton, TVM, C and numpy know nothing
of it). ``with_backward`` runs the kernel inside an ``autograd.Function`` whose backward is the
backend's generated backward kernel (``kernel.backward(problem, dout, dfinal)``, a dict of
gradients keyed by argument name): the gradients flow to the bound problem's tensors, and through
``bind``'s views (an inserted group axis, say) to the caller's. Where the backend generates no
backward for the plan, ``no_backward`` gives each output a ``grad_fn`` whose backward raises an
``SSMCError`` naming the family and the reason (without it the outputs would have no
``grad_fn``: ``loss.backward()`` would fail with torch's generic message, or silently leave the
SSM inputs without gradients when the loss also depends on other parameters).

The error is raised when the backward *runs*, not when it is traced: under ``torch.compile``
outside ``no_grad`` the joint forward/backward graph is traced with fake tensors, so the backward
calls the op ``ssmc::no_backward``, whose fake implementation only states the gradient's shape
and whose real implementation raises. The forward of a compiled model therefore keeps working
with parameters that require grad; only ``loss.backward()`` stops, with the reason.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ssmc.errors import SSMCError


def message_for(kernel, backend_kernel=None) -> str:
    """Why ``kernel`` (a CompiledKernel) cannot be differentiated; ``backend_kernel``, the one a
    call ran, may say why its backend generated no backward."""
    reason = getattr(backend_kernel, "backward_refusal", None) or kernel.backward_refusal
    return (f"no backward kernel for the compiled {kernel.family.name} "
            f"({kernel.plan.algorithm.value}, target {kernel.target.name}): {reason}; the "
            "kernel is inference-only here: run it under torch.no_grad() or "
            "torch.inference_mode() (what trains today: the selective scan with real or "
            "complex diagonal A on the cuda and cpu targets; SSD on cuda and cpu;"
            " the convolution of real or complex diagonal A on cuda and cpu)")


def differentiable_names(problem, plan) -> List[str]:
    """The problem's tensors a gradient is computed for: the inputs, parameters and initial
    state the operand table lists and the call passed, floating point."""
    from ssmc.operands import Role
    roles = (Role.INPUT, Role.PARAMETER, Role.INITIAL_STATE)
    out = []
    for op in plan.operands.tensors():
        value = getattr(problem, op.name, None)
        if op.role in roles and isinstance(value, torch.Tensor) and (
                value.is_floating_point() or value.is_complex()):
            out.append(op.name)
    return out


class _Generated(torch.autograd.Function):
    """The kernel's forward, and its generated backward kernel as the backward."""

    @staticmethod
    def forward(ctx, kernel, problem, names, *tensors):
        ctx.set_materialize_grads(False)
        y, final = kernel(problem)
        ctx.kernel, ctx.problem, ctx.names = kernel, problem, names
        ctx.save_for_backward(*tensors)
        ctx.with_final = final is not None
        return (y, final) if final is not None else y

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        import dataclasses
        tensors = ctx.saved_tensors
        problem = dataclasses.replace(ctx.problem, **dict(zip(ctx.names, tensors)))
        if dout is None:
            dout = torch.zeros_like(problem.input)
        grads = ctx.kernel.backward(problem, dout, dfinal)
        out = []
        for name, t, needed in zip(ctx.names, tensors, ctx.needs_input_grad[3:]):
            g = grads.get(name) if needed else None
            out.append(None if g is None else g.to(t.dtype))
        return (None, None, None, *out)


def with_backward(kernel, problem) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, final state or None) of ``kernel`` on ``problem``, differentiable through the
    backend's generated backward kernel (``kernel.backward``)."""
    names = differentiable_names(problem, kernel.plan)
    out = _Generated.apply(kernel, problem, tuple(names), *(getattr(problem, n) for n in names))
    return out if isinstance(out, tuple) else (out, None)


@torch.library.custom_op("ssmc::no_backward", mutates_args=())
def _refuse(grad: torch.Tensor, shape: List[int], message: str) -> torch.Tensor:
    raise SSMCError(message)


@_refuse.register_fake
def _(grad, shape, message):
    return grad.new_empty(shape)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, message: str, output: torch.Tensor, *sources: torch.Tensor):
        ctx.message = message
        ctx.shapes = [list(s.shape) for s in sources]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + tuple(_refuse(grad, shape, ctx.message) for shape in ctx.shapes)


def sources_of(values: Sequence) -> List[torch.Tensor]:
    """The tensors among ``values`` that autograd would differentiate with respect to."""
    if not torch.is_grad_enabled():
        return []
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def detached(values: Sequence) -> tuple:
    """``values`` with every tensor that requires grad detached (the kernel never records a
    graph of its own: the only path back is the refusing grad_fn)."""
    return tuple(v.detach() if isinstance(v, torch.Tensor) and v.requires_grad else v
                 for v in values)


Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def no_backward(message: str, outputs: Outputs, sources: Sequence[torch.Tensor]) -> Outputs:
    """``outputs`` (a tensor or a tuple of them) with a grad_fn that refuses, reaching
    ``sources``; unchanged when there is nothing to differentiate."""
    if not sources:
        return outputs

    def wrap(out):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() and not out.is_complex():
            return out
        return _NoBackward.apply(message, out, *sources)

    if isinstance(outputs, tuple):
        return tuple(wrap(o) for o in outputs)
    return wrap(outputs)


__all__ = ["no_backward", "with_backward", "sources_of", "detached", "message_for",
           "differentiable_names"]
