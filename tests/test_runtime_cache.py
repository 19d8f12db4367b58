"""The artifact cache: keys, atomic builds, two processes racing, corrupt entries, ls/clear."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ssmc.runtime import cache as cache_mod
from ssmc.runtime.cache import MANIFEST, ArtifactCache


def _write_kernel(text: str, log: Path = None, delay: float = 0.0):
    def build(folder: Path):
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (folder / "kernel.py").write_text(text)
        (folder / "lib").mkdir()
        (folder / "lib" / "kernel.so").write_bytes(text.encode() * 100)
    return build


def test_key_covers_parts_and_tool_versions(tmp_path, monkeypatch):
    c = ArtifactCache(tmp_path)
    k1 = c.key(ir_hash="abc", target="cpu", config={"vec": 8})
    assert k1 == c.key(config={"vec": 8}, target="cpu", ir_hash="abc")     # canonical JSON
    assert k1 != c.key(ir_hash="abc", target="cpu", config={"vec": 16})
    assert k1 != c.key(ir_hash="abd", target="cpu", config={"vec": 8})
    assert len(k1) == 64
    versions = dict(cache_mod.tool_versions(), triton="99.0")
    monkeypatch.setattr(cache_mod, "tool_versions", lambda: versions)
    assert c.key(ir_hash="abc", target="cpu", config={"vec": 8}) != k1


def test_versions_include_the_tools_and_the_generators():
    versions = cache_mod.tool_versions()
    assert {"ssmc", "ssmc_source", "torch", "triton", "apache-tvm"} <= set(versions)
    assert versions["torch"] and versions["ssmc_source"]


def test_get_or_build_builds_once_and_records_a_manifest(tmp_path):
    c = ArtifactCache(tmp_path)
    key = c.key(ir_hash="x", target="cpu")
    log = tmp_path / "builds.log"
    first = c.get_or_build(key, _write_kernel("print(1)", log))
    again = ArtifactCache(tmp_path).get_or_build(key, _write_kernel("print(2)", log))
    assert first == again == c.path(key)
    assert (first / "kernel.py").read_text() == "print(1)"
    assert log.read_text().count("\n") == 1
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["key"] == key
    assert set(manifest["files"]) == {"kernel.py", "lib/kernel.so"}
    assert manifest["files"]["lib/kernel.so"]["bytes"] == 800
    assert manifest["description"] == {"ir_hash": "x", "target": "cpu"}
    assert not list((tmp_path / "tmp").iterdir())


def test_a_failed_build_leaves_nothing(tmp_path):
    c = ArtifactCache(tmp_path)
    key = c.key(ir_hash="fails")

    def build(folder):
        (folder / "half.so").write_bytes(b"\0" * 10)
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        c.get_or_build(key, build)
    assert not c.path(key).exists()
    assert not list((tmp_path / "tmp").iterdir())
    assert c.get(key) is None


def _race(root: str, key: str, log: str, out: str, barrier):
    barrier.wait(60)   # both processes ask at the same moment
    path = ArtifactCache(root).get_or_build(key, _write_kernel("raced", Path(log), delay=0.5))
    Path(out).write_text(str(path))


def test_two_processes_building_one_key_build_it_once(tmp_path):
    key = ArtifactCache(tmp_path).key(ir_hash="race", target="cpu")
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race, args=(str(tmp_path), key, str(log),
                                             str(tmp_path / f"out{i}"), barrier))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().count("\n") == 1, "both processes built the kernel"
    paths = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert paths == {str(ArtifactCache(tmp_path).path(key))}
    assert (Path(paths.pop()) / "kernel.py").read_text() == "raced"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest",
                                    "garble_manifest"])
def test_a_corrupt_entry_is_reported_and_rebuilt_never_loaded(tmp_path, damage):
    c = ArtifactCache(tmp_path)
    key = c.key(ir_hash="corrupt", damage=damage)
    log = tmp_path / "builds.log"
    path = c.get_or_build(key, _write_kernel("good", log))
    lib = path / "lib" / "kernel.so"
    if damage == "truncate":
        lib.write_bytes(lib.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(lib.read_bytes())
        data[5] ^= 0xFF
        lib.write_bytes(bytes(data))
        os.utime(lib, ns=(0, 0))   # same size; a changed mtime is not what catches it
    elif damage == "delete_file":
        lib.unlink()
    elif damage == "delete_manifest":
        (path / MANIFEST).unlink()
    else:
        (path / MANIFEST).write_text("{not json")
    for fresh in (ArtifactCache(tmp_path), c):   # a new process, and the one that built it
        with pytest.warns(RuntimeWarning, match=f"{key}.*corrupt"):
            rebuilt = fresh.get_or_build(key, _write_kernel("good", log))
        assert (rebuilt / "lib" / "kernel.so").read_bytes() == b"good" * 100
        lib = rebuilt / "lib" / "kernel.so"
        lib.write_bytes(b"bad")
    assert log.read_text().count("\n") == 3


def test_bytecode_written_into_an_entry_is_not_corruption(tmp_path):
    c = ArtifactCache(tmp_path)
    key = c.key(ir_hash="pyc")
    path = c.get_or_build(key, _write_kernel("x = 1"))
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "kernel.cpython-311.pyc").write_bytes(b"\0")
    assert ArtifactCache(tmp_path).get(key) == path


def test_ls_and_clear(tmp_path, capsys):
    from ssmc.cli import main
    c = ArtifactCache(tmp_path)
    keys = [c.key(ir_hash=f"k{i}", target="cpu") for i in range(3)]
    for k in keys:
        c.get_or_build(k, _write_kernel(k))
    listed = c.ls()
    assert [e.key for e in listed] == keys
    assert all(e.bytes == len(k) * 101 for e, k in zip(listed, keys))
    assert main(["cache", "--dir", str(tmp_path), "ls"]) == 0
    out = capsys.readouterr().out
    assert "3 kernel entries" in out and "ir_hash=k1" in out
    (tmp_path / "tuning.json").write_text('{"version": 1, "entries": {}}')
    (tmp_path / "triton").mkdir()                 # an older release's module folder
    (tmp_path / "triton" / "ssmc_scan_x.py").write_text("# generated")
    assert main(["cache", "--dir", str(tmp_path), "clear"]) == 0
    assert not (tmp_path / "triton").exists()
    assert "removed 3 kernel entries" in capsys.readouterr().out
    assert c.ls() == [] and (tmp_path / "tuning.json").exists()
    assert main(["cache", "--dir", str(tmp_path), "clear", "--all"]) == 0
    assert not (tmp_path / "tuning.json").exists()


def test_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "here"))
    assert ArtifactCache().root == tmp_path / "here"
    assert cache_mod.default_cache().root == tmp_path / "here"
    monkeypatch.delenv("SSMC_CACHE_DIR")
    assert ArtifactCache().root == Path.home() / ".cache" / "ssmc"


def test_a_backend_artifact_through_the_cache(tmp_path):
    from families import mamba1
    from ssmc.backends import reference
    from ssmc.plan import make_plan
    from ssmc.runtime.cache import artifact_dir
    plan = make_plan(mamba1(channels=4, state=2))
    c = ArtifactCache(tmp_path)
    writes = []

    def write(folder):
        writes.append(folder)
        reference.write_artifact(plan, {}, folder)

    first = artifact_dir(plan, "reference", {}, write, cache=c)
    assert artifact_dir(plan, "reference", {}, write, cache=ArtifactCache(tmp_path)) == first
    assert len(writes) == 1
    (source,) = first.glob("*.py")
    assert source.read_text() == reference.lower(plan, {})
    other = artifact_dir(plan, "reference", {"variant": 2}, write, cache=c)
    assert other != first and len(writes) == 2
    (entry,) = [e for e in c.ls() if e.path == first]
    assert entry.description["family"] == "Mamba1" and entry.description["target"] == "reference"
