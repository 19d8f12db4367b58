"""The Python entry points: parse a spec, compile a family for a target, get a callable.

A compiled family is a ``CompiledKernel``: call it with mamba_ssm's arguments
(docs/calling_convention.md). Arguments are validated by ``ssmc.signature.bind`` before any
kernel launches.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ssmc import backends

from .errors import CallError, SSMCError, TargetError
from .ir import Algorithm, Convention, KernelPlan, SpecFile, SSMFamily
from .plan import convention_of, ir_hash, make_plan


# --------------------------------------------------------------------------------------------
# Spec input

def _looks_like_path(s: str) -> bool:
    return "\n" not in s and "{" not in s and (s.endswith(".ssm") or os.path.exists(s))


def parse(spec_or_path: Union[str, os.PathLike, SpecFile]) -> SpecFile:
    """Parse and check a spec given as text, a path, or an already-parsed SpecFile."""
    from . import frontend
    if isinstance(spec_or_path, SpecFile):
        return spec_or_path
    if isinstance(spec_or_path, os.PathLike) or (isinstance(spec_or_path, str)
                                                  and _looks_like_path(spec_or_path)):
        path = Path(spec_or_path)
        if not path.exists():
            raise SSMCError(f"no such spec file: {path}")
        return frontend.parse_file(path)
    return frontend.parse(spec_or_path)


def _family(spec, family: Optional[str]) -> SSMFamily:
    if isinstance(spec, SSMFamily):
        return spec
    spec_file = parse(spec)
    try:
        return spec_file.family(family)
    except (KeyError, ValueError) as e:
        raise SSMCError(e.args[0]) from None


# --------------------------------------------------------------------------------------------
# Targets

@dataclass(frozen=True)
class Target:
    """A parsed target string: which backend, and what it needs to know about the machine."""
    name: str                      # as written: cuda, cuda:sm_90, cpu, llvm ..., c, aarch64, riscv64
    backend: str                   # module under ssmc.backends
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def runs_here(self) -> bool:
        """Cross targets produce artifacts; they run only under an emulator."""
        return "triple" not in self.options

    @property
    def capabilities(self):
        """What this target's backend compiles and where its kernels run (ssmc.backends)."""
        return backends.get(self.backend).CAPABILITIES

    @property
    def device(self) -> str:
        """Where this target's kernels take their tensors now, ``cuda`` or ``cpu``: a cuda
        backend's interpreter (TRITON_INTERPRET=1) runs its kernels on the CPU, and a backend
        that takes tensors anywhere (the reference) is given them on the CPU."""
        return self.capabilities.device_now()

    def require_device(self) -> None:
        """A TargetError, before anything is built or drawn, when this target's device is not
        here (a cuda target on a machine whose torch sees no GPU)."""
        if self.device != "cuda":
            return
        import torch
        if not torch.cuda.is_available():
            raise TargetError(
                f"target {self.name} runs its kernels on an NVIDIA GPU and torch sees none here: "
                "use target cpu, a machine with a GPU and a CUDA build of torch, or "
                "TRITON_INTERPRET=1 to run the Triton kernels (slowly) on the CPU")


def parse_target(name: str) -> Target:
    """The Target a target string names (``ssmc.backends.target`` knows the names)."""
    backend, options = backends.target(name)
    return Target(name.strip(), backend, options)


def backend_module(target: Target):
    """The backend that compiles for ``target`` (ssmc.backends.get)."""
    return backends.get(target.backend)


def resolve_config(plan: KernelPlan, target: Target, config: Optional[dict] = None) -> dict:
    """The backend's default config, overridden by a tuned one, by the caller's and by the
    target's options; support checked first (``ssmc.backends.resolve_config``, once per
    compile: the backend takes the result as given)."""
    return backends.resolve_config(backend_module(target), plan, _tuned_config(plan, target),
                                   config, target.options)


def artifact_cache():
    """The artifact cache passed to the backends (``$SSMC_CACHE_DIR``, else ~/.cache/ssmc)."""
    from ssmc.runtime.cache import default_cache
    return default_cache()


def _tuned_config(plan: KernelPlan, target: Target) -> Optional[dict]:
    try:
        from ssmc.runtime import tuning_db
    except ImportError:
        return None
    lookup = getattr(tuning_db, "lookup_for_plan", None)
    return lookup(plan, target.name) if lookup else None


# --------------------------------------------------------------------------------------------
# The compiled callable

_MAIN_INPUT = {Convention.SSD: "x", Convention.SELECTIVE_SCAN: "u", Convention.STATE_UPDATE: "state"}


class CompiledKernel:
    """A compiled family: call it like the mamba_ssm function of its convention.

    Sizes come from the tensors: a call whose heads, head_dim, channels, state or groups differ
    from the spec's ``dims`` runs a kernel specialized for them, built on first use and kept
    per size (across processes in the backends' caches, keyed by the IR, which holds the sizes).
    ``plan``, ``config`` and ``source`` describe the kernel at the spec's sizes. Where the spec
    leaves a size open (``channels = any``) nothing is built before a call; ``config`` is None
    and ``source`` says which sizes it needs.
    """

    def __init__(self, plan: KernelPlan, target: Target, config: dict, kernel,
                 user_config: Optional[dict] = None):
        self.plan = plan
        self.family: SSMFamily = plan.family
        self.target = target
        self.config = config
        self.convention = convention_of(plan)
        self._kernel = kernel
        self._user_config = user_config
        self._sized: Dict[object, Any] = {}
        self._lock = threading.Lock()
        self._step: Optional[CompiledKernel] = None
        # The op is registered now, not at the first traced call: dynamo cannot trace the
        # registration (it hashes the IR's sympy expressions).
        from ssmc.runtime import gradients, ops
        from . import signature
        self._op = ops.as_op(self)
        # Looked up once: a decode step's host time is spent per call.
        import torch
        self._bind, self._gradients = signature.bind, gradients
        self._is_compiling = torch.compiler.is_compiling
        self._devices_checked: set = set()

    def __repr__(self):
        return (f"<ssmc {self.family.name} {self.plan.algorithm.value} for {self.target.name} "
                f"({self.convention.value} convention)>")

    def __call__(self, *args, **kwargs):
        if self._is_compiling():
            # Under torch.compile the call is the registered op (runtime/ops.py), which dynamo
            # traces as one node; eagerly the op would only add its dispatch to every call.
            return self.as_op()(*args, **kwargs)
        problem = self._bind(self.family, self.convention, args, kwargs)
        device = problem.input.device
        if device not in self._devices_checked:
            self._check_device(problem)
            self._devices_checked.add(device)
        kernel = self.kernel_for(problem.family)
        if problem.convention is Convention.STATE_UPDATE and problem.state_batch_indices is not None \
                and Algorithm.STEP not in self.target.capabilities.indexed_state:
            kernel = functools.partial(_on_slots, kernel)
        gradients = self._gradients
        sources = gradients.sources_of((*args, *kwargs.values()))
        if not sources:
            return problem.outputs(*kernel(problem))
        if getattr(kernel, "backward", None) is not None:
            return problem.outputs(*gradients.with_backward(kernel, problem))
        # Some backends compute parts with torch ops (the conv's FFT); without no_grad those
        # would record a partial graph, a silently wrong gradient.
        import torch
        with torch.no_grad():
            y, final = kernel(problem)
        return gradients.no_backward(gradients.message_for(self, kernel),
                                     problem.outputs(y, final), sources)

    @property
    def backward_refusal(self) -> Optional[str]:
        """Why this target generates no backward kernel for the plan (None when it does)."""
        refusal = getattr(backend_module(self.target), "backward_refusal", None)
        if refusal is None:
            return f"target {self.target.name} generates no backward kernels yet"
        return refusal(self.plan)

    def backward_call(self, kwargs: dict, dout, *dstates) -> Dict[str, Any]:
        """Gradients of a call's outputs (y, then the state outputs it asked for) given theirs
        (None: zero), keyed by argument name and shaped like the arguments the call passed: what
        the torch op's registered backward runs (runtime/ops.py)."""
        import torch
        problem = self._bind(self.family, self.convention, (), kwargs)
        kernel = self.kernel_for(problem.family)
        if dout is None:
            dout = torch.zeros_like(problem.input)
        # the op's state outputs are what Problem.outputs makes of the kernels' per-sequence
        # final state; their gradients go back through its adjoint
        dfinal = problem.state_gradient(*dstates)
        grads = kernel.backward(problem, dout, dfinal)
        out = {}
        for name, g in grads.items():
            given = kwargs.get(name)
            if given is None:
                continue
            if g.shape != given.shape:   # bind's view of it: (b, n, l) B as (b, 1, n, l)
                g = g.reshape(given.shape) if g.numel() == given.numel() else g.sum_to_size(given.shape)
            out[name] = g.to(given.dtype)
        return out

    def as_op(self):
        """This callable through its torch.library custom op (what torch.compile traces)."""
        return self._op

    def kernel_for(self, family: SSMFamily):
        """The backend kernel for ``family`` (this family at other sizes, or without the terms a
        call omitted), built on first use."""
        if family is self.family and self._kernel is not None:
            return self._kernel
        kernel = self._sized.get(family)
        if kernel is None:
            with self._lock:
                kernel = self._sized.get(family)
                if kernel is None:
                    plan = make_plan(family, self.plan.algorithm)
                    config = resolve_config(plan, self.target, self._user_config)
                    kernel = backend_module(self.target).build(plan, config,
                                                               artifact_cache())
                    self._sized[family] = kernel
        return kernel

    def _check_device(self, problem):
        name = _MAIN_INPUT[self.convention]
        tensor = getattr(problem, name)
        is_cuda = tensor.device.type == "cuda"
        if self.target.device == "cuda" and not is_cuda:
            raise CallError(f"{name} is on {tensor.device}, but target {self.target.name} runs on a "
                            "CUDA device (or set TRITON_INTERPRET=1 to run the kernels on the CPU)")
        if self.target.capabilities.device == "cpu" and is_cuda:
            raise CallError(f"{name} is on {tensor.device}, but target {self.target.name} runs on "
                            "the CPU; move the tensors with .cpu()")

    def example_inputs(self, batch: int = 2, seqlen: int = 64, dtype: str = "float32",
                       device: Optional[str] = None, seed: int = 0, **options) -> dict:
        """Random, valid keyword arguments for this callable's own signature; sizes other than
        the spec's as keywords (``heads=``, ``head_dim=``, ``channels=``, ``state=``,
        ``groups=``, ``rank=``), besides ``with_state`` and ``varlen``."""
        from . import signature
        if device is None:
            self.target.require_device()
            device = self.target.device
        sizes = {k: v for k, v in options.items() if k not in ("with_state", "varlen")}
        options = {k: v for k, v in options.items() if k not in sizes}
        family = signature.resized(self.family, **sizes) if sizes else self.family
        return signature.example_inputs(family, self.convention, batch, seqlen, dtype=dtype,
                                        device=device, seed=seed, **options)

    @property
    def step(self) -> "CompiledKernel":
        """The decode step (selective_state_update convention) of the same family and target."""
        if self.plan.algorithm is Algorithm.STEP:
            return self
        if self._step is None:
            self._step = compile(self.family, target=self.target.name, algorithm=Algorithm.STEP,
                                 config=self._user_config)
        return self._step

    @property
    def source(self) -> str:
        """The generated source, as ``ssmc compile`` writes it."""
        config = self.config or resolve_config(self.plan, self.target, self._user_config)
        return backend_module(self.target).lower(self.plan, config)


def _on_slots(kernel, problem):
    """The decode step on a pool of states, for a backend whose kernel takes one state per
    batch row: the rows' slots are gathered, stepped and written back; a padded row's slot is
    neither read nor written and its y is zero. (The tensors are on the CPU here: reading the
    indices costs no sync.)"""
    import dataclasses
    import torch
    from .signature import live_slots
    pool, idx = problem.state, problem.state_batch_indices
    live = live_slots(idx, problem.pad_slot_id, pool.shape[0])
    slots = idx[live].long()
    own = torch.zeros((idx.shape[0],) + tuple(pool.shape[1:]), dtype=pool.dtype,
                      device=pool.device)
    own[live] = pool[slots]
    y, final = kernel(dataclasses.replace(problem, state=own, state_batch_indices=None))
    pool[slots] = own[live]
    y[~live] = 0
    return y, final


def compile(spec_or_path, target: str = "reference", family: Optional[str] = None,  # noqa: A001
            algorithm: Union[Algorithm, str, None] = None, config: Optional[dict] = None,
            debug: Optional[bool] = None) -> CompiledKernel:
    """Compile one family of a spec for ``target``; see CompiledKernel.

    ``debug`` prints every stage (IR, discretization, plan, source) to stderr; None reads
    ``SSMC_DEBUG=1`` from the environment, here at the edge, as the CLI does.
    """
    from . import debug as debug_stages
    show = debug_stages.enabled(debug)
    fam = _family(spec_or_path, family)
    tgt = parse_target(target)
    if not tgt.runs_here:
        raise TargetError(f"target {tgt.name} cross-compiles: use `ssmc compile SPEC --target "
                          f"{tgt.name} -o DIR` to get its library and sources")
    if isinstance(algorithm, str):
        algorithm = Algorithm(algorithm)
    plan = make_plan(fam, algorithm)
    if fam.dims.open:
        # Sizes left to the call: each is built at the first call with its sizes.
        return CompiledKernel(plan, tgt, None, None, user_config=config)
    cfg = resolve_config(plan, tgt, config)
    backend = backend_module(tgt)
    if show:
        debug_stages.print_stages(plan, tgt.name, cfg, backend.lower(plan, cfg))
    kernel = backend.build(plan, cfg, artifact_cache())
    return CompiledKernel(plan, tgt, cfg, kernel, user_config=config)


__all__ = ["parse", "compile", "parse_target", "Target", "CompiledKernel", "resolve_config",
           "artifact_cache", "ir_hash"]
