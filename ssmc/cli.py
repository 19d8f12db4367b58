"""The `ssmc` command: check, show, compile (and, from the runtime: tune, cache).

Errors from the spec or the target print as ``file:line:col: error: ...`` with no traceback and
exit 1; ``SSMC_DEBUG=1`` prints every stage (IR, discretization, plan, source) while compiling
and keeps tracebacks.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from . import debug as debug_stages
from .debug import format_ir
from .errors import SSMCError
from .ir import Algorithm, SpecFile


# --------------------------------------------------------------------------------------------
# Subcommands

def _load(path: str) -> SpecFile:
    from .api import parse
    return parse(Path(path))


def cmd_check(args) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = _load(path)
        except SSMCError as e:
            print(e.render(), file=sys.stderr)
            failed += 1
            continue
        names = [f"ssm {f.name}" for f in spec.families] + [f"model {m.name}" for m in spec.models]
        print(f"{path}: ok ({', '.join(names) or 'empty'})")
    return 1 if failed else 0


def _selected_families(spec: SpecFile, names: Optional[List[str]]):
    if not names:
        return list(spec.families)
    return [spec.family(n) for n in names]


def cmd_show(args) -> int:
    if args.what == "memory":
        from ssmc.runtime import memory
        return memory.main(args)
    spec = _load(args.spec)
    if args.what == "ir":
        for fam in _selected_families(spec, args.family):
            print(f"ssm {fam.name}  ({fam.loc})\n  " + format_ir(fam, 1))
        if not args.family:
            for model in spec.models:
                print(f"model {model.name}  ({model.loc})\n  " + format_ir(model, 1))
                kinds = [type(b).__name__ for b in model.blocks()]
                print(f"  unrolled: {len(kinds)} blocks")
        return 0
    if args.what == "discretization":
        from .discretize import describe
        for fam in _selected_families(spec, args.family):
            print(describe(fam))
        return 0
    if args.what in ("plan", "source"):
        from .api import backend_module, parse_target, resolve_config
        from .plan import make_plan
        target = parse_target(args.target)
        for fam in _selected_families(spec, args.family):
            plan = make_plan(fam, Algorithm(args.algorithm) if args.algorithm else None)
            config = resolve_config(plan, target)
            if args.what == "plan":
                print(f"plan {fam.name}: algorithm={plan.algorithm.value} chunk={plan.chunk_size} "
                      f"target={target.name} config={json.dumps(config, sort_keys=True)}")
                print(f"  abar = {plan.disc.abar}\n  bbar = {plan.disc.bbar}\n"
                      f"  bbar_prev = {plan.disc.bbar_prev}")
            else:
                print(backend_module(target).lower(plan, config))
        return 0
    raise AssertionError(args.what)


def _versions() -> dict:
    """Tool versions for the manifest, read from package metadata: importing tvm or triton just
    to ask costs seconds, and a C or reference compile needs neither."""
    from importlib import metadata
    out = {"ssmc": __version__, "python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("tvm", "apache-tvm"),
                       ("sympy", "sympy"), ("lark", "lark"), ("numpy", "numpy")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # an optional tool missing is recorded, not fatal
            out[name] = None
    return out


def _sizes(items) -> dict:
    """``--size channels=1536,state=16`` (repeatable) as {name: int}."""
    from .errors import SSMCError
    out = {}
    for item in items or ():
        for part in filter(None, item.split(",")):
            name, _, value = part.partition("=")
            if not value.strip().isdigit():
                raise SSMCError(f"--size {part!r}: expected NAME=N, e.g. --size channels=1536")
            out[name.strip()] = int(value)
    return out


def cmd_compile(args) -> int:
    import hashlib
    from .api import artifact_cache, backend_module, parse_target, resolve_config
    from .plan import ir_hash, make_plan

    spec = _load(args.spec)
    if args.target is None:
        print("no --target given: compiling for reference, the float64 oracle (--target cpu, "
              "cuda or c for fast kernels)", file=sys.stderr)
    target = parse_target(args.target or "reference")
    backend = backend_module(target)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    user_config = json.loads(args.config) if args.config else None
    algorithms = [Algorithm(a) for a in args.algorithm] if args.algorithm else [None]
    if args.step:
        algorithms.append(Algorithm.STEP)
    manifest = {
        "spec": str(args.spec),
        "spec_sha256": hashlib.sha256(spec.text.encode()).hexdigest(),
        "spec_text": spec.text,
        "target": target.name,
        "versions": _versions(),
        "kernels": [],
    }
    sizes = _sizes(args.size)
    for fam in _selected_families(spec, args.family):
        if sizes:
            from . import signature   # imports torch: only when sizes are given
            fam = signature.resized(fam, **{k: v for k, v in sizes.items()
                                            if k in fam.dims.open or getattr(fam.dims, k, 1)})
        for algorithm in algorithms:
            plan = make_plan(fam, algorithm)
            config = resolve_config(plan, target, user_config)
            if args.debug:
                debug_stages.print_stages(plan, target.name, config, backend.lower(plan, config))
            kernel_dir = out_dir / fam.name / plan.algorithm.value
            kernel_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            files = backend.write_artifact(plan, config, kernel_dir, artifact_cache())
            seconds = time.perf_counter() - start
            rel = sorted(str(Path(f).resolve().relative_to(out_dir.resolve())) for f in files)
            manifest["kernels"].append({
                "family": fam.name, "algorithm": plan.algorithm.value,
                "chunk_size": plan.chunk_size, "ir_hash": ir_hash(plan), "config": config,
                "files": rel, "compile_seconds": round(seconds, 4),
                "sha256": {r: hashlib.sha256((out_dir / r).read_bytes()).hexdigest() for r in rel},
            })
            print(f"compiled {fam.name} [{plan.algorithm.value}] for {target.name} in "
                  f"{seconds * 1000:.0f} ms -> {kernel_dir}")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out_dir / 'manifest.json'}")
    return 0


# --------------------------------------------------------------------------------------------
# Argument parsing

TARGET_HELP = ("reference (float64 oracle), cuda or cuda:sm_XX (Triton), cpu (TVM, llvm "
               "-mcpu=native) or any 'llvm ...' target string, c (portable C99), aarch64, riscv64 "
               "(cross-compiled C)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmc",
        description="ssmc: compile State Space Model specs into Triton, TVM and C kernels.",
        epilog="Run `ssmc COMMAND --help` for each command. SSMC_DEBUG=1 prints every stage "
               "(IR, discretization, plan, source) while compiling, and shows tracebacks.")
    p.add_argument("--version", action="version", version=f"ssmc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("check", help="parse and check spec files",
                       description="Parse and check spec files; print each error with its "
                                   "file:line:col. Exit status 1 if any spec has an error.")
    c.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (.ssm)")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("show", help="print the IR, discretization, plan, generated source or memory",
                       description="Print what the compiler sees: the checked IR, the derived "
                                   "discretization (sympy, and as printed per backend), the kernel "
                                   "plan, the generated source, or a hybrid model's state memory.")
    s.add_argument("what", choices=["ir", "discretization", "plan", "source", "memory"])
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--family", action="append", help="only this family (repeatable)")
    s.add_argument("--target", default="reference", help=f"for plan/source: {TARGET_HELP}")
    s.add_argument("--algorithm", choices=[a.value for a in Algorithm],
                   help="for plan/source: override the spec's compute algorithm")
    s.add_argument("--context", default="1k,32k,1M",
                   help="for memory: comma-separated context lengths (k/M suffixes)")
    s.add_argument("--model", help="for memory: the model name when the file has several")
    s.add_argument("--plot", help="for memory: also write a PNG plot to this path")
    s.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"],
                   help="for memory: the KV cache dtype (SSM states are fp32)")
    s.set_defaults(func=cmd_show)

    k = sub.add_parser("compile", help="compile a spec's families for a target",
                       description="Compile each family of SPEC (or those named with --family) "
                                   "for TARGET and write readable generated code, the built "
                                   "artifacts and manifest.json to DIR.")
    k.add_argument("spec", metavar="SPEC")
    k.add_argument("--target", "-t", default=None,
                   help=f"{TARGET_HELP}. Default: reference (the float64 oracle as numpy source: "
                        "correct, slow; name a target for fast kernels)")
    k.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    k.add_argument("--family", action="append", help="only this family (repeatable)")
    k.add_argument("--algorithm", action="append", choices=[a.value for a in Algorithm],
                   help="compile this algorithm instead of the spec's (repeatable)")
    k.add_argument("--step", action="store_true", help="also compile the decode step")
    k.add_argument("--config", help="backend config overrides as JSON, e.g. '{\"num_warps\": 4}'")
    k.add_argument("--size", action="append", metavar="NAME=N[,NAME=N]",
                   help="compile for these sizes instead of the spec's dims (needed for a size "
                        "the spec leaves open, e.g. --size channels=1536); repeatable")
    k.set_defaults(func=cmd_compile)

    try:
        from ssmc.runtime import cli as runtime_cli
    except ImportError:
        runtime_cli = None
    if runtime_cli is not None:
        runtime_cli.add_commands(sub)
    return p


def error_text(e: BaseException) -> str:
    """What a user sees instead of a traceback: the ssmc message, or a line for anything else."""
    if isinstance(e, SSMCError):
        return e.render()
    if isinstance(e, (KeyError, ValueError, OSError)):
        return f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}"
    return (f"error: internal error: {type(e).__name__}: {e}\n  this is a bug in ssmc; run again "
            f"with {debug_stages.ENV}=1 for the traceback and report it")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SSMC_DEBUG is read here, once; the commands get it as args.debug.
    args.debug = debug_stages.enabled()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- no traceback reaches a user without SSMC_DEBUG
        if args.debug:
            raise
        print(error_text(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
