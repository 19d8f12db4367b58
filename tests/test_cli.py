"""The `ssmc` command end to end: exit codes, error rendering, compile artifacts and manifest."""
import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES


def ssmc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ssmc", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_help_lists_every_command():
    out = ssmc("--help")
    assert out.returncode == 0
    for command in ("check", "show", "compile"):
        assert command in out.stdout
    out = ssmc("compile", "--help")
    assert out.returncode == 0
    for flag in ("--target", "--output", "--family", "--algorithm", "--step", "--config"):
        assert flag in out.stdout
    for target in ("reference", "cuda", "cpu", "aarch64", "riscv64"):
        assert target in out.stdout


def test_check_examples_ok():
    out = ssmc("check", *sorted(EXAMPLES.glob("*.ssm")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok") == len(list(EXAMPLES.glob("*.ssm")))


def test_check_error_has_location_caret_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.ssm"
    text = (EXAMPLES / "mamba1.ssm").read_text()
    lines = text.splitlines()
    # Misspell the discretization method on its line.
    idx = next(i for i, l in enumerate(lines) if "discretize" in l)
    method = lines[idx].split()[-1]
    lines[idx] = lines[idx].replace(method, "zho")
    bad.write_text("\n".join(lines) + "\n")
    out = ssmc("check", bad)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    col = lines[idx].index("zho") + 1
    assert f"bad.ssm:{idx + 1}:{col}" in out.stderr
    assert "zoh" in out.stderr                       # the expected words name the methods
    caret_line = [l for l in out.stderr.splitlines() if l.strip() == "^"]
    assert caret_line and caret_line[0].index("^") - 4 == col - 1


def test_unknown_target_is_a_clear_error():
    out = ssmc("compile", EXAMPLES / "mamba1.ssm", "--target", "tpu", "-o", "/tmp/x")
    assert out.returncode == 1 and "unknown target 'tpu'" in out.stderr
    assert "Traceback" not in out.stderr


def test_show_ir_and_discretization():
    out = ssmc("show", "ir", EXAMPLES / "mamba2.ssm")
    assert out.returncode == 0, out.stderr
    assert "scalar" in out.stdout and "chunked" in out.stdout
    out = ssmc("show", "discretization", EXAMPLES / "mamba1.ssm")
    assert out.returncode == 0, out.stderr
    assert "exp" in out.stdout
    # the backward kernels' derivatives, derived from the same expressions
    assert "∂Ā/∂Δ = a*exp(a*dt)" in out.stdout and "∂Ā/∂a = dt*exp(a*dt)" in out.stdout
    assert "∂Δ/∂dt_raw = 1/(exp(-dt_bias - dt_raw) + 1)" in out.stdout


def test_compile_reference_writes_artifact_and_manifest(tmp_path):
    out = ssmc("compile", EXAMPLES / "mamba1.ssm", "--target", "reference", "-o", tmp_path, "--step")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["target"] == "reference"
    assert len(manifest["spec_sha256"]) == 64
    algos = {k["algorithm"] for k in manifest["kernels"]}
    assert algos == {"scan", "step"}
    for k in manifest["kernels"]:
        assert k["files"], k
        for f in k["files"]:
            assert (tmp_path / f).stat().st_size > 0
        assert len(k["ir_hash"]) == 16
    assert manifest["versions"]["sympy"]


def test_compile_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert ssmc("compile", EXAMPLES / "mamba2.ssm", "--target", "reference", "-o", d).returncode == 0
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for ka, kb in zip(ma["kernels"], mb["kernels"]):
        assert ka["ir_hash"] == kb["ir_hash"]
        for f in ka["files"]:
            assert (a / f).read_bytes() == (b / f).read_bytes()


def test_compile_c_does_not_import_torch(tmp_path):
    # The C target is for machines without Python ML stacks; generating it should not pay
    # torch's import (it once made `ssmc compile --target c` take 4 s).
    code = ("import sys; from ssmc.cli import main\n"
            "try:\n"
            f"    main(['compile', {str(EXAMPLES / 's4d.ssm')!r}, '--target', 'c', "
            f"'-o', {str(tmp_path)!r}])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'scipy.linalg', 'tvm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert (tmp_path / "manifest.json").exists()


def test_compile_for_a_cuda_arch(tmp_path):
    # cuda:sm_90 once reached the chunked generator as a config key and was refused.
    out = ssmc("compile", EXAMPLES / "mamba2.ssm", "--target", "cuda:sm_90", "-o", tmp_path)
    assert out.returncode == 0, out.stderr
    kernels = sorted(tmp_path.glob("*/*/kernel.py"))
    assert [p.parent.name for p in kernels] == ["chunked", "step"]
    for path in kernels:
        text = path.read_text()
        assert text.startswith("# Generated by ssmc") and "\n# Target cuda:sm_90." in text
        compile(text, str(path), "exec")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["target"] == "cuda:sm_90"
    assert {k["config"].get("arch") for k in manifest["kernels"]} == {"sm_90"}


# Runs a compiled cuda artifact in a process where ssmc cannot be imported: the module must need
# only torch and triton (here under TRITON_INTERPRET=1 on the CPU).
_STANDALONE = r"""
import importlib.abc, importlib.util, inspect, sys
import torch

class NoSsmc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ssmc" or name.startswith("ssmc."):
            raise ImportError("ssmc is not installed here")
        return None

sys.meta_path.insert(0, NoSsmc())
kernel_path, inputs_path, out_path = sys.argv[1:]
spec = importlib.util.spec_from_file_location("standalone_kernel", kernel_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
inputs = torch.load(inputs_path)
params = inspect.signature(module.forward).parameters
out = module.forward(**{k: v for k, v in inputs.items() if k in params})
torch.save(out[0] if isinstance(out, tuple) else out, out_path)
"""


@pytest.mark.parametrize("spec, family, algorithm", [("mamba1.ssm", "Mamba1", "scan"),
                                                     ("mamba2.ssm", "Mamba2", "chunked")])
def test_cuda_artifact_runs_with_only_torch_and_triton(tmp_path, seed, spec, family, algorithm):
    import os

    import torch

    from conftest import assert_rel_close
    from ssmc.api import parse
    from ssmc.backends import reference
    from ssmc.signature import bind, example_inputs

    out = ssmc("compile", EXAMPLES / spec, "--target", "cuda", "-o", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    fam = parse(EXAMPLES / spec).family(family)
    inputs = example_inputs(fam, fam.convention, 2, 37, seed=seed)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    kernel = tmp_path / "out" / family / algorithm / "kernel.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(script), str(kernel), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt")
    y64, _ = reference.run_float64(bind(fam, fam.convention, (), inputs))
    assert_rel_close("y", y, y64)
