"""The tuning database: which config was fastest for a plan, on this device, at this shape.

One JSON file, ``tuning.json`` in the cache directory, written atomically under a file lock after
every candidate (so an interrupted ``ssmc tune`` resumes where it stopped)::

    {"version": 1, "entries": {
       "<device> | <target> | <plan ir_hash> | b4_l4096": {
          "family": ..., "algorithm": ..., "target": ..., "device": ..., "shape": {"b": 4, "l": 4096},
          "versions": {...},              # results from other releases of ssmc/torch/triton/tvm
                                          # are not trusted (edits between releases are)
          "candidates": {"<config json>": {"status": "ok"|"wrong"|"error", "ms": ..., "detail": ...}},
          "best": {config} | null, "best_ms": float | null}}}

Shapes are bucketed to powers of two per dimension, so b=3, l=3000 and b=4, l=4096 share a
bucket. ``lookup_for_plan`` (called by ``ssmc.compile`` for every kernel) is cheap and never
raises: no database, no entry or any error gives None.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

from .cache import default_root, release_versions

DB_NAME = "tuning.json"
# The shape a compiled kernel is assumed to serve when no shape is known (the benchmark's anchor shapes, bench/gpu.py).
DEFAULT_SHAPE = {"b": 4, "l": 4096}
DEFAULT_STEP_SHAPE = {"b": 64}


def db_path(root: Optional[os.PathLike] = None) -> Path:
    return Path(root) / DB_NAME if root is not None else default_root() / DB_NAME


# --------------------------------------------------------------------------------------------
# Devices and shapes

@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@lru_cache(maxsize=4)
def device_name(backend: str) -> str:
    """The device a backend's kernels run on, as the key of the database."""
    from ssmc import backends
    caps = backends.get(backend).CAPABILITIES
    if caps.device_now() == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return f"{backend}-interpreter on {cpu_name()}" if caps.interpreted() else cpu_name()


def bucket(shape: Dict[str, int]) -> str:
    """Every size rounded up to a power of two: {'b': 3, 'l': 3000} -> 'b4_l4096'."""
    return "_".join(f"{k}{1 << max(0, math.ceil(math.log2(max(1, v))))}"
                    for k, v in sorted(shape.items()))


def _parse_bucket(text: str) -> Dict[str, int]:
    out = {}
    for part in text.split("_"):
        out[part[0]] = int(part[1:])
    return out


def entry_key(device: str, target: str, plan_hash: str, shape: Dict[str, int]) -> str:
    return " | ".join([device, target, plan_hash, bucket(shape)])


def config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# The file

class TuningDB:
    """Read-modify-write access to ``tuning.json`` (locked, atomic replace)."""

    def __init__(self, root: Optional[os.PathLike] = None):
        self.path = db_path(root)

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"version": 1, "entries": {}}
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return {"version": 1, "entries": {}}
        return data

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(DB_NAME + ".lock"), "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _write(self, data: dict):
        fd, tmp = tempfile.mkstemp(prefix=DB_NAME + ".", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def entry(self, key: str) -> Optional[dict]:
        entry = self.load()["entries"].get(key)
        if entry is None or entry.get("versions") != release_versions():
            return None
        return entry

    def record(self, key: str, header: dict, config: dict, result: dict) -> dict:
        """Store one candidate's result and recompute the entry's best; returns the entry."""
        with self._locked():
            data = self.load()
            entry = data["entries"].get(key)
            if entry is None or entry.get("versions") != release_versions():
                entry = dict(header, versions=release_versions(), candidates={}, best=None,
                             best_ms=None)
            entry["candidates"][config_key(config)] = dict(result, config=config, at=time.time())
            ok = [c for c in entry["candidates"].values()
                  if c.get("status") == "ok" and c.get("ms") is not None]
            best = min(ok, key=lambda c: c["ms"]) if ok else None
            entry["best"] = best["config"] if best else None
            entry["best_ms"] = best["ms"] if best else None
            entry["updated"] = time.time()
            data["entries"][key] = entry
            self._write(data)
            _load_cached.cache_clear()
            return entry

    def entries(self) -> Dict[str, dict]:
        return self.load()["entries"]


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> dict:
    return TuningDB(Path(path).parent).load()


# --------------------------------------------------------------------------------------------
# Lookup for ssmc.compile

def _closest(entries: Dict[str, dict], prefix: str, wanted: Dict[str, int]) -> Optional[dict]:
    best: Tuple[float, Optional[dict]] = (math.inf, None)
    for key, entry in entries.items():
        if not key.startswith(prefix) or not entry.get("best"):
            continue
        shape = _parse_bucket(key[len(prefix):])
        if set(shape) != set(wanted):
            continue
        distance = sum(abs(math.log2(shape[k]) - math.log2(max(1, wanted[k]))) for k in wanted)
        if distance < best[0]:
            best = (distance, entry)
    return best[1]


def lookup(plan, target_name: str, shape: Optional[Dict[str, int]] = None,
           root: Optional[os.PathLike] = None) -> Optional[dict]:
    """The tuned config for ``plan`` on this device at ``shape`` (or the closest tuned bucket)."""
    from ssmc.api import parse_target
    from ssmc.ir import Algorithm
    from ssmc.plan import ir_hash
    path = db_path(root)
    if not path.exists():
        return None
    target = parse_target(target_name)
    data = _load_cached(str(path), path.stat().st_mtime_ns)
    if shape is None:
        shape = DEFAULT_STEP_SHAPE if plan.algorithm is Algorithm.STEP else DEFAULT_SHAPE
    prefix = " | ".join([device_name(target.backend), target.name, ir_hash(plan)]) + " | "
    versions = release_versions()
    fresh = {k: e for k, e in data["entries"].items() if e.get("versions") == versions}
    entry = fresh.get(prefix + bucket(shape)) or _closest(fresh, prefix, shape)
    return dict(entry["best"]) if entry and entry.get("best") else None


def lookup_for_plan(plan, target_name: str) -> Optional[dict]:
    """What ``ssmc.compile`` asks: the tuned config for the default shape, or None. Never raises."""
    try:
        return lookup(plan, target_name)
    except Exception:  # a broken database must never break compiling
        return None


__all__ = ["TuningDB", "lookup", "lookup_for_plan", "bucket", "device_name", "cpu_name",
           "entry_key", "config_key", "DEFAULT_SHAPE", "DEFAULT_STEP_SHAPE", "db_path"]
