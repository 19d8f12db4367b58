"""What a new user meets first: the README's commands on a machine without a GPU, the default
target, SSMC_DEBUG from Python and from the CLI, no tracebacks, and layers that say they have no
backward pass yet instead of failing with torch's generic message."""
import os
import subprocess
import sys

import pytest
import torch

import ssmc
from ssmc.errors import SSMCError, TargetError

from conftest import EXAMPLES

TINY_SCAN = """
ssm Tiny {
  dims       channels = 8, state = 4
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective
  D          per channel
  discretize exp_euler
  compute    scan
}
"""

NO_GPU = not torch.cuda.is_available()


def ssmc_cli(*args, env=None, cwd=None):
    """The installed command as a user runs it: Triton's interpreter switch (which conftest sets
    for the test process) is not set, unless ``env`` sets it."""
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ssmc", *map(str, args)], capture_output=True,
                          text=True, env=run_env, cwd=cwd, timeout=600)


# --------------------------------------------------------------------------------------------
# No GPU: say so in one line

@pytest.mark.skipif(not NO_GPU, reason="checks the message on a machine without a GPU")
def test_tune_for_cuda_without_a_gpu_is_one_line(tmp_path):
    out = ssmc_cli("tune", EXAMPLES / "mamba2.ssm", "--target", "cuda", "--shapes", "b=4,l=4096",
                   env={"SSMC_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "NVIDIA GPU" in lines[0] and "target cpu" in lines[0], lines[0]


def test_tune_for_the_cpu_target_works(tmp_path):
    spec = tmp_path / "tiny.ssm"
    spec.write_text(TINY_SCAN)
    out = ssmc_cli("tune", spec, "--target", "cpu", "--shapes", "b=1,l=16", "-q",
                   env={"SSMC_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert "Tiny [scan] cpu" in out.stdout and "best" in out.stdout


@pytest.mark.skipif(not NO_GPU, reason="checks the message on a machine without a GPU")
def test_example_inputs_of_a_cuda_kernel_without_a_gpu(monkeypatch):
    # Built under the interpreter, as every Triton kernel of this test process: a kernel module
    # imported with TRITON_INTERPRET unset holds compiled-mode functions that break every
    # interpreted kernel run after it.
    kernel = ssmc.compile(TINY_SCAN, target="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TargetError, match="NVIDIA GPU"):
        kernel.example_inputs(batch=1, seqlen=8)
    # an explicit device is the user's choice and still works (e.g. to build inputs on the CPU)
    assert kernel.example_inputs(batch=1, seqlen=8, device="cpu")["u"].device.type == "cpu"


# --------------------------------------------------------------------------------------------
# The default target, stated

def test_compile_help_states_the_default_target():
    out = ssmc_cli("compile", "--help")
    assert out.returncode == 0
    assert "Default: reference" in " ".join(out.stdout.split())


def test_compile_without_a_target_says_it_compiles_the_oracle(tmp_path):
    out = ssmc_cli("compile", EXAMPLES / "mamba1.ssm", "-o", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "no --target given: compiling for reference" in out.stderr
    assert "for reference" in out.stdout


# --------------------------------------------------------------------------------------------
# SSMC_DEBUG, read once at each edge, prints the same stages

STAGES = ("IR", "discretization", "plan", "source")


def _stages_in(text):
    return [s for s in STAGES if f"------------------------ {s}\n" in text]


def test_debug_prints_every_stage_from_python(monkeypatch, capsys):
    monkeypatch.setenv("SSMC_DEBUG", "1")
    ssmc.compile(TINY_SCAN, target="reference")
    err = capsys.readouterr().err
    assert _stages_in(err) == list(STAGES), err[:2000]
    assert "ssmc debug: Tiny [scan] for reference" in err
    assert "SSMFamily" in err and "def " in err       # the IR, and the generated source
    monkeypatch.delenv("SSMC_DEBUG")
    ssmc.compile(TINY_SCAN, target="reference")
    assert _stages_in(capsys.readouterr().err) == []
    ssmc.compile(TINY_SCAN, target="reference", debug=True)   # the argument wins over the env
    assert _stages_in(capsys.readouterr().err) == list(STAGES)


def test_debug_prints_every_stage_from_the_cli(tmp_path):
    spec = tmp_path / "tiny.ssm"
    spec.write_text(TINY_SCAN)
    out = ssmc_cli("compile", spec, "--target", "reference", "-o", tmp_path / "out",
                   env={"SSMC_DEBUG": "1"})
    assert out.returncode == 0, out.stderr
    assert _stages_in(out.stderr) == list(STAGES)


# --------------------------------------------------------------------------------------------
# No traceback reaches a user

def test_unexpected_errors_are_one_message_without_traceback(tmp_path):
    out = ssmc_cli("check", tmp_path)          # a directory where a spec file was expected
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.startswith("error:")
    from ssmc.cli import error_text
    text = error_text(RuntimeError("boom"))
    assert "internal error: RuntimeError: boom" in text and "SSMC_DEBUG=1" in text


# --------------------------------------------------------------------------------------------
# Gradients: a clear refusal until the backward kernels exist

GRADIENT_MESSAGE = "no backward kernel for the compiled Tiny"


def test_backward_through_a_compiled_kernel_names_the_family(seed):
    kernel = ssmc.compile(TINY_SCAN, target="reference")
    inputs = kernel.example_inputs(batch=1, seqlen=6, seed=seed)
    inputs["A"].requires_grad_(True)
    y = kernel(**inputs)
    with pytest.raises(SSMCError, match=GRADIENT_MESSAGE):
        y.sum().backward()


def _layer():
    torch.manual_seed(0)
    return ssmc.nn.SSMLayer(TINY_SCAN, d_model=8, target="reference")


def test_backward_through_a_layer_names_the_family():
    layer = _layer()
    out = layer(torch.randn(1, 5, 8))
    with pytest.raises(SSMCError, match=GRADIENT_MESSAGE) as info:
        out.sum().backward()
    assert "(scan, target reference)" in str(info.value)
    state = layer.allocate_state(1)
    with pytest.raises(SSMCError, match=GRADIENT_MESSAGE) as info:
        layer.step(torch.randn(1, 8), state).sum().backward()
    assert "(step, target reference)" in str(info.value)


def test_compiled_layer_forward_works_outside_no_grad_and_backward_refuses():
    layer = _layer()
    hidden = torch.randn(1, 5, 8)
    with torch.no_grad():
        expected = layer(hidden)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(hidden)
    torch.testing.assert_close(out.detach(), expected)
    with pytest.raises(SSMCError, match=GRADIENT_MESSAGE):
        out.sum().backward()


def test_cache_ls_names_family_algorithm_and_target(tmp_path):
    spec = tmp_path / "tiny.ssm"
    spec.write_text(TINY_SCAN)
    env = {"SSMC_CACHE_DIR": str(tmp_path / "cache")}
    assert ssmc_cli("compile", spec, "--target", "cpu", "-o", tmp_path / "out",
                    env=env).returncode == 0
    out = ssmc_cli("cache", "ls", env=env)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[3:6] == ["family", "algorithm", "target"]
    assert row.split()[4:7] == ["Tiny", "scan", "cpu"], out.stdout   # created is a date and a time
