"""Every target's backend, behind one small interface and this registry.

A backend is a package of this folder that provides::

    CAPABILITIES                          what it compiles, as data (``Capabilities``)
    supports(plan) -> reason or None      CAPABILITIES.refuses(plan), then its own limits
    default_config(plan), candidates(plan) -> configs (the autotuner times the candidates)
    lower(plan, config) -> source text    what `ssmc compile` writes and a person reads
    build(plan, config, cache) -> kernel  kernel(problem) -> (y, final_state or None)
                                          and, where the backend generates the backward,
                                          kernel.backward(problem, dout, dfinal) ->
                                          {argument name: gradient}, else
                                          kernel.backward_refusal (why not, in words)
    write_artifact(plan, config, out_dir, cache) -> the paths it wrote

and optionally ``check_config(plan, config) -> reason or None`` (a config it cannot use, e.g.
an unknown key), ``load_artifact(plan, config, kernel_dir, cache)`` (opens what
``write_artifact`` wrote, for ``ssmc.load``) and ``time_kernel(fn) -> ms`` (how the autotuner
times a kernel on the backend's device, when that is not the CPU's wall clock).

**Config.** ``resolve_config(backend, plan, *overrides)`` is where support is decided and a
config completed, once per compile: ``supports``, then ``default_config`` updated by each
override (the tuned config, the caller's, the target's options), then ``check_config``.
``lower``, ``build`` and ``write_artifact`` take that resolved config as given: they neither
re-run ``supports`` nor merge defaults again.

**Cache.** A backend never imports ``ssmc.runtime``; its caller passes the artifact cache into
``build`` / ``write_artifact`` / ``load_artifact``. The cache is any object with::

    key(**parts) -> str                   a content key of JSON-able parts (+ tool versions)
    get(key) -> Path or None              the complete, verified directory of an entry
    get_or_build(key, build, description=None) -> Path
                                          the entry's directory; on a miss ``build(tmp_dir)``
                                          writes its files and the directory appears whole

(``ssmc.runtime.cache.ArtifactCache``). Files a backend imports or loads (a generated Triton
module, a TVM ``.so``, a C library) live in such an entry.

**Headers.** Every generated source opens with ``header(...)`` (this module): one format for
every target, so a reader (and ``ssmc cache ls``) sees the same facts in the same place.

``get(name)`` is the one way in: the API, the autotuner, the artifact loader and the CLI name no
backend module; ``target(name)`` maps a target string to its backend. A new backend is one
folder, one line of ``_LOADERS`` and its target names in ``target``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Tuple

from ssmc.errors import ConfigError, TargetError
from ssmc.ir import Algorithm, AStructure, DType

ALL_STRUCTURES = frozenset(AStructure)
ELEMENTWISE = frozenset({AStructure.SCALAR, AStructure.DIAGONAL, AStructure.COMPLEX_DIAGONAL})


@dataclass(frozen=True)
class Capabilities:
    """What a backend compiles: for each algorithm the structures of A it generates, the
    state dtypes it keeps, and where its kernels take their tensors (``cuda``; ``cpu``; or
    ``any`` for a backend that moves them itself)."""
    target: str
    algorithms: Tuple[Tuple[Algorithm, FrozenSet[AStructure]], ...]
    state_dtypes: FrozenSet[DType] = frozenset({DType.FLOAT32})
    device: str = "cpu"
    # The environment variable that, set to 1, runs a cuda backend's kernels on the CPU.
    interpreter: Optional[str] = None
    # Algorithms whose kernels read ``state_batch_indices`` themselves (each row's state slot
    # in a pool); for the others the caller gathers the rows' states and scatters them back.
    indexed_state: FrozenSet[Algorithm] = frozenset()

    def interpreted(self) -> bool:
        """Whether this cuda backend's interpreter switch is set (its kernels run on the CPU)."""
        return bool(self.interpreter) and os.environ.get(self.interpreter) == "1"

    def device_now(self) -> str:
        """Where the kernels take their tensors now, ``cuda`` or ``cpu`` (a backend that takes
        them anywhere, the reference, is given them on the CPU)."""
        return "cuda" if self.device == "cuda" and not self.interpreted() else "cpu"

    def structures(self, algorithm: Algorithm) -> FrozenSet[AStructure]:
        return dict(self.algorithms).get(algorithm, frozenset())

    def refuses(self, plan) -> Optional[str]:
        """Why the table rules ``plan`` out (None when it does not)."""
        structure = plan.family.A.structure
        if structure not in self.structures(plan.algorithm):
            others = [a.value for a, s in self.algorithms if structure in s]
            instead = f"; for {structure.value} A it has: {', '.join(others)}" if others else ""
            takes = ", ".join(sorted(s.value for s in self.structures(plan.algorithm))) or "no"
            return (f"the {self.target} target generates {plan.algorithm.value} for {takes} A, "
                    f"not {structure.value} A{instead}")
        fam = plan.family
        for what, dtype in (("state", fam.dtypes.state), ("accumulation", fam.dtypes.accum)):
            if dtype not in self.state_dtypes:
                kept = ", ".join(sorted(d.value for d in self.state_dtypes))
                return f"the {self.target} target keeps {what} in {kept}, not {dtype.value}"
        return None


def _reference():
    from . import reference
    return reference


def _triton():
    from . import triton
    return triton


def _cpu():
    from . import cpu
    return cpu


def _c():
    from . import c
    return c


_LOADERS: Dict[str, Callable[[], object]] = {"reference": _reference, "triton": _triton,
                                             "cpu": _cpu, "c": _c}
NAMES = tuple(_LOADERS)


def get(name: str):
    """The backend module called ``name`` (imported on first use: TVM and Triton are slow to
    import, and a compile needs one backend)."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise TargetError(f"no backend {name!r}; the backends are {', '.join(NAMES)}")
    return loader()


CROSS_TRIPLES = {"aarch64": "aarch64-linux-gnu", "riscv64": "riscv64-linux-gnu"}


def target(name: str) -> Tuple[str, Dict[str, Any]]:
    """``(backend name, target options)`` of a target string; the options are merged into every
    config for it (``resolve_config``)."""
    name = name.strip()
    if name == "reference":
        return "reference", {}
    if name == "cuda" or name.startswith("cuda:"):
        arch = name.split(":", 1)[1] if ":" in name else None
        if arch is not None and not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise TargetError(f"unknown CUDA architecture {arch!r} in target {name!r}; "
                              "expected e.g. cuda:sm_90")
        return "triton", ({"arch": arch} if arch else {})
    if name == "cpu":
        return "cpu", {"llvm_target": "llvm -mcpu=native"}
    if name.startswith("llvm"):
        return "cpu", {"llvm_target": name}
    if name == "c":
        return "c", {}
    if name in CROSS_TRIPLES:
        return "c", {"triple": CROSS_TRIPLES[name]}
    raise TargetError(f"unknown target {name!r}; expected one of: reference, cuda[:sm_XX], cpu, "
                      "'llvm <options>', c, aarch64, riscv64")


def resolve_config(backend, plan, *overrides: Optional[dict]) -> dict:
    """The one place a plan's support is decided and its config completed (module docstring):
    a TargetError when ``backend`` cannot compile ``plan``, a ConfigError (also a ValueError)
    naming the key when it cannot use the config."""
    from ssmc.plan import require_sizes
    # Kernels are generated per size: none before every size is known.
    require_sizes(plan.family, "generating its kernel",
                  "call it (each call's tensors give the sizes), or compile for chosen "
                  "sizes: `ssmc compile SPEC --size {cli}`")
    caps = getattr(backend, "CAPABILITIES", None)
    name = caps.target if caps is not None else getattr(backend, "__name__", "this backend")
    what = f"target {name} cannot compile {plan.family.name} ({plan.algorithm.value})"
    reason = backend.supports(plan)
    if reason:
        raise TargetError(f"{what}: {reason}", plan.family.compute.loc)
    config = dict(backend.default_config(plan))
    for layer in overrides:
        config.update(layer or {})
    check = getattr(backend, "check_config", None)
    reason = check(plan, config) if check is not None else None
    if reason:
        raise ConfigError(f"{what} with this config: {reason}", plan.family.compute.loc)
    return config


def header(plan, config: dict, target: str, comment: str = "#",
           notes: Iterable[str] = ()) -> str:
    """The opening comment of every generated source: what generated it, the family, algorithm,
    target, config and a content hash (of the plan and config, so that two files with the same
    hash came from the same input). ``comment`` is the line-comment marker of the language;
    ``notes`` are extra lines a backend adds (the discretized math, a target remark)."""
    from ssmc.plan import ir_hash
    shown = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{ir_hash(plan)}\n{shown}\n{target}".encode()).hexdigest()[:16]
    chunk = f" (chunk {plan.chunk_size})" if plan.chunk_size else ""
    lines = ["Generated by ssmc - do not edit: change the spec and compile again.",
             f"family {plan.family.name}, algorithm {plan.algorithm.value}{chunk}, target {target}",
             f"config {shown}",
             f"hash {digest} (plan {ir_hash(plan)})"]
    lines += list(notes)
    return "\n".join(f"{comment} {ln}".rstrip() for ln in lines) + "\n"


__all__ = ["Capabilities", "get", "NAMES", "ALL_STRUCTURES", "ELEMENTWISE", "target",
           "resolve_config", "header", "CROSS_TRIPLES"]
