"""The autotuner: a candidate giving wrong numbers is rejected even when it is the fastest; the
tuned config reaches ssmc.compile; an interrupted run resumes."""
import io
import json

import pytest

import ssmc
from families import mamba1
from ssmc.backends import reference
from ssmc.plan import make_plan
from ssmc.runtime import tuning_db
from ssmc.runtime.tune import tune, write_report

FAMILY = mamba1(channels=4, state=2, name="TuneMe")
# Injected timings (ms): the wrong candidate would win if numerics were not checked first.
TIMES = {"slow": 2.0, "wrong": 0.5, "fast": 1.0, "broken": 0.1}


class InjectedBackend:
    """The reference kernel behind four candidates: one returns numbers 0.1% off, one does not
    build, two are right."""

    def __init__(self, interrupt_at=None):
        self.built = []
        self.interrupt_at = interrupt_at

    def supports(self, plan):
        return None

    def default_config(self, plan):
        return {"variant": "slow"}

    def candidates(self, plan):
        # Candidates may repeat keys the target also sets (the CPU backend lists llvm_target).
        return [{"variant": v, "llvm_target": "llvm -mcpu=native"}
                for v in ("slow", "wrong", "fast", "broken")]

    def build(self, plan, config, cache):
        variant = config["variant"]
        if variant == self.interrupt_at:
            raise KeyboardInterrupt
        self.built.append(variant)
        if variant == "broken":
            raise RuntimeError("register allocation failed")
        kernel = reference.build(plan, {})
        if variant != "wrong":
            return kernel

        def wrong(problem):
            y, final = kernel(problem)
            return y * 1.001, final
        return wrong

    def timer(self, fn):
        fn()
        return TIMES[self.built[-1]]


def _tune(backend, root, **options):
    stream = io.StringIO()
    result = tune(FAMILY, target="cpu", shape={"b": 2, "l": 100}, backend=backend, root=root,
                  timer=backend.timer, stream=stream, **options)
    return result, stream.getvalue()


def test_wrong_candidate_is_rejected_and_never_picked(tmp_path, monkeypatch):
    backend = InjectedBackend()
    result, progress = _tune(backend, tmp_path)
    assert result.best["variant"] == "fast"
    assert result.best_ms == TIMES["fast"]
    status = {r.config["variant"]: r for r in result.results}
    assert status["wrong"].status == "wrong" and "relative error" in status["wrong"].detail
    assert status["wrong"].ms is None, "a wrong candidate must not even be timed"
    assert status["broken"].status == "error" and "register allocation" in status["broken"].detail
    assert status["slow"].status == status["fast"].status == "ok"
    assert "4/4 done, 2 failed, best 1.000 ms" in progress

    entries = json.loads((tmp_path / "tuning.json").read_text())["entries"]
    (key, entry), = entries.items()
    assert key.endswith("b2_l128") and tuning_db.cpu_name() in key
    assert entry["best"]["variant"] == "fast" and len(entry["candidates"]) == 4

    # ssmc.compile asks the database (at the default shape: the closest bucket answers).
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    plan = make_plan(FAMILY)
    assert tuning_db.lookup_for_plan(plan, "cpu")["variant"] == "fast"
    assert tuning_db.lookup_for_plan(make_plan(mamba1(channels=4, state=4)), "cpu") is None
    assert tuning_db.lookup_for_plan(plan, "cuda") is None
    monkeypatch.setattr("ssmc.api.backend_module", lambda target: backend)
    assert ssmc.compile(FAMILY, target="cpu").config["variant"] == "fast"


class CheckingBackend(InjectedBackend):
    """Also lists a candidate its own check_config refuses (as the Triton scan refuses a split
    that does not divide the state)."""

    def candidates(self, plan):
        return super().candidates(plan) + [{"variant": "fast", "split": 3}]

    def check_config(self, plan, config):
        return "split 3 does not divide the state size 2" if config.get("split") == 3 else None


def test_a_candidate_the_backend_refuses_is_reported_not_built(tmp_path):
    backend = CheckingBackend()
    result, _ = _tune(backend, tmp_path)
    refused, = [r for r in result.results if r.config.get("split") == 3]
    assert refused.status == "error" and "config refused" in refused.detail
    assert "does not divide" in refused.detail and refused.ms is None
    assert backend.built.count("fast") == 1, "the refused candidate was built"
    assert result.best == {"variant": "fast", "llvm_target": "llvm -mcpu=native"}


def test_interrupted_tuning_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _tune(InjectedBackend(interrupt_at="fast"), tmp_path)
    entry = next(iter(tuning_db.TuningDB(tmp_path).entries().values()))
    assert sorted(json.loads(k)["variant"] for k in entry["candidates"]) == ["slow", "wrong"]
    assert entry["best"]["variant"] == "slow"

    resumed = InjectedBackend()
    result, progress = _tune(resumed, tmp_path)
    assert resumed.built == ["fast", "broken"], "recorded candidates were measured again"
    assert result.best["variant"] == "fast"
    assert [r.status for r in result.results] == ["cached", "wrong", "ok", "error"]

    again = InjectedBackend()
    _tune(again, tmp_path, retune=True)
    assert again.built == ["slow", "wrong", "fast", "broken"]


def test_lookup_never_raises_and_ignores_other_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    plan = make_plan(FAMILY)
    assert tuning_db.lookup_for_plan(plan, "cpu") is None            # no database
    (tmp_path / "tuning.json").write_text("{garbage")
    assert tuning_db.lookup_for_plan(plan, "cpu") is None
    _tune(InjectedBackend(), tmp_path)
    assert tuning_db.lookup_for_plan(plan, "cpu")["variant"] == "fast"
    newer = dict(tuning_db.release_versions(), triton="99.0")
    monkeypatch.setattr(tuning_db, "release_versions", lambda: newer)
    tuning_db._load_cached.cache_clear()
    assert tuning_db.lookup_for_plan(plan, "cpu") is None


def test_buckets_are_powers_of_two():
    assert tuning_db.bucket({"b": 3, "l": 3000}) == "b4_l4096"
    assert tuning_db.bucket({"l": 4096, "b": 4}) == "b4_l4096"
    assert tuning_db.bucket({"b": 1}) == "b1"


def test_report_and_cli(tmp_path, monkeypatch, capsys):
    result, _ = _tune(InjectedBackend(), tmp_path)
    written = write_report(result, tmp_path / "report.png", stream=io.StringIO())
    assert written.exists() and written.stat().st_size > 0
    if written.suffix == ".csv":
        rows = written.read_text().splitlines()
        assert rows[0] == "config,status,ms,detail" and len(rows) == 5
        assert any("wrong" in r for r in rows[1:])

    spec = tmp_path / "tiny.ssm"
    spec.write_text("""
ssm Tiny {
  dims       heads = 2, head_dim = 2, state = 2, groups = 1
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  discretize exp_euler
  compute    chunked(4)
}
""")
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    from ssmc.cli import main
    assert main(["tune", str(spec), "--target", "reference", "--shapes", "b=1,l=8", "-q",
                 "--report", str(tmp_path / "cli.png")]) == 0
    out = capsys.readouterr().out
    assert "Tiny [chunked] reference" in out and "best" in out and "b1_l8" in out
    assert list((tmp_path).glob("cli.*"))
