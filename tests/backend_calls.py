"""Calling one backend directly as the API does: the config resolved first (defaults, then the
test's overrides; support checked), and an artifact cache passed in."""
from ssmc import backends
from ssmc.runtime.cache import default_cache


def config(backend, plan, overrides=None) -> dict:
    return backends.resolve_config(backend, plan, overrides)


def lower(backend, plan, overrides=None) -> str:
    return backend.lower(plan, config(backend, plan, overrides))


def build(backend, plan, overrides=None, cache=None):
    return backend.build(plan, config(backend, plan, overrides), cache or default_cache())


def write_artifact(backend, plan, overrides, out_dir, cache=None, **options):
    return backend.write_artifact(plan, config(backend, plan, overrides), out_dir,
                                  cache or default_cache(), **options)
