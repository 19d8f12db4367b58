"""Chunked SSD (Mamba-2) on Triton: the backend interface for CHUNKED plans.

``ssmc.backends.triton`` dispatches CHUNKED plans here. The kernel source is generated from the
plan by ``chunked_source.render`` (its math printed from the plan's discretized Abar, Bbar) and
imported from a real file by ``codegen.load_module`` (``@triton.jit`` reads its source back).

Tunables (``config``): the state kernel's block of head_dim x state and its warps/stages, and the
output kernel's row block (``out_block_m``), column block (``out_block_k``), head_dim block, warps
and stages; heads per output program (``out_heads``: they share the C rows and C B^T tiles),
whether its x/z loads for the epilogue are issued before the column loop (``out_early_xz``),
whether the blocks left of the diagonal use the rank-1 factored decay (``out_factor_decay``),
whether the incoming state's term comes after the column loops (``out_state_last``) and a
register cap for it (``out_maxnreg``, 0: none).
Every candidate computes the same function; only speed differs.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

from ssmc import backends
from ssmc.ir import Algorithm, AStructure, KernelPlan

from . import chunked_backward, chunked_source, codegen
from .chunked_source import heads_per_bc_group

MAX_STATE = 256          # the output kernel keeps a whole row of the state (n) in one tile
CONFIG_KEYS = ("state_block_t", "state_block_p", "state_block_n", "state_warps", "state_stages",
               "out_block_m", "out_block_k", "out_block_p", "out_warps", "out_stages",
               "out_cb", "out_cb_fp32", "out_heads", "out_early_xz", "out_factor_decay",
               "out_state_last", "out_maxnreg",
               "bwd_block_m", "bwd_block_k", "bwd_block_n", "bwd_bc_heads", "bwd_warps",
               "bwd_stages")
MAX_OUT_HEADS = 8        # the output kernel's heads per program are unrolled in the source


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def supports_chunked(plan: KernelPlan) -> Optional[str]:
    """None when this generator can compile ``plan``, else the reason it cannot."""
    fam = plan.family
    if plan.algorithm is not Algorithm.CHUNKED:
        return f"the chunked SSD kernel implements the chunked algorithm, not {plan.algorithm.value}"
    if fam.A.structure is not AStructure.SCALAR:
        return (f"chunked SSD needs A scalar per head; {fam.name} has {fam.A.structure.value} A "
                "(use the scan algorithm)")
    if not plan.chunk_size or plan.chunk_size < 1:
        return "chunked SSD needs a positive chunk size"
    if fam.dims.state > MAX_STATE:
        return f"state size {fam.dims.state} > {MAX_STATE}: a row of the state no longer fits one tile"
    abar = plan.disc.abar
    if abar.is_positive is not True:
        return (f"{fam.method.value} gives Abar = {abar}, which is not positive for every step "
                "(e.g. for large Delta); chunked SSD accumulates log(Abar), so it needs Abar > 0 "
                "(use the scan algorithm, or an exponential method: zoh, exp_euler, trapezoidal)")
    return None


def default_config_chunked(plan: KernelPlan) -> Dict[str, int]:
    """Block sizes from the plan's dims.

    Measured on an H100 for Mamba-2 sizes (p64 n128, chunk 256; bench/NOTES_ssd.md, call 2): the
    state kernel is fastest with 128-row blocks of a 32 x 64 (p x n) state tile, 3 stages; the
    output kernel with 64-row x 32-column blocks over the whole head_dim, 3 stages, C B^T stored
    once per group in fp32. The output kernel adds the incoming state's term after its column
    loop (half the shared memory) and, at those tile sizes, is capped at 128 registers so that
    4 programs fit per SM (call 3: output 0.478 -> 0.453 ms at b4 l4096 h80; better on all three
    standard shapes).
    """
    fam = plan.family
    p, n, q = fam.dims.head_dim, fam.dims.state, plan.chunk_size
    cap_p, cap_n, cap_q = max(16, _pow2(p)), max(16, _pow2(n)), max(16, _pow2(q))
    out_block_m, out_block_p = min(64, cap_q), min(64, cap_p)
    measured_tiles = out_block_m * out_block_p <= 64 * 64 and cap_n <= 128
    return {
        "state_block_t": min(128, cap_q), "state_block_p": min(32, cap_p),
        "state_block_n": min(64, cap_n), "state_warps": 4, "state_stages": 3,
        "out_block_m": out_block_m, "out_block_k": min(32, cap_q), "out_block_p": out_block_p,
        "out_warps": 4, "out_stages": 3, "out_cb": 1, "out_cb_fp32": 1,
        "out_heads": 1, "out_early_xz": 0, "out_factor_decay": 0, "out_state_last": 1,
        "out_maxnreg": 128 if measured_tiles else 0,
        # the backward's dx / dB / dC kernels: row and column blocks of the chunk, state block,
        # heads summed per dB / dC program (a group's heads are split over programs)
        "bwd_block_m": min(64, cap_q), "bwd_block_k": min(64, cap_q), "bwd_block_n": min(128, cap_n),
        "bwd_bc_heads": 16, "bwd_warps": 4, "bwd_stages": 2,
    }


def config_error(plan: KernelPlan, cfg: Dict[str, int]) -> Optional[str]:
    """None when ``cfg`` (complete) is valid for ``plan``, else why not."""
    count = cfg["out_heads"]
    if not 1 <= count <= MAX_OUT_HEADS:
        return f"out_heads={count}: heads per output program must be 1..{MAX_OUT_HEADS}"
    per_group = heads_per_bc_group(plan)
    if count > 1 and plan.family.dims.groups != 1 and per_group % count != 0:
        # The heads of a program share one C row tile and one C B^T tile.
        return (f"out_heads={count} does not divide the {per_group} heads that share B and C "
                f"(heads {plan.family.dims.heads}, groups {plan.family.dims.groups}, B/C "
                f"{plan.family.B.sharing.value}/{plan.family.C.sharing.value}); use a divisor")
    if count > 1 and per_group == 1:
        return f"out_heads={count}: every head has its own B or C, so there is nothing to share"
    if cfg["out_factor_decay"] and cfg["out_block_k"] > cfg["out_block_m"]:
        # The column blocks must tile the row block: left of it the decay factors, on it not.
        return (f"out_factor_decay needs out_block_k <= out_block_m "
                f"(got {cfg['out_block_k']} > {cfg['out_block_m']})")
    if cfg["out_maxnreg"] and not 24 <= cfg["out_maxnreg"] <= 255:
        return f"out_maxnreg={cfg['out_maxnreg']}: a register cap is 24..255 (0: none)"
    for key in ("out_early_xz", "out_factor_decay", "out_state_last", "out_cb", "out_cb_fp32"):
        if cfg[key] not in (0, 1):
            return f"{key}={cfg[key]}: must be 0 or 1"
    return None


# Settings timed on the H100 (bench/gpu.py --sweep), tried first by the autotuner. The output-
# kernel options (bench/NOTES_ssd.md, call 3; ms of the output kernel at b4 l4096 h80, default
# then 0.478): out_heads 2 0.487, with state last and 168 registers 0.491; factored decay 0.47-0.58;
# 8 warps 0.75-0.81. Several heads per program did not pay: the kernel is not limited by
# reloading the shared C rows and C B^T tiles.
MEASURED = [
    {"out_state_last": 0, "out_maxnreg": 0},
    {"out_factor_decay": 1},
    {"out_heads": 2, "out_maxnreg": 168},
    {"out_heads": 2, "out_early_xz": 1, "out_maxnreg": 168},
    {"state_block_t": 128, "state_warps": 8, "state_stages": 2, "state_block_p": 64},
    {"state_block_t": 128, "state_block_n": 128, "state_warps": 8, "state_block_p": 64},
    {"state_block_t": 64, "state_block_p": 64, "state_stages": 2},
    {"out_block_k": 64, "out_stages": 2},
    {"out_cb_fp32": 0},
    {"out_cb": 0, "out_block_k": 64},
]


def candidates_chunked(plan: KernelPlan) -> List[Dict[str, int]]:
    """Configurations for the autotuner: the default, the variants measured on the H100, then a grid of block/warp/stage variations of each kernel
    (the two main kernels tune independently)."""
    fam = plan.family
    p, n, q = fam.dims.head_dim, fam.dims.state, plan.chunk_size
    base = default_config_chunked(plan)
    cap_p, cap_n, cap_q = max(16, _pow2(p)), max(16, _pow2(n)), max(16, _pow2(q))

    def fits(cfg):
        return (cfg["state_block_p"] <= cap_p and cfg["state_block_n"] <= cap_n
                and cfg["state_block_t"] <= cap_q and cfg["out_block_m"] <= cap_q
                and cfg["out_block_k"] <= cfg["out_block_m"] and cfg["out_block_p"] <= cap_p
                and config_error(plan, cfg) is None)

    out = [base]
    variants = list(MEASURED)
    variants += [{"state_block_t": t, "state_block_p": bp, "state_block_n": bn, "state_warps": w,
                  "state_stages": s}
                 for t in (64, 128, 256) for bp in (32, 64) for bn in (32, 64, 128)
                 for w in (4, 8) for s in (2, 3)]
    variants += [{"out_block_m": bm, "out_block_k": bk, "out_block_p": bp, "out_warps": w,
                  "out_stages": s}
                 for bm in (32, 64, 128) for bk in (16, 32, 64) for bp in (32, 64)
                 for w in (4, 8) for s in (2, 3, 4)]
    for v in variants:
        cfg = dict(base, **v)
        if fits(cfg) and cfg not in out:
            out.append(cfg)
    return out


def config_problem(plan: KernelPlan, config: dict) -> Optional[str]:
    """Why the complete ``config`` cannot be used for ``plan`` (an unknown key, a value out of
    range), None when it can."""
    unknown = sorted(k for k in config if k not in CONFIG_KEYS)
    if unknown:
        return (f"unknown chunked SSD config key {unknown[0]!r}; known: {', '.join(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        return f"chunked SSD config lacks {', '.join(missing)} (resolve it first)"
    bad = [k for k, v in config.items() if not isinstance(v, int)]
    if bad:
        return f"chunked SSD config {bad[0]}={config[bad[0]]!r}: must be an int"
    return config_error(plan, config)


def _checked(plan: KernelPlan, config: dict) -> dict:
    reason = config_problem(plan, config)
    if reason is not None:
        raise ValueError(f"chunked SSD config for {plan.family.name}: {reason}")
    return config


def kernel_name(plan: KernelPlan) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in plan.family.name.lower())
    return f"{safe or 'ssd'}_{plan.family.method.value}"


def _header(plan: KernelPlan, config: dict, notes: Sequence[str]) -> str:
    fam = plan.family
    d = plan.disc
    lines = ["Triton chunked SSD forward", *notes, "",
             f"method {fam.method.value}: Abar = {d.abar}, Bbar = {d.bbar}, Bbar_prev = {d.bbar_prev}",
             f"dims: heads {fam.dims.heads}, head_dim {fam.dims.head_dim}, state {fam.dims.state}, "
             f"groups {fam.dims.groups}; chunk {plan.chunk_size}",
             f"delta: selective {fam.delta.selective}, softplus {fam.delta.softplus}, "
             f"bias {fam.delta.bias}, clamp {fam.delta.clamp}; A selective {fam.A.selective}; "
             f"B/C selective {fam.B.selective}/{fam.C.selective}",
             f"D {fam.D.sharing.value if fam.D else None}; gate {fam.gate.kind if fam.gate else None}"]
    return backends.header(plan, config, "cuda", "#", lines)


def lower_chunked(plan: KernelPlan, config: dict, notes: Sequence[str] = ()) -> str:
    """The generated Triton source (two kernels and ``launch``) for ``plan`` and its resolved
    ``config`` (``ssmc.backends.resolve_config``)."""
    cfg = _checked(plan, config)
    source = chunked_source.render(plan, kernel_name(plan), _header(plan, cfg, notes), cfg)
    return source + f"\n\nCONFIG = {json.dumps(cfg, sort_keys=True)}\n"


class ChunkedKernel:
    """``kernel(problem) -> (y, final_states or None)``; ``.source`` is the generated text."""

    def __init__(self, plan: KernelPlan, config: dict, source: str, module):
        self.plan, self.config, self.source, self.module = plan, config, source, module
        # ``backward(problem, dout, dfinal) -> {argument name: gradient}`` where the module has
        # the generated backward, else ``backward_refusal`` says why not
        self.backward_refusal = chunked_backward.supports_backward(plan)
        if self.backward_refusal is None:
            self.backward = lambda problem, dout, dfinal: module.backward(problem, dout, dfinal,
                                                                          self.config)

    def __call__(self, problem, y=None, final_states=None):
        x = problem.x
        if str(x.dtype).replace("torch.", "") not in chunked_source.SUPPORTED_FLOAT_NAMES:
            from ssmc.errors import CallError
            raise CallError(f"x: dtype {x.dtype} is not supported by the chunked SSD kernel "
                            "(float32, float16, bfloat16)")
        return self.module.launch(problem, self.config, y=y, final_states=final_states)


def build_chunked(plan: KernelPlan, config: dict, cache, notes: Sequence[str] = ()) -> ChunkedKernel:
    source = lower_chunked(plan, config, notes)
    module = codegen.load_module(source, cache, stem=f"ssmc_chunked_{kernel_name(plan)}")
    return ChunkedKernel(plan, config, source, module)
