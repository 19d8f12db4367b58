"""The backends behind one interface: the registry, capabilities as data that agree with what
each backend's supports() says, and callers that reach a backend only through the registry."""
import re

import pytest

import families as F
from ssmc import backends
from ssmc.errors import TargetError
from ssmc.ir import Algorithm, AStructure
from ssmc.plan import make_plan

from conftest import ROOT

INTERFACE = ("CAPABILITIES", "supports", "default_config", "candidates", "lower", "build",
             "write_artifact")

# One family of each structure with each algorithm it can be planned for.
FAMILIES = {
    AStructure.SCALAR: lambda a: F.mamba2(algorithm=a) if a is not Algorithm.CONV
    else F.mamba2(algorithm=a, selective_B=False, selective_C=False, selective_delta=False),
    AStructure.DIAGONAL: lambda a: F.mamba1(algorithm=a) if a is not Algorithm.CONV else F.s4d(),
    AStructure.COMPLEX_DIAGONAL: lambda a: F.s5(algorithm=a) if a is not Algorithm.CONV
    else F.s4d(complex_a=True),
    AStructure.DPLR: lambda a: F.s4_dplr(algorithm=a),
    AStructure.DENSE: lambda a: F.dense(algorithm=a, selective=a is not Algorithm.CONV),
}


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_has_the_interface(name):
    module = backends.get(name)
    for attribute in INTERFACE:
        assert hasattr(module, attribute), f"backend {name} lacks {attribute}"
    assert isinstance(module.CAPABILITIES, backends.Capabilities)


def test_an_unknown_backend_is_a_target_error():
    with pytest.raises(TargetError, match="no backend 'tpu'"):
        backends.get("tpu")


@pytest.mark.parametrize("name", backends.NAMES)
def test_what_the_table_allows_the_backend_generates(name):
    """Every structure x algorithm the table allows lowers to source (the generators have no
    structure limit of their own that the table does not state), and every one it refuses says
    which structure, which algorithm and what the backend has for that structure instead."""
    module = backends.get(name)
    caps = module.CAPABILITIES
    for structure, make in FAMILIES.items():
        for algorithm in Algorithm:
            family = make(algorithm)
            if algorithm is Algorithm.CONV and not family.is_lti:
                continue
            plan = make_plan(family, algorithm)
            if structure in caps.structures(algorithm):
                assert module.supports(plan) is None, (name, structure, algorithm)
                if name != "c":                      # the C target lowers per file
                    assert module.lower(plan, module.default_config(plan)).strip()
            else:
                reason = module.supports(plan)
                assert reason and structure.value in reason and algorithm.value in reason
                others = [a.value for a in Algorithm if structure in caps.structures(a)]
                assert all(a in reason for a in others), reason


CALLERS = ["ssmc/api.py", "ssmc/cli.py", "runtime/tune.py", "runtime/artifacts.py",
           "runtime/tuning_db.py", "runtime/ops.py", "runtime/modules.py", "runtime/models.py",
           "runtime/cli.py"]


@pytest.mark.parametrize("path", CALLERS)
def test_callers_reach_backends_only_through_the_registry(path):
    text = (ROOT / path).read_text()
    named = re.findall(r"ssmc\.backends\.(?:reference|triton|cpu|c)\b|import_module"
                       r"|from ssmc\.backends import (?:reference|triton|cpu|c)\b", text)
    assert not named, f"{path} names a backend module: {named}"
