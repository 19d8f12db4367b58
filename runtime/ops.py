"""Compiled kernels as ``torch.library`` custom ops, so models using them compile with dynamo.

``as_op(kernel)`` returns a function with the kernel's own signature
(docs/calling_convention.md) that calls one registered op. The op's fake implementation states
output shapes and dtypes from the input shapes and the family alone, which is all
``torch.compile(fullgraph=True)`` needs; the real implementation is the kernel (Triton, TVM, C
or the float64 reference, whose numpy inside would otherwise break the graph).

One op exists per kernel identity (family, algorithm, target, config); building the same kernel
again rebinds the op to the new callable instead of registering a second op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from typing import Callable, Dict, List, Sequence

import torch

from ssmc.errors import CallError
from ssmc.ir import AStructure, Convention, DType
from ssmc.problems import KEYWORD_ONLY, MUTATED, OUTPUT_FLAGS, POSITIONAL, PROBLEMS

from . import gradients

_NAMESPACE = "ssmc"

# Problem field types (ssmc/problems.py) as op schema types. A field with a default is optional
# in the op too: None means the term is absent, or the spec's value.
_SCHEMA_TYPES = {"torch.Tensor": "Tensor", "Optional[torch.Tensor]": "Tensor",
                 "Optional[int]": "SymInt", "int": "int", "bool": "bool",
                 "Tuple[float, float]": "float[]"}


def schema_of(convention: Convention) -> str:
    """The op schema of a convention, read off its Problem dataclass (the one statement of its
    arguments, their order and their optionality). The op always returns (y, final_state) where
    the convention has a final state (empty when not asked for: an op's number of outputs
    cannot depend on a flag; SSD adds the varlen states), and y alone for the decode step, which updates its state."""
    problem = PROBLEMS[convention]
    names = set(problem.argument_names())
    parts = []
    for f in dataclasses.fields(problem):
        if f.name not in names:
            continue
        kind = _SCHEMA_TYPES[f.type] + ("(a!)" if f.name in MUTATED[convention] else "")
        optional = f.default is not dataclasses.MISSING
        parts.append(f"{kind}{'?' if optional else ''} {f.name}")
    count = 1 + len(OUTPUT_FLAGS[convention])
    outputs = f"({', '.join(['Tensor'] * count)})" if count > 1 else "Tensor"
    return f"({', '.join(parts)}) -> {outputs}"


ARGUMENT_NAMES = {conv: problem.argument_names() for conv, problem in PROBLEMS.items()}


# name -> the CompiledKernel the op currently runs
_KERNELS: Dict[str, object] = {}
_OPS: Dict[str, object] = {}

_STATE_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64,
                 DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


def _state_dtype(family) -> torch.dtype:
    dtype = _STATE_DTYPES.get(family.dtypes.state, torch.float32)
    if family.A.structure is AStructure.COMPLEX_DIAGONAL:
        return torch.complex128 if dtype == torch.float64 else torch.complex64
    return dtype


def op_name(kernel) -> str:
    """A stable op name for a kernel: family, algorithm, target and a hash of IR + config."""
    from ssmc.plan import ir_hash
    ident = json.dumps({"ir": ir_hash(kernel.plan), "target": kernel.target.name,
                        "config": kernel.config}, sort_keys=True, default=str)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    family = re.sub(r"\W", "_", kernel.family.name)
    target = re.sub(r"\W", "_", kernel.target.backend)
    return f"{family}_{kernel.plan.algorithm.value}_{target}_{digest}"


def _state_output_shape(kernel, bound: dict, flag: str):
    """The shape of the state output ``flag`` asks for, read off the operand table with the
    sizes of this call's tensors (the family compiles for any size consistent with its
    structure): one state per sequence, except SSD's final_states, one per batch row."""
    from ssmc.operands import Role, shape_of
    from ssmc.signature import sizes_from_shapes
    table = kernel.plan.operands
    cu_seqlens = bound["cu_seqlens"]
    shapes = {k: tuple(v.shape) for k, v in bound.items() if isinstance(v, torch.Tensor)}
    sizes = sizes_from_shapes(kernel.family, kernel.convention, shapes)
    per_row = flag == "return_final_states"
    sizes["s"] = (cu_seqlens.shape[0] - 1 if cu_seqlens is not None and not per_row
                  else sizes["b"])
    final = next(op for op in table.outputs if op.role is Role.FINAL_STATE)
    return shape_of(final, sizes)


def _register(name: str, kernel):
    convention = kernel.convention
    qualname = f"{_NAMESPACE}::{name}"
    state_dtype = _state_dtype(kernel.family)

    if convention is Convention.STATE_UPDATE:
        def real(*args):
            y = _KERNELS[name](**_call_kwargs(convention, args))
            return _fresh(y, args)

        def fake(*args):
            x = args[1]
            return x.new_empty(x.shape)

        op = torch.library.custom_op(qualname, real, mutates_args=MUTATED[convention],
                                     schema=schema_of(convention))
        op.register_fake(fake)
        return op

    flags = OUTPUT_FLAGS[convention]

    def real(*args):
        call = _call_kwargs(convention, args)
        out = _KERNELS[name](**call)
        asked = iter(out[1:] if isinstance(out, tuple) else ())
        main = args[0]
        y = (out[0] if isinstance(out, tuple) else out).to(main.dtype)
        states = [next(asked).to(state_dtype) if call.get(flag) else
                  main.new_empty((0,), dtype=state_dtype) for flag in flags]
        outs = []
        for t in (y, *states):      # SSD's final_states is a view of its varlen_states
            outs.append(_fresh(t, (*args, *outs)))
        return tuple(outs)

    def fake(*args):
        bound = dict(zip(ARGUMENT_NAMES[convention], args))
        main = args[0]
        states = [main.new_empty(_state_output_shape(kernel, bound, flag) if bound[flag]
                                 else (0,), dtype=state_dtype) for flag in flags]
        return (main.new_empty(main.shape), *states)

    op = torch.library.custom_op(qualname, real, mutates_args=(), schema=schema_of(convention))
    op.register_fake(fake)
    if kernel.backward_refusal is None:
        _register_backward(name, qualname, op, kernel)
    return op


def _tensor_positions(convention: Convention) -> List[int]:
    """Positions of the op's tensor arguments (each gets a gradient slot in the backward op)."""
    problem = PROBLEMS[convention]
    types = {f.name: f.type for f in dataclasses.fields(problem)}
    return [i for i, n in enumerate(ARGUMENT_NAMES[convention]) if "Tensor" in types[n]]


def _register_backward(name: str, qualname: str, op, kernel):
    """The op's backward: a second custom op running the generated backward kernel (so that
    torch.compile traces it as one node too), registered with ``register_autograd``. It returns
    one gradient per tensor argument (empty where the argument was omitted or takes none)."""
    convention = kernel.convention
    flags = OUTPUT_FLAGS[convention]
    positions = _tensor_positions(convention)
    names = ARGUMENT_NAMES[convention]
    forward_params = schema_of(convention).split(" -> ")[0][1:-1]
    grad_params = ", ".join(["Tensor? grad_y"] + [f"Tensor? grad_{f}" for f in flags])
    schema = f"({grad_params}, {forward_params}) -> Tensor[]"
    count = 1 + len(flags)
    from ssmc.operands import Role
    differentiable = {o.name for o in kernel.plan.operands.arguments if o.is_tensor and o.role in
                      (Role.INPUT, Role.PARAMETER, Role.INITIAL_STATE)}

    def real(*args):
        dout, dstates, fwd = args[0], args[1:count], args[count:]
        call = _call_kwargs(convention, fwd)
        grads = _KERNELS[name].backward_call(call, dout, *dstates)
        out = []
        for i in positions:
            given, g = fwd[i], grads.get(names[i])
            out.append(g.contiguous() if g is not None else
                       (given if given is not None else fwd[0]).new_empty((0,)))
        return [_fresh(g, fwd) for g in out]

    def fake(*args):
        fwd = args[count:]
        return [fwd[i].new_empty(fwd[i].shape) if fwd[i] is not None and names[i] in differentiable
                else fwd[0].new_empty((0,)) for i in positions]

    backward_op = torch.library.custom_op(f"{qualname}_backward", real, mutates_args=(),
                                          schema=schema)
    backward_op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        ctx.present = [i for i in positions if inputs[i] is not None]
        ctx.others = [None if i in positions else v for i, v in enumerate(inputs)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.present))

    def backward(ctx, *grads):
        args = list(ctx.others)
        for i, t in zip(ctx.present, ctx.saved_tensors):
            args[i] = t
        grads = [g if g is not None and g.numel() else None for g in grads]
        out = backward_op(*grads, *args)
        result = [None] * len(args)
        for j, i in enumerate(positions):
            if args[i] is not None and ctx.needs_input_grad[i] and out[j].shape == args[i].shape:
                result[i] = out[j]
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _op_value(value):
    """A call's value as the op schema takes it (a pair such as dt_limit as a list)."""
    return list(value) if isinstance(value, tuple) else value


def _python_signature(convention: Convention) -> inspect.Signature:
    """The wrapper's signature as help() and IDEs show it: the convention's arguments, the
    keyword-only ones last, every optional one defaulting to None."""
    problem = PROBLEMS[convention]
    positional, keyword_only = POSITIONAL[convention], KEYWORD_ONLY[convention]
    required = {f.name for f in dataclasses.fields(problem)
                if f.default is dataclasses.MISSING and f.name in positional}
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if n in required else None)
              for n in positional]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
               for n in keyword_only]
    return inspect.Signature(params)


def _call_kwargs(convention, args) -> dict:
    """The op's positional arguments as the kernel's keyword arguments (None = omitted)."""
    call = {k: v for k, v in zip(ARGUMENT_NAMES[convention], args) if v is not None}
    if isinstance(call.get("dt_limit"), list):
        call["dt_limit"] = tuple(call["dt_limit"])
    return call


def _fresh(out: torch.Tensor, args: Sequence) -> torch.Tensor:
    """The output as the fake implementation promises it: contiguous, and not an input or a
    view of one (custom ops may not alias their inputs; compiled graphs assume the strides)."""
    out = out.contiguous()
    ptr = out.untyped_storage().data_ptr() if out.numel() else None
    if ptr is not None and any(isinstance(a, torch.Tensor) and a.numel()
                               and a.untyped_storage().data_ptr() == ptr for a in args):
        out = out.clone()
    return out


def get_op(kernel):
    """The registered op running ``kernel`` (registering it on first use)."""
    name = op_name(kernel)
    _KERNELS[name] = kernel
    if name not in _OPS:
        _OPS[name] = _register(name, kernel)
    return _OPS[name]


def as_op(kernel) -> Callable:
    """A function with ``kernel``'s signature that calls it through a torch custom op.

    The function is plain Python over one op call, so dynamo traces it without a graph break;
    inside the op the kernel runs eagerly. Where the backend generates the backward kernel
    the op's registered autograd runs it (``_register_backward``); elsewhere a backward through
    the op raises an SSMCError naming the family and why (runtime/gradients.py).
    """
    op = get_op(kernel)
    convention = kernel.convention
    refusal = None if kernel.backward_refusal is None else gradients.message_for(kernel)

    names = ARGUMENT_NAMES[convention]
    required = [f.name for f in dataclasses.fields(PROBLEMS[convention])
                if f.name in names and f.default is dataclasses.MISSING]
    flags = OUTPUT_FLAGS[convention]

    def fn(*args, **kwargs):
        from ssmc.signature import collect
        values = collect(convention, args, kwargs)   # a CallError for an unknown argument
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise CallError(f"argument {missing[0]!r} is missing: the {convention.value} "
                            f"convention needs {', '.join(required)}")
        op_args = tuple(_op_value(values.get(name)) for name in names)
        if kernel.backward_refusal is None:
            out = op(*op_args)   # differentiable through the op's registered backward
        else:
            # No backward kernel: the op runs on detached inputs and its outputs get a grad_fn
            # that raises (runtime/gradients.py), so a forward with trainable parameters works
            # and loss.backward() says why it cannot.
            sources = gradients.sources_of(op_args)
            out = op(*gradients.detached(op_args)) if sources else op(*op_args)
            out = gradients.no_backward(refusal, out, sources)
        if not flags:
            return out
        asked = tuple(t for flag, t in zip(flags, out[1:]) if values.get(flag))
        return (out[0], *asked) if asked else out[0]

    fn.__signature__ = _python_signature(convention)
    fn.__name__ = f"{kernel.family.name}_{kernel.plan.algorithm.value}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"{kernel!r} through the custom op {_NAMESPACE}::{op_name(kernel)}"
    fn.kernel = kernel
    fn.family = kernel.family
    fn.op = op
    return fn


__all__ = ["as_op", "get_op", "op_name"]
