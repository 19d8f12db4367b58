"""The README's Python tour runs as written (from the repository root, on the CPU)."""
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"README block failed:\n{block}\n{out.stderr[-2000:]}"


def _readme_commands():
    """Every `ssmc ...` line of the README's shell blocks, without its trailing comment."""
    commands, fence = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "shell")
        elif fence == "shell" and line.startswith("ssmc "):
            commands.append(re.split(r"\s+#", line)[0].strip())
    return commands


def test_readme_commands_work_or_say_what_is_missing(tmp_path):
    """Run as a new user would on this machine (no GPU, maybe no cross gcc): each command exits
    0, or 1 with a short message and no traceback."""
    import os
    import shlex
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SSMC_CACHE_DIR"] = str(tmp_path / "cache")
    commands = _readme_commands()
    assert any(c.startswith("ssmc tune") for c in commands) and len(commands) >= 8
    for command in commands:
        argv = shlex.split(command)
        expanded = []
        for arg in argv[1:]:   # the shell's glob, as in `ssmc check examples/*.ssm`
            expanded += sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob(arg)) \
                if "*" in arg else [arg]
        out = subprocess.run([sys.executable, "-m", "ssmc", *expanded], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert "Traceback" not in out.stderr, f"{command}\n{out.stderr[-3000:]}"
        missing = _missing_tool(command)
        if missing and out.returncode != 0:
            # what is missing, and what to do about it, in one line
            assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert missing in out.stderr, out.stderr
        else:
            assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"


def _missing_tool(command: str):
    """The word the one-line error must hold when ``command`` needs what this machine lacks."""
    import shutil
    import torch
    if command.startswith("ssmc tune") and "--target cuda" in command \
            and not torch.cuda.is_available():
        return "GPU"
    for target, triple in (("aarch64", "aarch64-linux-gnu"), ("riscv64", "riscv64-linux-gnu")):
        if f"--target {target}" in command and shutil.which(f"{triple}-gcc") is None:
            return "apt-get install"
    return None
