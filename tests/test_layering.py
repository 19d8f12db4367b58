"""The layers of DESIGN.md section 1, read from the sources with ``ast``: a backend imports no
runtime and no other backend; the API, the autotuner and the artifact loader import no backend
module (they go through ``ssmc.backends.get``)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ROOT / "backends"
# The source tree's folders and the installed names they are imported by (pyproject.toml).
PACKAGE_OF = {"backends": "ssmc.backends", "runtime": "ssmc.runtime", "ssmc": "ssmc"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGE_OF[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, wherever it stands (a
    deferred import inside a function counts as much as one at the top)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:   # `from ssmc import runtime`, `from . import cpu`
                yield node.lineno, f"{module}.{alias.name}"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def backend_packages():
    return sorted(p.name for p in BACKENDS.iterdir() if (p / "__init__.py").exists())


def test_the_import_reader_resolves_relative_and_deferred_imports(tmp_path):
    """The checks below can fail: the reader sees what a backend would write."""
    found = dict((m, n) for n, m in imports(BACKENDS / "cpu" / "__init__.py"))
    assert "ssmc.backends.cpu.tvmbuild" in found and "ssmc.backends.cpu.launch" in found
    assert "ssmc.backends.Capabilities" in found


def test_no_backend_imports_the_runtime():
    bad = []
    for path in sorted(BACKENDS.rglob("*.py")):
        for line, module in imports(path):
            if _within(module, "ssmc.runtime") or _within(module, "runtime"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "a backend is given the cache; it never imports the runtime:\n" + "\n".join(bad)


def test_no_backend_imports_another_backend():
    packages = backend_packages()
    assert {"reference", "triton", "cpu", "c"} <= set(packages)
    bad = []
    for own in packages:
        for path in sorted((BACKENDS / own).rglob("*.py")):
            for line, module in imports(path):
                for other in packages:
                    if other != own and _within(module, f"ssmc.backends.{other}"):
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "a backend is one folder; it imports no other:\n" + "\n".join(bad)


def test_api_tune_and_artifacts_name_no_backend():
    packages = backend_packages()
    bad = []
    for rel in ("ssmc/api.py", "runtime/tune.py", "runtime/artifacts.py"):
        for line, module in imports(ROOT / rel):
            named = [p for p in packages if _within(module, f"ssmc.backends.{p}")]
            if named or module.split(".")[0] in ("triton", "tvm"):
                bad.append(f"{rel}:{line} imports {module}")
    assert not bad, "go through ssmc.backends.get(target.backend):\n" + "\n".join(bad)
