"""The CPU backend's machinery: readable TIR, vectorized math in the compiled code, the disk
cache, artifacts (host and cross), LLVM target strings, and what it refuses."""
from __future__ import annotations

import ast
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from families import dense, mamba1, mamba2, s4_dplr
from ssmc.backends import cpu
from ssmc.backends.cpu import tvmbuild
from ssmc.errors import TargetError
from ssmc.ir import Algorithm
from ssmc.plan import make_plan
from test_cpu_helpers import CONFIG, check, problem

from conftest import EXAMPLES, TOL, rel_err

# ELF e_machine of the cross triples (TVM's LLVM has both targets).
ELF_MACHINE = {"aarch64-linux-gnu": 183, "riscv64-linux-gnu": 243}
ET_REL, ET_DYN = 1, 3


def elf_header(path):
    """(e_type, e_machine) of a little-endian ELF file."""
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return struct.unpack("<HH", head[16:20])


def test_lower_is_readable_tvmscript_that_parses():
    import tvm
    plan = make_plan(mamba1())
    src = cpu.lower(plan, CONFIG)
    assert src.startswith("# ssmc cpu kernel: Mamba1, algorithm scan")
    for piece in ("T.parallel", "T.vectorized", "def ssmc_scan", "T.round("):
        assert piece in src, piece
    assert "T.exp(" not in src, "the hot loop must use the vectorizable polynomial exp"
    assert tvm.script.from_source(src) is not None


@pytest.mark.parametrize("scalef", [True, False], ids=["ldexp", "exponent_bits"])
def test_compiled_scan_has_no_scalar_libm_calls(scalef):
    """T.exp would lower to scalar expf calls; the generated kernel must not call libm, with
    either way of applying 2^k."""
    plan = make_plan(mamba1(channels=32, state=16))
    cfg = dict(CONFIG, scalef=scalef)
    exe, _ = tvmbuild.compile_source(cpu.lower(plan, cfg), tvmbuild.target_dict("cpu"))
    ir = exe.mod.inspect_source("ll")
    for fn in ("@expf", "@logf", "@ldexpf", "@llvm.exp.f32", "@llvm.log.f32"):
        assert fn not in ir, f"scalar {fn} in the scan kernel"
    assert "x float>" in ir, "no vector arithmetic in the scan kernel"


def test_exponent_bits_variant_is_correct(seed):
    """The 2^k-from-bits exp (targets without AVX-512's vscalefps), against the oracle."""
    from test_cpu_helpers import kernel
    fam = mamba1(method=__import__("ssmc.ir", fromlist=["Method"]).Method.ZOH)
    k = kernel(fam, scalef=False)
    for L in (7, 33):
        check(k, problem(fam, seqlen=L, seed=seed + L, with_state=True), what=f"bits L={L}")


def test_disk_cache_reload(tmp_path, seed):
    plan = make_plan(mamba2(heads=2, head_dim=8, state=8))
    config = {"cache_dir": str(tmp_path)}
    first = cpu.build(plan, config)
    # The library lives in the ssmc artifact cache (atomic, locked, verified; `ssmc cache ls`).
    from ssmc.runtime.cache import ArtifactCache
    assert not first.cached and first.path.exists()
    assert first.path.parent.parent.parent == tmp_path / "kernels"
    entries = ArtifactCache(tmp_path).ls()
    assert [e.path for e in entries] == [first.path.parent]
    # `ssmc cache ls` names what an entry is; the resolved LLVM target is kept beside it.
    described = entries[0].description
    assert (described["family"], described["algorithm"], described["target"]) == \
        (plan.family.name, plan.algorithm.value, "cpu")
    assert described["llvm_target"] == tvmbuild.target_dict("cpu")
    tvmbuild._MEMO.clear()   # a new process: only the disk cache is left
    second = cpu.build(plan, config)
    assert second.cached and second.path == first.path
    # the plan's TIR text was reused from the cache too (no generation on a warm build)
    assert list((tmp_path / "cpu").glob("*.plan"))
    assert (first.path.parent / "kernel.tir.py").read_text() == first.source
    third = cpu.build(plan, config)   # in-process memo
    assert third.cached
    p = problem(plan.family, seqlen=9, seed=seed, with_state=True)
    check(second, p, what="kernel loaded from the disk cache")


def test_write_artifact_host(tmp_path):
    import tvm
    plan = make_plan(mamba1(channels=16, state=8), Algorithm.STEP)
    paths = cpu.write_artifact(plan, CONFIG, tmp_path)
    text, lib = paths
    assert text.endswith(".tir.py") and "def ssmc_step" in open(text).read()
    assert lib.endswith(".so")
    module = tvm.runtime.load_module(lib)
    assert module["ssmc_step"] is not None


def test_write_artifact_again_copies_the_cache_entry(tmp_path, monkeypatch):
    """A host plan written before is copied from its cache entry: no TIR is generated (and so
    no TVM is needed) the second time, and the files are the same."""
    plan = make_plan(mamba1(channels=8, state=4, name="CopyProbe"))
    config = {"cache_dir": str(tmp_path / "cache")}
    first = cpu.write_artifact(plan, config, tmp_path / "a")
    monkeypatch.setattr(cpu, "lower", lambda *a: pytest.fail("TIR generated for a cached plan"))
    second = cpu.write_artifact(plan, config, tmp_path / "b")
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize("triple", list(ELF_MACHINE))
def test_write_artifact_cross_without_a_linker_writes_the_object(triple, tmp_path, monkeypatch,
                                                                capsys):
    """Without a cross gcc (forced here, so that this runs everywhere) the object file is the
    artifact, and one line says why and what to install for the shared object."""
    monkeypatch.setattr(tvmbuild, "cross_linker", lambda triple: None)
    plan = make_plan(mamba1(channels=16, state=8))
    cfg = dict(CONFIG, llvm_target=f"llvm -mtriple={triple}")
    text, lib = cpu.write_artifact(plan, cfg, tmp_path)
    assert text.endswith(".tir.py") and lib.endswith("_cpu.o")
    assert elf_header(lib) == (ET_REL, ELF_MACHINE[triple])
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and f"no cross linker {triple}-gcc" in note[0]
    assert f"apt-get install gcc-{triple}" in note[0]
    with pytest.raises(TargetError, match="does not run on this machine"):
        cpu.build(plan, cfg)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the cross linker aarch64-linux-gnu-gcc "
                           "(Debian: apt-get install gcc-aarch64-linux-gnu)")
def test_write_artifact_cross_aarch64_links_a_shared_object(tmp_path):
    plan = make_plan(mamba1(channels=16, state=8))
    cfg = dict(CONFIG, llvm_target="llvm -mtriple=aarch64-linux-gnu")
    text, lib = cpu.write_artifact(plan, cfg, tmp_path)
    assert lib.endswith("_cpu.so")
    assert elf_header(lib) == (ET_DYN, ELF_MACHINE["aarch64-linux-gnu"])


def test_cached_cli_compile_imports_neither_torch_nor_tvm(tmp_path):
    """A repeated `ssmc compile --target cpu` copies the cached library: importing torch and
    TVM (seconds) would be most of its time."""
    code = ("import sys; from ssmc.cli import main\n"
            f"status = main(['compile', {str(EXAMPLES / 'mamba1.ssm')!r}, '--target', 'cpu', "
            f"'-o', sys.argv[1]])\n"
            "assert status == 0, status\n"
            "print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))")
    env = dict(os.environ, SSMC_CACHE_DIR=str(tmp_path / "cache"))
    cold, warm = (subprocess.run([sys.executable, "-c", code, str(tmp_path / out)], env=env,
                                 capture_output=True, text=True, check=True) for out in "ab")
    assert "tvm" in ast.literal_eval(cold.stdout.splitlines()[-1]), "the first run compiles"
    assert ast.literal_eval(warm.stdout.splitlines()[-1]) == [], warm.stdout + warm.stderr
    for name in ("Mamba1_scan_cpu.so", "Mamba1_scan_cpu.tir.py"):
        a, b = (tmp_path / out / "Mamba1" / "scan" / name for out in "ab")
        assert a.read_bytes() == b.read_bytes(), name


def test_target_strings():
    host = tvmbuild.target_dict("cpu")
    assert host["kind"] == "llvm" and host["mcpu"] not in ("", "native")
    assert tvmbuild.target_dict("llvm -mcpu=native") == host
    t = tvmbuild.target_dict("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    assert t == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    with pytest.raises(TargetError):
        tvmbuild.target_dict("cuda -arch=sm_90")
    with pytest.raises(TargetError):
        tvmbuild.target_dict("llvm mcpu")


def test_refuses_matrix_a_with_reasons():
    assert "dplr" in cpu.supports(make_plan(s4_dplr(), Algorithm.SCAN))
    assert "dense" in cpu.supports(make_plan(dense(), Algorithm.SCAN))
    with pytest.raises(TargetError):
        cpu.build(make_plan(dense(), Algorithm.SCAN), CONFIG)


def test_candidates_are_valid_configs(seed):
    plan = make_plan(mamba1(channels=16, state=8))
    cands = cpu.candidates(plan)
    assert len(cands) >= 2 and all("lanes" in c for c in cands)
    k = cpu.build(plan, dict(cands[-1], **CONFIG))
    check(k, problem(plan.family, seqlen=7, seed=seed), what=str(cands[-1]))


def test_through_ssmc_compile(seed):
    import ssmc
    spec = """
ssm Tiny {
  dims       heads = 2, head_dim = 8, state = 8, groups = 1
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per head
  gate       silu(z)
  discretize exp_euler
  compute    chunked(8)
}
"""
    fn = ssmc.compile(spec, target="cpu", config=CONFIG)
    kw = fn.example_inputs(batch=2, seqlen=11, seed=seed)
    kw_np = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y = fn(**kw_np)   # numpy inputs are converted by signature.bind
    ref = ssmc.compile(spec, target="reference")(**kw)
    assert rel_err(y, ref.double()) <= TOL["float32"]
