"""From TVMScript text to a loaded module: LLVM target strings, the on-disk cache, threads.

The generated TIR text is the cache key (with the resolved target and the TVM version), so two
plans that print the same kernel share one shared object. A warm hit is a dlopen (~ms); a cold
miss is TVMScript parsing + LLVM (~0.1-1 s per kernel). Compiled modules are also memoized in
process, keyed the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

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


def target_dict(spec) -> dict:
    """An LLVM target as TVM 0.27's JSON form, from a CLI-style string or a dict.

    TVM 0.27 no longer parses ``llvm -mcpu=x``; we do: ``cpu``/``native`` and ``-mcpu=native``
    resolve to the host CPU name (so that the cache key names the real microarchitecture).
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
    from tvm.target import codegen
    if out.get("mcpu") == "native":
        if "mtriple" in out and not is_host_triple(out["mtriple"]):
            raise TargetError(f"-mcpu=native makes no sense for the cross target {out['mtriple']}")
        out["mcpu"] = codegen.llvm_get_system_cpu()
    if "mtriple" not in out and "mcpu" not in out:
        out["mcpu"] = codegen.llvm_get_system_cpu()
    return out


def is_host_triple(triple: Optional[str]) -> bool:
    if not triple:
        return True
    import platform
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

def cache_dir(config: Optional[dict] = None) -> Path:
    root = (config or {}).get("cache_dir") or os.environ.get("SSMC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "ssmc"
    # SSMC_CACHE_DIR is the ssmc-wide cache root; this backend keeps its objects in cpu/.
    return base / "cpu"


def cache_key(source: str, tdict: dict) -> str:
    tvm = _tvm()
    text = source + "\n" + json.dumps(tdict, sort_keys=True) + "\n" + tvm.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
                                              core / "ir.py"]
        h = hashlib.sha256()
        for f in files:
            if f.exists():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        _GENERATOR_VERSION = h.hexdigest()[:16]
    return _GENERATOR_VERSION


def plan_key(plan_hash: str, config: dict, tdict: dict) -> str:
    text = json.dumps([plan_hash, config, tdict, generator_version(), _tvm().__version__],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_source(pkey: str, config: Optional[dict] = None) -> Optional[str]:
    """The TIR text generated earlier for this plan/config/target, if its library is on disk:
    a warm build then skips the (sympy) generation and costs a file read and a dlopen."""
    directory = cache_dir(config)
    try:
        entry = Path((directory / f"{pkey}.plan").read_text().strip())
        if (entry / "kernel.so").exists():
            return (entry / "kernel.tir.py").read_text()
    except OSError:
        pass
    return None


def remember_source(pkey: str, entry: Path, config: Optional[dict] = None) -> None:
    """Point the plan's key at its artifact-cache entry (the directory holding kernel.so)."""
    directory = cache_dir(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{pkey}.plan.{os.getpid()}"
        tmp.write_text(str(entry))
        os.replace(tmp, directory / f"{pkey}.plan")
    except OSError:
        pass


@dataclass
class Built:
    module: object           # the loaded runtime module (functions by name)
    key: str
    path: Optional[Path]     # the shared object on disk
    seconds: float           # compile (or load) time
    cached: bool             # True when it came from disk or the in-process memo


def _fcompile(tdict: dict):
    from tvm.support import cc
    triple = tdict.get("mtriple")
    if is_host_triple(triple):
        return None
    gcc = f"{triple}-gcc"
    import shutil
    if shutil.which(gcc) is None:
        raise TargetError(f"no cross linker {gcc} for the CPU target {triple}",
                          hint="install a cross gcc, or take the object file from write_artifact")
    return cc.cross_compiler(gcc)


def compile_source(source: str, tdict: dict, config: Optional[dict] = None) -> Tuple[object, float]:
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


def _artifact_cache(config: Optional[dict]):
    from ssmc.runtime.cache import ArtifactCache, default_cache
    root = (config or {}).get("cache_dir")
    return ArtifactCache(root) if root else default_cache()


def load(source: str, tdict: dict, config: Optional[dict] = None) -> Built:
    """The compiled module for ``source``: in-process memo, else the ssmc artifact cache (atomic,
    locked, verified: ssmc.runtime.cache), else compile into it."""
    tvm = _tvm()
    key = cache_key(source, tdict)
    with _LOCK:
        if key in _MEMO:
            module, path = _MEMO[key]
            return Built(module, key, path, 0.0, True)
    t0 = time.perf_counter()
    cache = _artifact_cache(config)
    entry_key = cache.key(backend="cpu", tir_sha256=key, target=tdict)
    built_now = []

    def build(folder: Path) -> None:
        exe, _ = compile_source(source, tdict, config)
        exe.export_library(str(folder / "kernel.so"))
        (folder / "kernel.tir.py").write_text(source)
        built_now.append(True)

    path = cache.get_or_build(entry_key, build) / "kernel.so"
    module = tvm.runtime.load_module(str(path))
    with _LOCK:
        _MEMO[key] = (module, path)
    return Built(module, key, path, time.perf_counter() - t0, not built_now)


def export(source: str, tdict: dict, out_path: Path) -> Path:
    """Compile ``source`` for ``tdict`` (host or cross) into a shared object at ``out_path``.

    Without a cross linker for a foreign triple the object file (.o) is written instead.
    """
    out_path = Path(out_path)
    if runs_here(tdict):
        # A host library is the cached one: copying it keeps a repeated `ssmc compile` fast.
        cached = load(source, tdict).path
        if cached is not None and cached.exists():
            shutil.copyfile(cached, out_path)
            return out_path
    exe, _ = compile_source(source, tdict)
    try:
        fcompile = _fcompile(tdict)
    except TargetError:
        obj = out_path.with_suffix(".o")
        exe.mod.save(str(obj))
        return obj
    if fcompile is None:
        exe.export_library(str(out_path))
    else:
        exe.export_library(str(out_path), fcompile=fcompile)
    return out_path


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
