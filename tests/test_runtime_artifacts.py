"""ssmc.runtime.artifacts.load: the callable of what `ssmc compile -o DIR` wrote."""
import pytest

import ssmc
from conftest import assert_rel_close
from ssmc.cli import main
from ssmc.errors import SSMCError
from ssmc.runtime.artifacts import load

SPEC = """
ssm First {
  dims       channels = 8, state = 4, groups = 1
  A          diagonal = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  D          per channel
  gate       silu(z)
  discretize exp_euler
  compute    scan
}
ssm Second {
  dims       heads = 2, head_dim = 2, state = 4, groups = 1
  A          scalar per head = -exp(A_log)
  delta      selective = softplus(dt + dt_bias)
  B, C       selective per group
  discretize zoh
  compute    chunked(4)
}
"""


@pytest.fixture
def compiled_dir(tmp_path):
    spec = tmp_path / "two.ssm"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--target", "reference", "-o", str(out), "--step"]) == 0
    return spec, out


def test_load_gives_the_compiled_kernel_and_its_step(compiled_dir, seed):
    spec, out = compiled_dir
    kernel = load(out, family="Second")
    direct = ssmc.compile(str(spec), target="reference", family="Second")
    assert kernel.family == direct.family and kernel.plan.algorithm.value == "chunked"
    inputs = direct.example_inputs(batch=2, seqlen=9, seed=seed)
    assert_rel_close("loaded kernel", kernel(**inputs), direct(**inputs), "float32", tol=0)
    step_inputs = direct.step.example_inputs(batch=2, seed=seed)
    expected_state = step_inputs["state"].clone()
    expected = direct.step(**dict(step_inputs, state=expected_state))
    assert kernel.step.plan.algorithm.value == "step"
    assert_rel_close("loaded step", kernel.step(**step_inputs), expected, "float32", tol=0)
    assert load(out, family="First", algorithm="step").convention.value == "state_update"


def test_load_refuses_what_does_not_match(compiled_dir):
    spec, out = compiled_dir
    with pytest.raises(SSMCError, match="2 families"):
        load(out)
    with pytest.raises(SSMCError, match="no family 'Third'"):
        load(out, family="Third")
    # The manifest carries the spec text: a spec edited in the manifest after the compile is refused.
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["spec_text"] = SPEC.replace("state = 4, groups = 1\n  A          scalar",
                                         "state = 8, groups = 1\n  A          scalar")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SSMCError, match="changed since"):
        load(out, family="Second")
    with pytest.raises(SSMCError, match="no manifest.json"):
        load(out / "First")


def test_a_backend_that_opens_its_own_artifacts_is_given_the_directory(compiled_dir, monkeypatch):
    from ssmc.backends import reference
    spec, out = compiled_dir
    seen = []

    def load_artifact(plan, config, kernel_dir, cache):
        seen.append(kernel_dir)
        return reference.build(plan, config)

    monkeypatch.setattr(reference, "load_artifact", load_artifact, raising=False)
    load(out, family="First")
    assert seen[0] == out / "First" / "scan" and seen[0].is_dir()
