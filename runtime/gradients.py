"""Until backward kernels are generated, a gradient through an ssmc kernel is a clear error.

A compiled kernel's outputs are computed outside autograd (Triton, TVM, C and numpy know nothing
of it), so without this the outputs would either have no ``grad_fn`` (``loss.backward()`` then
fails with torch's generic message, or silently leaves the SSM inputs without gradients when
the loss also depends on other parameters) or torch would complain that no autograd formula is
registered. ``no_backward`` gives each output a ``grad_fn`` whose backward raises an
``SSMCError`` naming the family.

The error is raised when the backward *runs*, not when it is traced: under ``torch.compile``
outside ``no_grad`` the joint forward/backward graph is traced with fake tensors, so the backward
calls the op ``ssmc::no_backward``, whose fake implementation only states the gradient's shape
and whose real implementation raises. The forward of a compiled model therefore keeps working
with parameters that require grad; only ``loss.backward()`` stops, with the reason.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from ssmc.errors import SSMCError


def message_for(kernel) -> str:
    return (f"ssmc generates no backward kernels yet: the compiled {kernel.family.name} "
            f"({kernel.plan.algorithm.value}, target {kernel.target.name}) is inference-only; "
            "run it under torch.no_grad() or torch.inference_mode()")


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


__all__ = ["no_backward", "sources_of", "detached", "message_for"]
