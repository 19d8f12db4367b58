"""The cross targets: the generated C built by Debian's cross gcc, run under qemu-user, checked
against the float64 oracle on the host (arguments and results travel through a binary file).

Skips, naming the apt packages, where the cross compiler or qemu-user is missing.
"""
from __future__ import annotations

import subprocess

import pytest

from families import mamba1, mamba2, s4d, s5
from ssmc.ir import Algorithm, Method
from ssmc.plan import make_plan
from ssmc.runtime.cache import default_cache
import backend_calls as calls

from test_c_artifacts import assert_checksums_match_oracle
from test_c_kernels import _strided_copy, check_against_oracle, inputs

c_backend = pytest.importorskip("ssmc.backends.c")
from ssmc.backends.c import cross  # noqa: E402
import backend_calls as calls

TRIPLES = {"aarch64": "aarch64-linux-gnu", "riscv64": "riscv64-linux-gnu"}
ELF_MACHINE = {"aarch64": 183, "riscv64": 243}
STRICT = {"cflags": ["-pedantic", "-Wextra"]}


@pytest.fixture(params=list(TRIPLES))
def target(request):
    reason = cross.missing_tools(TRIPLES[request.param])
    if reason:
        pytest.skip(reason)
    return request.param


def run_cross(target, plan):
    def run(problem):
        return cross.run_problem(plan, calls.config(c_backend, plan, STRICT), TRIPLES[target],
                                 problem, default_cache())
    return run


def test_ssd_varlen_with_states_under_qemu(target, seed):
    plan = make_plan(mamba2(groups=2, method=Method.ZOH))
    kwargs = inputs(plan, seed, varlen=[5, 0, 12], with_state=True)
    check_against_oracle(plan, kwargs, run=run_cross(target, plan))


def test_selective_scan_with_strided_views_under_qemu(target, seed):
    plan = make_plan(mamba1(groups=2, method=Method.TRAPEZOIDAL))
    kwargs = inputs(plan, seed, seqlen=17, with_state=True)
    for name in ("u", "B", "initial_state"):
        kwargs[name] = _strided_copy(kwargs[name], 0)
    check_against_oracle(plan, kwargs, run=run_cross(target, plan))


@pytest.mark.parametrize("family", [s4d(complex_a=True, method=Method.BILINEAR),
                                    s5(method=Method.ZOH)], ids=["complex-conv", "complex-scan"])
def test_complex_diagonal_under_qemu(target, family, seed):
    plan = make_plan(family)
    check_against_oracle(plan, inputs(plan, seed, seqlen=33, with_state=True),
                         run=run_cross(target, plan))


def test_decode_step_under_qemu(target, seed):
    plan = make_plan(mamba2(groups=2), Algorithm.STEP)
    check_against_oracle(plan, inputs(plan, seed, batch=3), run=run_cross(target, plan))


def test_cross_artifact_and_example(target, tmp_path):
    plan = make_plan(mamba1(method=Method.ZOH))
    paths = calls.write_artifact(c_backend, plan, {}, tmp_path, target=target)
    names = {p.name for p in paths}
    assert {"mamba1.c", "mamba1.h", "main.c", "Makefile", "libmamba1.so", "example"} <= names
    for binary in ("libmamba1.so", "example", "mamba1_driver"):
        head = (tmp_path / binary).read_bytes()[:20]
        assert head[:4] == b"\x7fELF"
        assert int.from_bytes(head[18:20], "little") == ELF_MACHINE[target], binary
    # The static example runs under qemu and prints the oracle's checksum.
    proc = subprocess.run([cross.emulator(TRIPLES[target]), str(tmp_path / "example")],
                          capture_output=True, text=True, timeout=120, check=True)
    assert_checksums_match_oracle(plan, proc.stdout)


def test_config_triple_selects_the_cross_build(tmp_path, monkeypatch):
    """`ssmc compile --target aarch64` hands the backend config {"triple": ...}; the cache
    entries it builds name that target for `ssmc cache ls`."""
    from ssmc.runtime.cache import ArtifactCache
    triple = TRIPLES["aarch64"]
    if cross.missing_tools(triple):
        pytest.skip(cross.missing_tools(triple))
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    paths = calls.write_artifact(c_backend, make_plan(s4d()), {"triple": triple}, tmp_path / "out")
    assert (tmp_path / "out" / "libs4d.so") in paths
    described = [e.description for e in ArtifactCache(tmp_path / "cache").ls()]
    assert {(d["family"], d["target"]) for d in described} == {("S4D", "aarch64")}


def test_missing_tools_name_the_apt_packages(monkeypatch):
    monkeypatch.setattr(cross.shutil, "which", lambda name: None)
    reason = cross.missing_tools("riscv64-linux-gnu")
    assert "riscv64-linux-gnu-gcc" in reason and "qemu-riscv64" in reason
    assert "apt-get install gcc-riscv64-linux-gnu" in reason and "qemu-user" in reason
