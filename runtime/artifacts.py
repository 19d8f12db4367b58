"""``load(DIR)``: the callable of a kernel that ``ssmc compile SPEC -o DIR`` wrote.

``DIR/manifest.json`` lists the kernels (family, algorithm, ir_hash, config, files) and the spec
they came from. The spec is parsed again (from ``spec_text`` in the manifest, else from the
spec path it names, whose sha256 must match) and each kernel's plan re-derived; its IR hash
must equal the recorded one, so a spec edited since the compile is an error, not a silently
different kernel. A backend that can open its own artifact (``load_artifact(plan, config,
kernel_dir, cache)``) is given the directory; otherwise the kernel is built again from the plan
and the recorded config (the resolved one: it is passed as given).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import List, Optional

from ssmc.errors import SSMCError
from ssmc.ir import Algorithm, SpecFile


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise SSMCError(f"{folder}: no manifest.json (write one with `ssmc compile SPEC -o {folder}`)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SSMCError(f"{path}: unreadable manifest: {e}") from None


def _spec(folder: Path, manifest: dict) -> SpecFile:
    from ssmc import frontend
    name = manifest.get("spec", "<spec>")
    text = manifest.get("spec_text")
    if text is None:
        candidates = [Path(name), folder / Path(name).name, folder / name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise SSMCError(f"{folder}/manifest.json does not hold the spec text and its spec "
                            f"file {name} is not found")
        text = found.read_text()
    recorded = manifest.get("spec_sha256")
    if recorded and hashlib.sha256(text.encode()).hexdigest() != recorded:
        raise SSMCError(f"the spec {name} changed since `ssmc compile` wrote {folder} "
                        "(sha256 differs); compile again")
    return frontend.parse(text, file=name)


def _check_versions(folder: Path, manifest: dict) -> None:
    from .cache import TOOL_DISTRIBUTIONS, release_versions
    recorded = manifest.get("versions") or {}
    current = release_versions()
    for short, dist in TOOL_DISTRIBUTIONS.items():
        was, now = recorded.get(short), current.get(dist)
        if was and now and not now.startswith(str(was).split("+")[0]) and str(was) != now:
            warnings.warn(f"{folder} was compiled with {short} {was}; this is {short} {now}",
                          RuntimeWarning, stacklevel=3)


def _verify_files(folder: Path, entry: dict) -> None:
    for rel in entry.get("files", []):
        if not (folder / rel).is_file():
            raise SSMCError(f"{folder}: {rel} listed in manifest.json is missing")
    for rel, digest in (entry.get("sha256") or {}).items():
        actual = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        if actual != digest:
            raise SSMCError(f"{folder}: {rel} does not match its sha256 in manifest.json "
                            "(truncated or modified)")


def _kernel(folder: Path, spec: SpecFile, target, entry: dict):
    from ssmc.api import CompiledKernel, artifact_cache, backend_module
    from ssmc.plan import ir_hash, make_plan
    fam = spec.family(entry["family"])
    plan = make_plan(fam, Algorithm(entry["algorithm"]))
    if entry.get("ir_hash") and ir_hash(plan) != entry["ir_hash"]:
        raise SSMCError(f"{folder}: {fam.name} [{plan.algorithm.value}] no longer matches its "
                        "recorded IR hash (the compiler changed how it reads the spec); compile "
                        "again")
    _verify_files(folder, entry)
    backend = backend_module(target)
    config = dict(entry.get("config") or {})
    loader = getattr(backend, "load_artifact", None)
    if loader is not None:
        kernel_dir = folder / fam.name / plan.algorithm.value
        kernel = loader(plan, config, kernel_dir, artifact_cache())
    else:
        kernel = backend.build(plan, config, artifact_cache())
    return CompiledKernel(plan, target, config, kernel)


def load(path: os.PathLike, family: Optional[str] = None, algorithm: Optional[str] = None):
    """The CompiledKernel of ``family`` (optional when DIR holds one family) from DIR.

    Its ``.step`` is the decode step from DIR when it was compiled too (``--step``).
    """
    from ssmc.api import parse_target
    folder = Path(path)
    manifest = _read_manifest(folder)
    target = parse_target(manifest["target"])
    if not target.runs_here:
        raise SSMCError(f"{folder} holds {target.name} artifacts (cross-compiled); they run on "
                        "that machine, not through ssmc.load")
    _check_versions(folder, manifest)
    entries: List[dict] = manifest.get("kernels", [])
    families = sorted({e["family"] for e in entries})
    if family is None:
        if len(families) != 1:
            raise SSMCError(f"{folder} holds {len(families)} families ({', '.join(families) or 'none'}); "
                            "pick one with family=")
        family = families[0]
    mine = [e for e in entries if e["family"] == family]
    if not mine:
        raise SSMCError(f"{folder} has no family {family!r} (it has: {', '.join(families)})")
    step_entries = [e for e in mine if e["algorithm"] == Algorithm.STEP.value]
    if algorithm is not None:
        main_entries = [e for e in mine if e["algorithm"] == Algorithm(algorithm).value]
    else:
        main_entries = [e for e in mine if e["algorithm"] != Algorithm.STEP.value] or step_entries
    if not main_entries:
        have = ", ".join(e["algorithm"] for e in mine)
        raise SSMCError(f"{folder}: {family} was not compiled with algorithm {algorithm} "
                        f"(it has: {have})")
    spec = _spec(folder, manifest)
    kernel = _kernel(folder, spec, target, main_entries[0])
    if step_entries and main_entries[0] is not step_entries[0]:
        kernel._step = _kernel(folder, spec, target, step_entries[0])
    return kernel


__all__ = ["load"]
