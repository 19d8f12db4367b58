"""Compiling the generated C with the system compiler, caching the library, calling it.

The shared library is kept in the artifact cache the caller passes in (the interface is in
``ssmc.backends``' docstring; listed by ``ssmc cache ls``), keyed by the sha256 of the sources,
the compiler's version line and the flags; the sources are kept beside it so that a cached
kernel can be read.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ssmc.errors import CallError, TargetError
from ssmc.ir import KernelPlan

from .calling import float_strides, marshal, results
from .layout import Layout, make_layout

HOST_CC = "gcc"
WARNINGS = ["-Wall", "-Werror"]
ERRORS = {1: "a negative size", 2: "cu_seqlens given with batch != 1",
          3: "cu_seqlens offsets not nondecreasing within [0, seqlen]"}


@lru_cache(maxsize=None)
def compiler_id(cc: str) -> str:
    """The compiler's version line (part of the cache key), or a TargetError if it is missing."""
    if shutil.which(cc) is None:
        raise TargetError(f"C compiler {cc!r} not found on PATH; the c target needs one "
                          "(Debian: apt-get install gcc)")
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or [cc])[0]


@lru_cache(maxsize=None)
def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "isa"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


def host_flags(config: dict) -> List[str]:
    flags = ["-std=c99", config.get("opt", "-O3")] + WARNINGS + ["-fPIC"]
    if config.get("native"):
        flags.append("-march=native")
    if config.get("fast_math"):
        # Lets gcc vectorize expf (glibc's libmvec) and the C h reductions; a tuning candidate,
        # never the default: the autotuner keeps it only where it passes the oracle check.
        flags.append("-ffast-math")
    return flags + list(config.get("cflags", ()))


def describe(plan: KernelPlan, target: str) -> dict:
    """What ``ssmc cache ls`` shows of an entry built for ``plan``: recorded, not keyed (the
    sources name the family and the algorithm, the compiler's version line the target)."""
    return {"family": plan.family.name, "algorithm": plan.algorithm.value, "target": target}


def compile_cached(files: Dict[str, str], output: str, flags: Sequence[str], cache,
                   cc: str = HOST_CC, libs: Sequence[str] = ("-lm",),
                   about: Optional[dict] = None) -> Path:
    """Compile the ``.c`` files of ``files`` into ``output`` in an entry of the artifact
    ``cache`` (built whole or not at all); returns its path. ``about`` (``describe``) is added
    to the entry's description."""
    sources_sha = hashlib.sha256()
    for name in sorted(files):
        sources_sha.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    parts = {"backend": "c", "sources_sha256": sources_sha.hexdigest(), "output": output,
             "compiler": compiler_id(cc), "flags": list(flags), "libs": list(libs)}
    if "-march=native" in flags:      # the same flags mean different code on another CPU
        parts["cpu"] = _cpu_id()

    def build(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)
        sources = [name for name in sorted(files) if name.endswith(".c")]
        cmd = [cc, *flags, *sources, "-o", output, *libs]
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TargetError(f"{cc} failed on the generated C:\n  {' '.join(cmd)}\n"
                              f"{proc.stderr.strip()}")
        os.chmod(folder / output, 0o755)

    description = dict(parts, **(about or {}))
    return cache.get_or_build(cache.key(**parts), build, description) / output


def _argtypes(params) -> List[object]:
    types: List[object] = []
    for p in params:
        if p.kind == "size":
            types.append(ctypes.c_int64)
        elif p.kind == "offsets":
            types.append(ctypes.c_void_p)
        else:
            types.append(ctypes.c_void_p)
            types += [ctypes.c_int64] * len(p.dims)
    return types


def c_arguments(call) -> List[object]:
    """The flat C argument list: ints, pointers (None for NULL) and strides."""
    args: List[object] = []
    for p, value in call.flat():
        if p.kind == "size":
            args.append(int(value))
        elif p.kind == "offsets":
            args.append(None if value is None else value.data_ptr())
        elif value is None:
            args += [None] + [0] * len(p.dims)
        else:
            args += [value.data_ptr()] + float_strides(p, value)
    return args


class CKernel:
    """A compiled C kernel: ``kernel(problem) -> (y, final_state_or_None)``."""

    def __init__(self, plan: KernelPlan, layout: Layout, library: Path):
        self.plan = plan
        self.layout = layout
        self.library = library
        self._lib = ctypes.CDLL(str(library))
        self._fn = getattr(self._lib, layout.entry)
        self._fn.argtypes = _argtypes(layout.params)
        self._fn.restype = ctypes.c_int

    def __repr__(self):
        return f"<C kernel {self.layout.entry} from {self.library}>"

    @property
    def source(self) -> str:
        return (self.library.parent / f"{self.layout.prefix}.c").read_text()

    def __call__(self, problem):
        call = marshal(self.layout, problem)
        with torch.no_grad():
            rc = self._fn(*c_arguments(call))
        if rc != 0:
            raise CallError(f"{self.layout.entry} refused its arguments: {ERRORS.get(rc, rc)}")
        return results(call)


def build_host(plan: KernelPlan, config: dict, cache) -> CKernel:
    from . import lower_files
    layout = make_layout(plan)
    files = lower_files(plan, config)
    flags = host_flags(config) + ["-shared"]
    library = compile_cached(files, f"lib{layout.prefix}.so", flags, cache,
                             about=describe(plan, "c"))
    return CKernel(plan, layout, library)
