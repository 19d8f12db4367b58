"""What the C target writes: readable documented sources, a main.c that builds and runs, a
Makefile, the build cache. The example's checksum is checked against the float64 oracle run on
the same (reproduced) random inputs."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from families import mamba1, mamba2, s4d, s5
from ssmc.backends import reference
from ssmc.ir import Algorithm, Method
from ssmc.plan import convention_of, ir_hash, make_plan
from ssmc.signature import bind

c_backend = pytest.importorskip("ssmc.backends.c")
from ssmc.backends.c.layout import make_layout  # noqa: E402
from ssmc.backends.c.programs import EXAMPLE_BATCH, EXAMPLE_SEQLEN, value_range  # noqa: E402
import backend_calls as calls
from ssmc.runtime.cache import ArtifactCache

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (apt-get install gcc)")
needs_make = pytest.mark.skipif(shutil.which("make") is None,
                                reason="needs make for the Makefile (apt-get install make)")

STRICT_CFLAGS = "-std=c99 -O2 -pedantic -Wall -Wextra -Werror"

EXAMPLE_PLANS = {
    "mamba2-chunked": lambda: make_plan(mamba2(groups=2)),
    "mamba1-scan": lambda: make_plan(mamba1(method=Method.ZOH)),
    "s5-scan": lambda: make_plan(s5(method=Method.BILINEAR)),
    "s4d-complex-conv-trapezoidal": lambda: make_plan(s4d(complex_a=True, method=Method.TRAPEZOIDAL)),
    "mamba2-step": lambda: make_plan(mamba2(), Algorithm.STEP),
    "s5-step": lambda: make_plan(s5(), Algorithm.STEP),
}


# --------------------------------------------------------------------------------------------
# The example's inputs, reproduced: the same generator, in the same order, as main.c

class ExampleRandom:
    def __init__(self):
        self.state = 0x853C49E6748FEA9B

    def uniform(self, lo: float, hi: float) -> np.float32:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        r = np.float32(self.state >> 40)
        lo32, hi32 = np.float32(lo), np.float32(hi)
        return (hi32 - lo32) * r / np.float32(16777216.0) + lo32


def example_buffers(plan):
    layout = make_layout(plan)
    rng = ExampleRandom()
    sizes = dict(layout.sizes, b=EXAMPLE_BATCH, s=EXAMPLE_BATCH, l=EXAMPLE_SEQLEN, k=EXAMPLE_SEQLEN)
    buffers = {}
    for p in layout.params:
        if p.kind != "tensor":
            continue
        shape = [sizes[d] for d in p.dims]
        count = math.prod(shape) * (2 if p.is_complex else 1)
        lo, hi, im_lo, im_hi = value_range(layout, p)
        values = np.array([rng.uniform(im_lo, im_hi) if p.is_complex and i & 1 else rng.uniform(lo, hi)
                           for i in range(count)], dtype=np.float32)
        t = torch.from_numpy(values)
        buffers[p] = torch.view_as_complex(t.view(*shape, 2)) if p.is_complex else t.view(*shape)
    return layout, buffers


def weighted_checksum(t: torch.Tensor) -> tuple:
    flat = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1).to(torch.float64)
    weights = torch.arange(flat.numel(), dtype=torch.float64) % 7 + 1
    return float((flat * weights).sum()), float((flat * weights).abs().sum())


def oracle_checksums(plan) -> dict:
    """What main.c must print, from the float64 oracle on its inputs."""
    layout, buffers = example_buffers(plan)
    kwargs = {p.name: t for p, t in buffers.items() if p.role in ("in", "inout")}
    outputs = [p for p in buffers if p.role != "in" and p.name != "conv_kernel"]
    if any(p.role == "out" and "state" in p.name for p in outputs):
        kwargs["return_last_state" if "last_state" in [p.name for p in outputs]
               else "return_final_states"] = True
    problem = bind(plan.family, convention_of(plan), (), kwargs)
    y64, state64 = reference.run_float64(problem)
    result = {}
    for p in outputs:
        result[p.name] = weighted_checksum(state64 if "state" in p.name else y64)
    return result


def parse_checksums(stdout: str) -> dict:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r": (\w+) checksum (-?[\d.]+(?:e[-+]?\d+)?)", stdout)}


def assert_checksums_match_oracle(plan, stdout: str):
    printed, expected = parse_checksums(stdout), oracle_checksums(plan)
    assert set(printed) == set(expected), stdout
    for name, (value, scale) in expected.items():
        assert abs(printed[name] - value) <= 1e-5 * scale + 1e-5, (name, printed[name], value)


# --------------------------------------------------------------------------------------------

@needs_make
@pytest.mark.parametrize("name", list(EXAMPLE_PLANS))
def test_example_main_builds_strictly_and_prints_the_oracle_checksum(name, tmp_path):
    plan = EXAMPLE_PLANS[name]()
    paths = calls.write_artifact(c_backend, plan, {}, tmp_path)
    names = {p.name for p in paths}
    prefix = make_layout(plan).prefix
    assert {f"{prefix}.c", f"{prefix}.h", "main.c", "Makefile"} <= names
    proc = subprocess.run(["make", "-s", "all", "run", f"CFLAGS={STRICT_CFLAGS}"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"lib{prefix}.so").exists()
    assert_checksums_match_oracle(plan, proc.stdout)


@needs_make
def test_makefile_compiler_is_overridable(tmp_path):
    plan = EXAMPLE_PLANS["mamba1-scan"]()
    calls.write_artifact(c_backend, plan, {}, tmp_path)
    proc = subprocess.run(["make", "-n", "CC=my-cross-cc", "example"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("my-cross-cc ")


@pytest.mark.parametrize("name", list(EXAMPLE_PLANS))
def test_source_is_documented_portable_c99(name):
    plan = EXAMPLE_PLANS[name]()
    files = c_backend.lower_files(plan, calls.config(c_backend, plan))
    layout = make_layout(plan)
    header, source = files[f"{layout.prefix}.h"], files[f"{layout.prefix}.c"]
    assert source == calls.lower(c_backend, plan, {})
    for text in (header, source):
        assert text.isascii()
        assert "<complex.h>" not in text and "malloc" not in text
    includes = set(re.findall(r"#include <([^>]+)>", source + header))
    assert includes <= {"math.h", "stddef.h", "stdint.h", "string.h"}, includes
    assert plan.family.name in header and ir_hash(plan) in header
    assert str(plan.disc.abar) in header                 # the discretized math, as derived
    for p in layout.params:                              # every argument documented
        assert re.search(rf"\*\s+{p.name}\s", header), p.name
        for stride in p.stride_names():
            assert stride in header
    assert "restrict" in header and "int64_t" in header
    assert f"int {layout.entry}(" in header and f"int {layout.entry}(" in source


def test_expressions_come_from_the_plan():
    """Changing the method changes the printed coefficients: nothing is hand-typed per method."""
    zoh = calls.lower(c_backend, make_plan(mamba1(method=Method.ZOH)), {})
    euler = calls.lower(c_backend, make_plan(mamba1(method=Method.EULER)), {})
    assert "expm1f(" in zoh and "expm1f(" not in euler     # zoh's Bbar = expm1(a dt)/a
    assert "log1pf(expf(" in zoh and "> 20" in zoh          # the stable softplus, printed from the Δ map
    complex_src = calls.lower(c_backend, make_plan(s5()), {})
    assert "cosf(" in complex_src and "sinf(" in complex_src and " cos(" not in complex_src


def test_build_cache_respects_ssmc_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    plan = make_plan(mamba1(channels=6, state=3, name="CacheProbe"))
    first = calls.build(c_backend, plan, {})
    assert first.library.is_relative_to(tmp_path / "kernels")   # the ssmc artifact cache
    stamp = first.library.stat().st_mtime_ns
    second = calls.build(c_backend, plan, {})
    assert second.library == first.library and second.library.stat().st_mtime_ns == stamp
    assert second.source == calls.lower(c_backend, plan, {})  # the cached source is kept beside it
    other = calls.build(c_backend, plan, {"opt": "-O1"})       # flags are part of the key
    assert other.library != first.library


def test_cache_entries_name_family_algorithm_and_target(tmp_path, monkeypatch):
    """What `ssmc cache ls` shows of a C entry; the key's parts are kept beside it."""
    from ssmc.runtime.cache import ArtifactCache
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    plan = make_plan(mamba1(channels=6, state=3, name="LsProbe"), Algorithm.STEP)
    kernel = calls.build(c_backend, plan, {})
    [entry] = ArtifactCache(tmp_path).ls()
    described = entry.description
    assert (described["family"], described["algorithm"], described["target"]) == \
        ("LsProbe", "step", "c")
    assert described["backend"] == "c" and described["output"] == kernel.library.name


def test_generated_c_with_a_compile_error_is_reported(monkeypatch, tmp_path):
    from ssmc.backends.c import toolchain
    from ssmc.errors import TargetError
    with pytest.raises(TargetError, match="failed on the generated C"):
        toolchain.compile_cached({"bad.c": "int f(void) { return x; }\n"}, "libbad.so",
                                 ["-std=c99", "-shared", "-fPIC"], ArtifactCache(tmp_path))


def test_bf16_loaders_in_the_header_round_like_torch(tmp_path, seed):
    """The header's bf16 <-> float helpers (for callers holding bf16 data) agree with torch."""
    import ctypes
    from ssmc.backends.c import toolchain
    header = c_backend.lower_header(make_plan(mamba1()), {})
    shim = ('#include "mamba1.h"\n'
            "void widen(const uint16_t *s, float *d, int64_t n) { ssmc_bf16_to_float(s, d, n); }\n"
            "void narrow(const float *s, uint16_t *d, int64_t n) { ssmc_float_to_bf16(s, d, n); }\n")
    lib = ctypes.CDLL(str(toolchain.compile_cached(
        {"mamba1.h": header, "shim.c": shim}, "libshim.so",
        ["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"],
        ArtifactCache(tmp_path))))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=gen) * torch.exp(8 * torch.randn(4096, generator=gen))
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.0e38, 1e-40,
                         float("inf"), -float("inf"), 0.0, -0.0])
    x = torch.cat([x, ties])
    out = torch.empty(x.numel(), dtype=torch.int16)
    lib.narrow(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(x.numel()))
    assert torch.equal(out, x.to(torch.bfloat16).view(torch.int16))
    back = torch.empty(x.numel(), dtype=torch.float32)
    lib.widen(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(back.data_ptr()), ctypes.c_int64(x.numel()))
    assert torch.equal(back, x.to(torch.bfloat16).to(torch.float32))
    nan = torch.tensor([float("nan")])
    lib.narrow(ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(1))
    assert torch.isnan(out[:1].view(torch.bfloat16)).all()
