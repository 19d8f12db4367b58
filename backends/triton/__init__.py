"""The Triton backend (target ``cuda``): one kernel generator per algorithm.

The backend interface (each folder of backends/ implements it): ``supports``,
``default_config``, ``check_config``, ``candidates``, ``lower`` (the generated module's source),
``build`` (a callable ``kernel(problem) -> (y, final_state_or_None)``, with
``kernel.backward(problem, dout, dfinal) -> {argument: gradient}`` where a backward kernel is
generated, else ``kernel.backward_refusal``, the reason), ``write_artifact`` and ``time_kernel``. Each algorithm lives in its own module:

- ``scan``    SCAN: selective scan, diagonal / complex-diagonal A (selective_scan_fn convention)
- ``step``    STEP: decode step, state updated in place (selective_state_update convention)
- ``conv``    CONV: LTI families, a generated kernel builds the convolution kernel K, torch.fft
- ``chunked`` CHUNKED: SSD (mamba_chunk_scan_combined convention)

A generated module imports only torch and triton and exposes ``forward(**tensors)``; ``build``
imports it from an entry of the artifact cache it is given (``codegen.load_module``) and maps a bound ``Problem`` onto it.
"""
from __future__ import annotations

import importlib
import inspect
import operator
import os
from typing import Callable, List, Optional

from ssmc.backends import ALL_STRUCTURES, ELEMENTWISE, Capabilities
from ssmc.ir import Algorithm, AStructure, DType, KernelPlan
from ssmc.problems import FINAL_STATE_FLAG

from . import codegen

# Tensors on a CUDA device (on the CPU under TRITON_INTERPRET=1). The generators add their own
# limits (the largest state, Abar > 0 for chunked).
CAPABILITIES = Capabilities(
    "cuda", ((Algorithm.SCAN, frozenset({AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL})),
             (Algorithm.STEP, ELEMENTWISE),
             (Algorithm.CHUNKED, frozenset({AStructure.SCALAR})),
             (Algorithm.CONV, ALL_STRUCTURES - {AStructure.SCALAR})),
    state_dtypes=frozenset(DType), device="cuda", interpreter="TRITON_INTERPRET",
    indexed_state=frozenset({Algorithm.STEP}))

_MODULES = {Algorithm.SCAN: "scan", Algorithm.STEP: "step", Algorithm.CONV: "conv"}


def forward_arguments(plan: KernelPlan) -> List[str]:
    """The keyword arguments a generated ``forward`` takes: the tensors the operand table says
    the family has, the flag asking for the final state, and the pad slot where rows pick
    their state slot."""
    table = plan.operands
    flag = FINAL_STATE_FLAG.get(table.convention)
    pad = ["pad_slot_id"] if "pad_slot_id" in table else []
    return [op.name for op in table.tensors()] + ([flag] if flag else []) + pad


def _chunked():
    try:
        return importlib.import_module(".chunked", __name__)
    except ImportError as e:  # written by another engineer; absent in early checkouts
        if "chunked" not in str(e):
            raise
        return None


def _module(plan: KernelPlan):
    if plan.algorithm is Algorithm.CHUNKED:
        return _chunked()
    return importlib.import_module(f".{_MODULES[plan.algorithm]}", __name__)


def supports(plan: KernelPlan) -> Optional[str]:
    """None when this backend can compile ``plan``, else the reason in words."""
    refused = CAPABILITIES.refuses(plan)
    if refused:
        return refused
    if plan.algorithm is Algorithm.CHUNKED:
        mod = _chunked()
        if mod is None:
            return "the Triton chunked (SSD) generator is not available in this build"
        return mod.supports_chunked(plan)
    return _module(plan).supports(plan)


def default_config(plan: KernelPlan) -> dict:
    if plan.algorithm is Algorithm.CHUNKED:
        return dict(_chunked().default_config_chunked(plan))
    return dict(_module(plan).default_config(plan))


def candidates(plan: KernelPlan) -> List[dict]:
    if plan.algorithm is Algorithm.CHUNKED:
        return list(_chunked().candidates_chunked(plan))
    return list(_module(plan).candidates(plan))


# Keys the target string adds to every config (``cuda:sm_90`` -> arch), not generator settings.
TARGET_KEYS = ("arch",)


def _generator_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in TARGET_KEYS}


def check_config(plan: KernelPlan, config: dict) -> Optional[str]:
    """Why the generator for ``plan`` cannot use ``config`` (complete), None when it can."""
    config = _generator_config(config)
    if plan.algorithm is Algorithm.CHUNKED:
        return _chunked().config_problem(plan, config)
    check = getattr(_module(plan), "check_config", None)
    try:
        if check is not None:
            check(plan, config)
    except (KeyError, ValueError) as e:
        return str(e)
    return None


def _arch_note(config: dict) -> List[str]:
    arch = config.get("arch")
    if not arch:
        return []
    # Triton compiles at the first launch for the GPU it finds; the arch is recorded (manifest,
    # tuning DB key) and the module says so rather than pretending to hold sm_XX code.
    return [f"Target cuda:{arch}. Triton compiles these kernels at their first launch for the "
            "GPU present;", "the configs were chosen for this architecture."]


def lower(plan: KernelPlan, config: dict) -> str:
    """The generated module (kernel + launcher) for ``plan`` as readable Python source; the
    config is the resolved one (``ssmc.backends.resolve_config``)."""
    notes = _arch_note(config)
    if plan.algorithm is Algorithm.CHUNKED:
        return _chunked().lower_chunked(plan, _generator_config(config), notes)
    return _module(plan).generate(plan, _generator_config(config), notes)


def build(plan: KernelPlan, config: dict, cache) -> Callable:
    """A callable ``kernel(problem) -> (y, final_state_or_None)`` running the generated code;
    the module is imported from an entry of ``cache``."""
    if plan.algorithm is Algorithm.CHUNKED:
        return _chunked().build_chunked(plan, _generator_config(config), cache, _arch_note(config))
    module = codegen.load_module(lower(plan, config), cache, stem=f"ssmc_{plan.algorithm.value}")
    fields = forward_arguments(plan)
    launcher = getattr(module, "launcher", None)
    if launcher is None:
        def kernel(problem):
            return module.forward(**{name: getattr(problem, name, None) for name in fields})
    else:
        # A module with a launcher: its launch is a function of the shape signature, kept
        # per signature (a decode step's host time is spent per call). Both take the
        # problem's fields positionally, in the launcher's order.
        names = [p.name for p in inspect.signature(launcher).parameters.values()
                 if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "out"]
        assert set(fields) <= set(names), (fields, names)
        arguments = operator.attrgetter(*names)
        launches: dict = {}

        def kernel(problem):
            args = arguments(problem)
            key = problem.signature
            launch = launches.get(key) if key is not None else None
            if launch is None:
                launch = launcher(*args)
                if key is not None:
                    if len(launches) >= 1024:
                        launches.clear()
                    launches[key] = launch
            return launch(*args)

    kernel.module = module
    kernel.plan = plan
    backward = getattr(module, "backward", None)
    if backward is not None:
        def kernel_backward(problem, dout, dfinal):
            return backward(dout, dfinal, **{name: getattr(problem, name, None) for name in fields})
        kernel.backward = kernel_backward
    else:
        kernel.backward_refusal = backward_refusal(plan)
    return kernel


def backward_refusal(plan: KernelPlan) -> Optional[str]:
    """Why no backward kernel is generated for ``plan`` (None when one is)."""
    if plan.algorithm is Algorithm.SCAN:
        from . import scan_backward
        return scan_backward.supports_backward(plan)
    if plan.algorithm is Algorithm.CHUNKED:
        from . import chunked_backward
        return chunked_backward.supports_backward(plan)
    if plan.algorithm is Algorithm.CONV:
        from . import conv_backward
        return conv_backward.supports_backward(plan)
    return f"the Triton {plan.algorithm.value} generator has no backward kernel yet"


def time_kernel(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (Triton's benchmark: L2 flushed, events timed)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def write_artifact(plan: KernelPlan, config: dict, out_dir, cache=None) -> List[str]:
    """Write ``kernel.py`` (generated kernel + launcher; needs only torch and triton)."""
    return [os.fspath(codegen.write_module(lower(plan, config), out_dir, "kernel.py"))]
