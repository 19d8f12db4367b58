"""ssmc: a compiler for State Space Model kernels.

    import ssmc
    scan = ssmc.compile("examples/mamba1.ssm", target="reference")
    y = scan(**scan.example_inputs(batch=2, seqlen=64))
"""
from .errors import CallError, SpecError, SSMCError, TargetError

__version__ = "0.1.0"


def compile(spec_or_path, target: str = "reference", family=None, **options):  # noqa: A001
    """Compile one SSM family of a spec (text or path) for ``target``; returns a callable."""
    from .api import compile as _compile
    return _compile(spec_or_path, target=target, family=family, **options)


def load(path, family=None, algorithm=None):
    """Load what ``ssmc compile SPEC -o DIR`` wrote (DIR/manifest.json) as a compiled callable."""
    from ssmc.runtime.artifacts import load as _load
    return _load(path, family=family, algorithm=algorithm)


def __getattr__(name):
    # ssmc.nn pulls in torch.nn and the runtime: import it only when used.
    if name == "nn":
        import importlib
        return importlib.import_module("ssmc.nn")
    raise AttributeError(f"module 'ssmc' has no attribute {name!r}")


def parse(spec_or_path):
    """Parse and check a spec (text or path) into an ``ir.SpecFile``."""
    from .api import parse as _parse
    return _parse(spec_or_path)


__all__ = ["compile", "load", "parse", "SSMCError", "SpecError", "CallError", "TargetError", "__version__"]
