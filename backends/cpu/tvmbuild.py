"""From TVMScript text to a loaded module: LLVM target strings, the artifact cache, threads.

A plan's key (``plan_key``: the plan's hash, the config, the target string as written, a host
CPU fingerprint, the generator's and TVM's versions) keys its entry in the artifact cache the
caller passes in (kernel.so and the kernel.tir.py it was compiled from). It is computed without
importing TVM (TVM's version comes from package metadata), so that a repeated ``ssmc compile``
copies the cached files without generating TIR, importing TVM or loading the library. A warm
hit is a dlopen (~ms); a cold miss is TVMScript parsing + LLVM (~0.1-1 s per kernel). Loaded
modules are also memoized in process by the same key.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ssmc.errors import TargetError

DEFAULT_LLVM_TARGET = "llvm -mcpu=native"
_MEMO: Dict[str, object] = {}
_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Targets

def _tvm():
    # TVM sizes its thread pool once, from TVM_NUM_THREADS or else half the logical cores
    # (it assumes hyper-threading), which is 1 on a 2-core machine: ask for every core unless
    # the user chose. set_num_threads can lower it later.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    # TVM pins its workers to cores; on the 2-vCPU development VM that left two threads
    # running no faster than one (NOTES_cpu.md). Unpinned, the OS spreads them.
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    import tvm  # deferred: importing TVM costs ~1 s, and only this backend needs it
    return tvm


def parse_target(spec) -> dict:
    """An LLVM target as TVM 0.27's JSON form, from a CLI-style string or a dict, as written:
    ``-mcpu=native`` (or no CPU at all) is kept for ``target_dict`` to resolve. Needs no TVM.

    TVM 0.27 no longer parses ``llvm -mcpu=x``; we do.
    """
    if spec is None or spec in ("cpu", "native", "llvm"):
        spec = DEFAULT_LLVM_TARGET if spec != "llvm" else "llvm"
    if isinstance(spec, dict):
        out = dict(spec)
    else:
        text = str(spec).strip()
        if text.startswith("{"):
            out = json.loads(text)
        else:
            words = shlex.split(text)
            if not words or words[0] != "llvm":
                raise TargetError(f"CPU target {text!r} is not an LLVM target string",
                                  hint="expected e.g. 'llvm -mcpu=native' or "
                                       "'llvm -mtriple=aarch64-linux-gnu'")
            out = {"kind": "llvm"}
            for w in words[1:]:
                if not w.startswith("-") or "=" not in w:
                    raise TargetError(f"cannot read option {w!r} of CPU target {text!r}",
                                      hint="options look like -mcpu=znver4 or -mattr=+avx2,+fma")
                key, value = w.lstrip("-").split("=", 1)
                out[key] = value.split(",") if key == "mattr" else value
    if out.get("mcpu") == "native" and not runs_here(out):
        raise TargetError(f"-mcpu=native makes no sense for the cross target {out['mtriple']}")
    return out


def names_host_cpu(parsed: dict) -> bool:
    """Whether a parsed target means "this machine's CPU" (resolved differently per host)."""
    return parsed.get("mcpu") == "native" or ("mtriple" not in parsed and "mcpu" not in parsed)


def target_dict(spec) -> dict:
    """``parse_target`` with the host CPU filled in: ``cpu``/``native`` and ``-mcpu=native``
    resolve to the host CPU's name, so that the cache key names the real microarchitecture."""
    out = parse_target(spec)
    if names_host_cpu(out):
        _tvm()  # first: it sets TVM's thread-pool environment before TVM is imported
        from tvm.target import codegen
        out["mcpu"] = codegen.llvm_get_system_cpu()
    return out


def is_host_triple(triple: Optional[str]) -> bool:
    if not triple:
        return True
    return triple.split("-")[0] == platform.machine()


def runs_here(tdict: dict) -> bool:
    return is_host_triple(tdict.get("mtriple"))


def has_features(tdict: dict, features) -> bool:
    """Whether the LLVM target has all CPU ``features`` (e.g. ["avx512f"])."""
    from tvm.target import codegen
    try:
        return bool(codegen.llvm_cpu_has_features(list(features), make_target(tdict)))
    except Exception:
        return False


def make_target(tdict: dict):
    tvm = _tvm()
    try:
        return tvm.target.Target(dict(tdict))
    except Exception as e:  # TVM raises ValueError/TVMError with a long message
        raise TargetError(f"TVM rejects the CPU target {tdict}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------
# Cache

@lru_cache(maxsize=1)
def tvm_version() -> str:
    """TVM's version from package metadata (importing TVM to ask costs seconds); a TVM built
    from source, with no apache-tvm distribution, is asked directly."""
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return _tvm().__version__


@lru_cache(maxsize=1)
def host_cpu() -> str:
    """What LLVM reads to name the host CPU (x86: the model and feature flags; AArch64: the
    implementer, part and features), for keys of targets that say "this machine's CPU"."""
    keys = ("model name", "flags", "isa", "CPU implementer", "CPU part", "Features")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the processor's name is all there is
        return f"{platform.machine()}\n{platform.processor()}"
    return platform.machine() + "\n" + "\n".join(sorted({ln for ln in lines
                                                         if ln.startswith(keys)}))


_GENERATOR_VERSION: Optional[str] = None


def generator_version() -> str:
    """Hash of the code that turns a plan into TIR text (this backend and the printers and
    discretization it calls): a plan's cached text is reused only while these are unchanged."""
    global _GENERATOR_VERSION
    if _GENERATOR_VERSION is None:
        here = Path(__file__).resolve().parent
        import ssmc
        core = Path(ssmc.__file__).resolve().parent
        files = sorted(here.glob("*.py")) + [core / "printers.py", core / "discretize.py",
                                              core / "ir.py", core / "lti.py"]
        h = hashlib.sha256()
        for f in files:
            if f.exists():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        _GENERATOR_VERSION = h.hexdigest()[:16]
    return _GENERATOR_VERSION


def plan_key(plan_hash: str, config: dict, spec) -> str:
    """The key of a plan's TIR text for ``config`` and the target ``spec`` as written (not
    resolved: that needs TVM); a target naming the host CPU adds the host's fingerprint."""
    parsed = parse_target(spec)
    host = host_cpu() if names_host_cpu(parsed) else None
    text = json.dumps([plan_hash, config, parsed, host, generator_version(), tvm_version()],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _entry_parts(pkey: str) -> dict:
    # The plan key names the TIR text exactly (plan, config, target, generator and TVM versions),
    # so the entry is found before any TIR is generated: a warm build costs a dlopen.
    return {"backend": "cpu", "plan_key": pkey}


def cached_entry(pkey: str, cache) -> Optional[Path]:
    """The artifact-cache entry (kernel.so, kernel.tir.py) of this plan key, if it is there and
    matches its manifest."""
    return cache.get(cache.key(**_entry_parts(pkey)))


def cached_source(pkey: str, cache) -> Optional[str]:
    """The TIR text generated earlier for this plan/config/target, if its library is on disk:
    a warm build then skips the (sympy) generation and costs a file read and a dlopen."""
    entry = cached_entry(pkey, cache)
    return (entry / "kernel.tir.py").read_text() if entry is not None else None


@dataclass
class Built:
    module: object           # the loaded runtime module (functions by name)
    key: str
    path: Optional[Path]     # the shared object on disk
    seconds: float           # compile (or load) time
    cached: bool             # True when it came from disk or the in-process memo


def compile_source(source: str, tdict: dict) -> Tuple[object, float]:
    """TVMScript text -> tvm Executable (not cached). Returns (executable, seconds)."""
    tvm = _tvm()
    t0 = time.perf_counter()
    try:
        mod = tvm.script.from_source(source)
    except Exception as e:
        raise TargetError(f"generated TIR does not parse (a bug in the CPU backend): "
                          f"{str(e)[:2000]}") from None
    if not isinstance(mod, tvm.IRModule):
        mod = tvm.IRModule({mod.attrs["global_symbol"]: mod})
    exe = tvm.compile(mod, target=make_target(tdict))
    return exe, time.perf_counter() - t0


def library(pkey: str, lower: Callable[[], str], tdict: dict, cache,
            about: Optional[dict] = None,
            texts: Optional[Dict[str, Callable[[], str]]] = None) -> Tuple[Path, bool]:
    """The shared object of plan key ``pkey`` in the artifact ``cache``, compiled into it from
    ``lower()`` (the TIR text, generated only on a miss) when absent; not loaded. Returns (path,
    whether it was compiled now). ``about`` (family, algorithm, target as written) is recorded for
    ``ssmc cache ls``; ``texts`` are more files written into a new entry ({name: text()})."""
    parts = _entry_parts(pkey)
    built_now = []

    def build(folder: Path) -> None:
        source = lower()
        exe, _ = compile_source(source, tdict)
        exe.export_library(str(folder / "kernel.so"))
        (folder / "kernel.tir.py").write_text(source)
        for name, text in (texts or {}).items():
            (folder / name).write_text(text())
        built_now.append(True)

    description = dict(parts, llvm_target=tdict, **(about or {}))
    entry = cache.get_or_build(cache.key(**parts), build, description)
    return entry / "kernel.so", bool(built_now)


def load(pkey: str, lower: Callable[[], str], tdict: dict, cache,
         about: Optional[dict] = None) -> Built:
    """The compiled module of plan key ``pkey``: in-process memo, else ``library`` (the artifact
    cache, compiling into it on a miss), loaded."""
    tvm = _tvm()
    with _LOCK:
        if pkey in _MEMO:
            module, path = _MEMO[pkey]
            return Built(module, pkey, path, 0.0, True)
    t0 = time.perf_counter()
    path, built_now = library(pkey, lower, tdict, cache, about)
    module = tvm.runtime.load_module(str(path))
    with _LOCK:
        _MEMO[pkey] = (module, path)
    return Built(module, pkey, path, time.perf_counter() - t0, not built_now)


def cross_linker(triple: str) -> Optional[str]:
    """The cross gcc that links a shared object for ``triple``, if it is on PATH."""
    return shutil.which(f"{triple}-gcc")


def export_cross(source: str, tdict: dict, out_path: Path) -> Path:
    """Compile ``source`` for a foreign ``tdict`` into a shared object at ``out_path``; without a
    cross linker here, into the object file (.o) beside it instead, saying so on stderr."""
    triple = tdict["mtriple"]
    exe, _ = compile_source(source, tdict)
    linker = cross_linker(triple)
    if linker is None:
        obj = Path(out_path).with_suffix(".o")
        # Not exe.mod.save: tvm_ffi's Module has no save, and the attribute lookup falls back to
        # a packed function, which loads the module: a foreign one fails ("architecture
        # mismatch"). write_to_file only writes it.
        exe.mod.write_to_file(str(obj))
        print(f"note: no cross linker {triple}-gcc on PATH, so wrote the object file {obj.name}; "
              f"for a shared library: apt-get install gcc-{triple} (Debian)", file=sys.stderr)
        return obj
    from tvm.support import cc
    exe.export_library(str(out_path), fcompile=cc.cross_compiler(linker))
    return Path(out_path)


# --------------------------------------------------------------------------------------------
# Threads

_threads_set: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Size TVM's thread pool (None or 0: one worker per core)."""
    global _threads_set
    n = int(n or 0)
    if n == _threads_set:
        return
    tvm = _tvm()
    # Mode 0 sets no affinity; the pool never grows past its size at creation (see _tvm).
    tvm.get_global_func("runtime.config_threadpool")(0, n if n > 0 else (os.cpu_count() or 1))
    _threads_set = n
