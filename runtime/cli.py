"""The runtime's subcommands of ``ssmc``: ``tune`` and ``cache {ls,clear}``.

``ssmc/cli.py`` calls ``add_commands(subparsers)``; each handler returns an exit status.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Dict

from ssmc.errors import SSMCError

_SHAPE_HELP = ("a shape to tune for, as NAME=SIZE pairs: b (batch) and l (sequence length), "
               "k/M suffixes allowed, e.g. b=4,l=4096 or b=1,l=16k; repeat for several shapes "
               "(default b=4,l=4096; the decode step uses only b, default b=64)")


def parse_shape(text: str) -> Dict[str, int]:
    from .memory import parse_contexts
    shape = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([bl])\s*=\s*([0-9.]+[kKmM]?)\s*", part)
        if not match:
            raise SSMCError(f"bad shape {text!r}: expected NAME=SIZE pairs with NAME b or l, "
                            "e.g. b=4,l=4096")
        shape[match.group(1)] = parse_contexts(match.group(2))[0]
    return shape


def cmd_tune(args) -> int:
    from ssmc.api import parse
    from .tune import tune, write_report
    spec = parse(Path(args.spec))
    families = [spec.family(n) for n in args.family] if args.family else list(spec.families)
    if not families:
        raise SSMCError(f"{args.spec} defines no SSM family to tune")
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else [None]
    status = 0
    for fam in families:
        for shape in shapes:
            result = tune(fam, target=args.target, shape=shape, algorithm=args.algorithm,
                          dtype=args.dtype, retune=args.retune, progress=not args.quiet)
            if result.best is None:
                print(f"{fam.name} {result.algorithm} on {result.device}: no candidate passed the "
                      "oracle check", file=sys.stderr)
                status = 1
            else:
                print(f"{fam.name} [{result.algorithm}] {result.target} on {result.device} "
                      f"{result.key.rsplit(' | ', 1)[-1]}: best {result.best_ms:.4f} ms with "
                      f"{json.dumps(result.best, sort_keys=True)} "
                      f"({len(result.failures)} rejected of {len(result.results)})")
            for failed in result.failures:
                print(f"  rejected {json.dumps(failed.config, sort_keys=True)}: {failed.status}: "
                      f"{failed.detail}", file=sys.stderr)
            if args.report:
                path = Path(args.report)
                if len(families) * len(shapes) > 1:
                    bucket = result.key.rsplit(" | ", 1)[-1]
                    path = path.with_name(f"{path.stem}-{fam.name}-{bucket}{path.suffix}")
                print(f"wrote {write_report(result, path)}")
    return status


# What every `cache ls` row names; each backend records them in the entry's description.
_LS_COLUMNS = ("family", "algorithm", "target")


def cmd_cache(args) -> int:
    from .cache import ArtifactCache
    from .tuning_db import TuningDB
    cache = ArtifactCache(args.dir)
    if args.action == "ls":
        entries = cache.ls()
        total = 0
        rows = [("key", "bytes", "created", "family", "algorithm", "target", "details")]
        for e in entries:
            total += e.bytes
            shown = {k: v for k, v in e.description.items() if k not in _LS_COLUMNS}
            details = " ".join(f"{k}={v}" for k, v in sorted(shown.items())
                               if not isinstance(v, (dict, list)))
            rows.append((e.key[:16], str(e.bytes),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)),
                         *(str(e.description.get(k, "-")) for k in _LS_COLUMNS), details))
        if entries:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            for r in rows:
                print("  ".join(c.rjust(w) if i == 1 else c.ljust(w)
                                for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1])
        tuned = TuningDB(cache.root).entries()
        print(f"{len(entries)} kernel entries, {total} bytes, in {cache.root / 'kernels'}")
        for key, entry in sorted(tuned.items()):
            best = json.dumps(entry.get("best"), sort_keys=True) if entry.get("best") else "none"
            ms = f"{entry['best_ms']:.4f} ms" if entry.get("best_ms") is not None else "-"
            print(f"tuned: {key}: best {best} ({ms}, {len(entry.get('candidates', {}))} candidates)")
        return 0
    removed = cache.clear(tuning=args.all)
    extra = " and the tuning database" if args.all else ""
    print(f"removed {removed} kernel entries{extra} from {cache.root}")
    return 0


def add_commands(subparsers) -> None:
    """Add ``tune`` and ``cache`` to the ``ssmc`` command's subparsers."""
    from ssmc.ir import Algorithm
    t = subparsers.add_parser(
        "tune", help="find the fastest correct config of a family for this machine",
        description="Autotune each family of SPEC (or those named with --family) for TARGET on "
                    "this machine: every candidate config the backend proposes is built, checked "
                    "against the float64 oracle at a small odd shape (wrong or failing "
                    "candidates are reported and never chosen), then timed at each --shapes "
                    "(GPU: triton.testing.do_bench median; CPU: wall-clock median after "
                    "warm-up). Results go to the tuning database in the cache directory "
                    "($SSMC_CACHE_DIR, default ~/.cache/ssmc), keyed by device name, IR hash and "
                    "shape bucket (powers of two); `ssmc compile` and ssmc.compile then use the "
                    "best config. Each result is saved as soon as it is measured: an "
                    "interrupted run resumes where it stopped.",
        epilog="example: ssmc tune examples/mamba2.ssm --target cuda --shapes b=4,l=4096 "
               "--shapes b=1,l=16k --report tune.png")
    t.add_argument("spec", metavar="SPEC", help="spec file (.ssm)")
    t.add_argument("--target", "-t", default="cuda",
                   help="cuda or cuda:sm_XX (Triton), cpu or 'llvm ...' (TVM), c (default cuda)")
    t.add_argument("--shapes", action="append", metavar="b=B,l=L", help=_SHAPE_HELP)
    t.add_argument("--family", action="append", help="only this family (repeatable)")
    t.add_argument("--algorithm", choices=[a.value for a in Algorithm],
                   help="tune this algorithm instead of the spec's compute algorithm")
    t.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="input dtype of the timed calls (default bfloat16 on GPU, float32 on "
                        "CPU); every candidate is also checked at float32")
    t.add_argument("--report", metavar="PNG",
                   help="plot time per candidate to this file (a CSV next to it when matplotlib "
                        "is not installed)")
    t.add_argument("--retune", action="store_true",
                   help="measure every candidate again instead of resuming from stored results")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)

    c = subparsers.add_parser(
        "cache", help="list or clear compiled kernels and tuning results",
        description="Inspect the artifact cache ($SSMC_CACHE_DIR, default ~/.cache/ssmc): one "
                    "directory per compiled kernel, keyed by the IR, target, config and the "
                    "versions of ssmc, triton, tvm and torch, each with a manifest of file "
                    "sizes and sha256 (a damaged entry is rebuilt, never loaded); and the "
                    "tuning database.")
    c.add_argument("--dir", help="the cache directory (default $SSMC_CACHE_DIR or ~/.cache/ssmc)")
    actions = c.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list kernel entries and tuned configs",
                            description="List every cached kernel (key, size, date, what it is) "
                                        "and every tuning-database entry with its best config.")
    ls.set_defaults(func=cmd_cache)
    clear = actions.add_parser("clear", help="remove cached kernels",
                               description="Remove every cached kernel (they are rebuilt on "
                                           "demand). Tuning results are kept unless --all.")
    clear.add_argument("--all", action="store_true", help="also remove the tuning database")
    clear.set_defaults(func=cmd_cache)


__all__ = ["add_commands", "parse_shape", "cmd_tune", "cmd_cache"]
