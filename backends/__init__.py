"""Every target's backend, behind one small interface and this registry.

A backend is a package of this folder that provides::

    CAPABILITIES                          what it compiles, as data (``Capabilities``)
    supports(plan) -> reason or None      CAPABILITIES.refuses(plan), then its own limits
    default_config(plan), candidates(plan) -> configs (the autotuner times the candidates)
    lower(plan, config) -> source text    what `ssmc compile` writes and a person reads
    build(plan, config) -> kernel         kernel(problem) -> (y, final_state or None)
    write_artifact(plan, config, out_dir) -> the paths it wrote

Optionally ``load_artifact(plan, config, kernel_dir)`` opens what ``write_artifact`` wrote
(``ssmc.load``). ``get(name)`` is the one way in: the API, the autotuner, the artifact loader
and the CLI name no backend module; a new backend is one folder, one line of ``_LOADERS`` and
its target names in ``ssmc.api.parse_target``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

from ssmc.errors import TargetError
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


__all__ = ["Capabilities", "get", "NAMES", "ALL_STRUCTURES", "ELEMENTWISE"]
