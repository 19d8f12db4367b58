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
