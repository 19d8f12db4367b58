"""Run one generated kernel a few times so Nsight Compute can profile it (H100).

    ncu --kernel-name regex:ssmc_scan --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        --section Occupancy --section MemoryWorkloadAnalysis \\
        python3 bench/ncu_target.py scan 8 2048 '{}'

Arguments: kind (scan | ssd), batch, seqlen, a JSON config for the generator. The first launch
compiles; the following ones are the ones to profile (hence --launch-skip).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import build as _build  # noqa: E402
from ssmc.backends import triton as _tb  # noqa: E402


def main(argv):
    kind, batch, seqlen = argv[0], int(argv[1]), int(argv[2])
    config = json.loads(argv[3]) if len(argv) > 3 else {}
    from ssmc.backends import triton as tb
    from ssmc.ir import Algorithm
    from ssmc.plan import make_plan
    if kind == "scan":
        import gpu_scan
        fam, problem = gpu_scan.scan_problem(batch, seqlen)
        kernel = _build(tb, make_plan(fam, Algorithm.SCAN), config)
    elif kind == "ssd":
        import gpu
        from ssmc.backends.triton import chunked
        from ssmc.signature import bind, example_inputs
        heads = int(argv[4]) if len(argv) > 4 else 80
        fam = gpu.mamba2_family(heads)
        kw = example_inputs(fam, batch=batch, seqlen=seqlen, dtype="bfloat16", device="cuda")
        problem = bind(fam, fam.convention, (), kw)
        kernel = _build(_tb, make_plan(fam), config)
    else:
        raise SystemExit(f"unknown kind {kind!r}: scan or ssd")
    for _ in range(4):
        kernel(problem)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
