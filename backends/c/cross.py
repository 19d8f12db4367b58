"""The cross targets: the same C, built with Debian's cross gcc, run under qemu-user.

``build_cross`` writes the sources and cross-builds the shared library plus two static
executables (the example and the test driver; static so that qemu-user needs no target
sysroot). ``run_problem`` runs a bound problem through the cross-built driver under qemu and
returns ``(y, final_state_or_None)`` like a host kernel, so tests compare it with the oracle.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ssmc.errors import CallError, TargetError
from ssmc.ir import KernelPlan

from .artifact import source_files, write_sources
from .calling import Call, float_strides, marshal, results
from .layout import make_layout
from .programs import TAG_IN, TAG_INOUT, TAG_NULL, TAG_OUT
from .toolchain import ERRORS, compile_cached, describe

APT_PACKAGES = {"aarch64-linux-gnu": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user",
                "riscv64-linux-gnu": "gcc-riscv64-linux-gnu libc6-dev-riscv64-cross qemu-user"}


def cross_compiler(triple: str) -> str:
    return f"{triple}-gcc"


def emulator(triple: str) -> str:
    return f"qemu-{triple.split('-')[0]}"


def missing_tools(triple: str) -> Optional[str]:
    """None when the cross compiler and qemu-user are installed, else what to install."""
    missing = [tool for tool in (cross_compiler(triple), emulator(triple)) if not shutil.which(tool)]
    if not missing:
        return None
    packages = APT_PACKAGES.get(triple, f"gcc-{triple} qemu-user")
    return f"{', '.join(missing)} not found (Debian: apt-get install {packages})"


def _flags(config: dict) -> List[str]:
    fast = ["-ffast-math"] if config.get("fast_math") else []
    return ["-std=c99", config.get("opt", "-O3"), "-Wall", "-Werror"] + fast + list(
        config.get("cflags", ()))


def _cross_build(plan: KernelPlan, config: dict, triple: str, cache,
                 which=("library", "example", "driver")):
    """{artifact name: cached path} of the plan built with the cross compiler.

    ``which`` picks among the shared library and the static example and test driver.
    """
    if triple not in APT_PACKAGES:
        raise TargetError(f"unknown cross triple {triple!r}; expected one of "
                          f"{', '.join(APT_PACKAGES)}")
    cc = cross_compiler(triple)
    if not shutil.which(cc):
        raise TargetError(f"cross compiler {cc} not found (Debian: apt-get install "
                          f"{APT_PACKAGES[triple]})")
    prefix = make_layout(plan).prefix
    files = source_files(plan, config)
    kernel = {n: files[n] for n in (f"{prefix}.c", f"{prefix}.h")}
    static = _flags(config) + ["-static"]
    recipes = {
        "library": (f"lib{prefix}.so", kernel, _flags(config) + ["-fPIC", "-shared"]),
        "example": ("example", dict(kernel, **{"main.c": files["main.c"]}), static),
        "driver": (f"{prefix}_driver",
                   dict(kernel, **{f"{prefix}_driver.c": files[f"{prefix}_driver.c"]}), static),
    }
    # The target as `ssmc compile --target` names it: the triple's architecture.
    about = describe(plan, triple.split("-")[0])
    built = {}
    for what in which:
        name, sources, flags = recipes[what]
        built[what] = compile_cached(sources, name, flags, cache, cc, about=about)
    return built


def build_cross(plan: KernelPlan, config: dict, triple: str, out_dir, cache) -> List[Path]:
    """Sources, Makefile, and the cross-built lib<family>.so, example and driver in out_dir."""
    built = _cross_build(plan, config, triple, cache)
    paths = write_sources(plan, config, out_dir)
    for cached in built.values():
        dest = Path(out_dir) / cached.name
        shutil.copy2(cached, dest)
        paths.append(dest)
    return paths


# --------------------------------------------------------------------------------------------
# Running a problem under qemu

def _span(p, t: torch.Tensor) -> torch.Tensor:
    """The floats a strided view reaches, from its first element to its last (gaps included)."""
    flat = torch.view_as_real(t) if p.is_complex else t
    strides = float_strides(p, t)
    if t.numel() == 0:
        return flat.new_empty(0)
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, strides))
    span += 1 if p.is_complex else 0
    return flat.as_strided((span,), (1,))


def write_arguments(call: Call, path: Path) -> None:
    out = bytearray()
    for p, value in call.flat():
        if p.kind == "size":
            out += struct.pack("<q", int(value))
            continue
        if p.kind == "offsets":
            if value is None:
                out += struct.pack("<qq", TAG_NULL, 0)
            else:
                out += struct.pack("<qq", TAG_IN, value.numel()) + value.numpy().astype("<i8").tobytes()
            continue
        if value is None:
            out += struct.pack("<qq", TAG_NULL, 0) + struct.pack(f"<{len(p.dims)}q", *[0] * len(p.dims))
            continue
        data = _span(p, value)
        tag = {"in": TAG_IN, "out": TAG_OUT, "inout": TAG_INOUT}[p.role]
        out += struct.pack("<qq", tag, data.numel())
        if tag in (TAG_IN, TAG_INOUT):
            out += data.contiguous().numpy().astype("<f4").tobytes()
        out += struct.pack(f"<{len(p.dims)}q", *float_strides(p, value))
    path.write_bytes(bytes(out))


def read_outputs(call: Call, path: Path) -> int:
    raw = path.read_bytes()
    (code,), pos = struct.unpack_from("<q", raw, 0), 8
    for p, value in call.flat():
        if p.kind != "tensor" or value is None or p.role == "in":
            continue
        data = _span(p, value)
        n = data.numel()
        floats = torch.frombuffer(bytearray(raw[pos:pos + 4 * n]), dtype=torch.float32)
        data.copy_(floats)
        pos += 4 * n
    return code


def run_problem(plan: KernelPlan, config: dict, triple: str, problem, cache,
                workdir: Optional[Path] = None, timeout: float = 120.0) -> Tuple[torch.Tensor, object]:
    """Run ``problem`` through the cross-built driver under qemu-user; (y, final_or_None)."""
    reason = missing_tools(triple)
    if reason:
        raise TargetError(reason)
    built = _cross_build(plan, config, triple, cache, which=("driver",))
    layout = make_layout(plan)
    call = marshal(layout, problem)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        args, outs = Path(tmp) / "args.bin", Path(tmp) / "outputs.bin"
        write_arguments(call, args)
        cmd = [emulator(triple), str(built["driver"]), str(args), str(outs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise TargetError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        code = read_outputs(call, outs)
    if code != 0:
        raise CallError(f"{layout.entry} refused its arguments: {ERRORS.get(code, code)}")
    return results(call)


def run_example(plan: KernelPlan, config: dict, triple: str, cache) -> str:
    """The cross-built example's output under qemu (its checksum lines)."""
    built = _cross_build(plan, config, triple, cache, which=("example",))
    proc = subprocess.run([emulator(triple), str(built["example"])], capture_output=True,
                          text=True, timeout=120, check=True)
    return proc.stdout
