"""The README and docs/ name only files that are in the repository."""
import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A file name as the docs write one: a path with a folder, or a bare name with an extension.
FILE = re.compile(r"(?<![\w./~$-])((?:[\w-]+/)*[\w.-]+\.(?:py|md|ssm|lark|toml|c|h|json))(?![\w/])")
# Names that are outputs or examples of what a user writes, not files of the repository.
NOT_IN_REPO = {"bad.ssm", "manifest.json", "kernel.py", "MANIFEST.json", "tuning.json",
               "main.c", "tune.png", "kernel.tir.py", "config.json",  # what ssmc writes
               "_driver.c",                                          # <family>_driver.c
               "math.h", "complex.h"}                                # the C library's headers


def _mentions(path):
    return sorted({m.group(1) for m in FILE.finditer(path.read_text())})


def _exists(name: str) -> bool:
    if (ROOT / name).exists():
        return True
    base = name.rsplit("/", 1)[-1]
    # a bare module name in a table next to its folder (`scan_launcher.py`), or a path relative
    # to the folder a section is about (`triton/scan.py`)
    return any(p.as_posix().endswith(name) for p in ROOT.rglob(base) if ".git" not in p.parts)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_files_in_the_repository(doc):
    missing = [m for m in _mentions(doc) if m.rsplit("/", 1)[-1] not in NOT_IN_REPO
               and not m.startswith(("out/", "DIR/")) and not _exists(m)]
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"
