"""The tree's folders install under the one import name ``ssmc``, and the package list is whole."""
import importlib
import importlib.util
import subprocess
import sys
import tomllib

from conftest import ROOT

MAPPED = {"ssmc": "ssmc", "ssmc.grammar": "grammar", "ssmc.backends": "backends",
          "ssmc.runtime": "runtime", "ssmc.integrations": "integrations"}


def _packages_in_tree():
    found = set()
    for prefix, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix,) + rel))
    return found


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == MAPPED
    missing = _packages_in_tree() - set(config["packages"])
    assert not missing, f"add to [tool.setuptools] packages: {sorted(missing)}"


def test_top_level_folders_are_not_importable_by_their_own_names(tmp_path):
    # In a fresh interpreter outside the source tree: `python -m pytest` puts the tree on sys.path.
    code = ("import importlib.util as u; "
            "print([n for n in ('backends', 'runtime', 'grammar', 'integrations') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"top-level modules installed: {out.stdout}"


def test_grammar_ships_as_package_data():
    from importlib import resources
    text = resources.files("ssmc.grammar").joinpath("ssmc.lark").read_text()
    assert "ssm" in text and len(text) > 500


def test_subpackages_import_under_ssmc():
    for name in ("ssmc.backends.reference", "ssmc.runtime", "ssmc.ir", "ssmc.cli"):
        assert importlib.import_module(name) is not None
