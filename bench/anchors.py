"""The GPU anchors (mamba_ssm, fla), loaded on a machine without network .

Benchmark-only: ssmc never needs them. Each ``*_anchor()`` returns ``(callable, None)`` or
``(None, reason)`` so a benchmark prints why a column is empty instead of failing.

Where they come from (prepared on the development machine, git-ignored, sent with ``carry``):
  .whl/mamba_ssm-2.3.2.post1-py3-none-any.whl   pure-Python build (MAMBA_SKIP_CUDA_BUILD=TRUE)
  .whl/fla_core-0.6.0-py3-none-any.whl          pure Python (needs einops, on the GPU image)
  .anchors/selective_scan/                      the sdist's csrc/selective_scan, JIT-built here
The wheels are installed by the device command line (pip --target, PYTHONPATH); mamba_ssm's
``__init__`` imports ``selective_scan_cuda``, so a module of that name is put in sys.modules first:
the JIT-built extension when the CUDA selective scan is wanted, else an empty placeholder (its
Triton SSD and state update need no compiled code).
"""
from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCAN_SRC = ROOT / ".anchors" / "selective_scan"

_state = {"selective_scan_cuda": None, "reason": None}

# The backward kernels take long to build (160 instantiations per dtype); the fwd+bwd rows need
# one: bf16 inputs, real A, variable B and C, softplus, z, seqlen a multiple of 2048 (mamba_ssm's
# own choice for seqlen > 1024: 128 threads x 16 items). The other dtypes link to a stub that
# raises, and so does bf16 off that configuration.
_BWD_STUB = r"""
#include <cstdint>  // selective_scan.h uses uint64_t without including it
#include "selective_scan_bwd_kernel.cuh"
#include <c10/util/Exception.h>

#define SSMC_NOT_BUILT(input_t, weight_t) \
  template <> void selective_scan_bwd_cuda<input_t, weight_t>(SSMParamsBwd &, cudaStream_t) { \
    TORCH_CHECK(false, "ssmc bench: this backward of selective_scan_cuda is not built"); }
SSMC_NOT_BUILT(float, float)
SSMC_NOT_BUILT(float, c10::complex<float>)
SSMC_NOT_BUILT(c10::Half, float)
SSMC_NOT_BUILT(c10::Half, c10::complex<float>)
SSMC_NOT_BUILT(c10::BFloat16, c10::complex<float>)

template <> void selective_scan_bwd_cuda<c10::BFloat16, float>(SSMParamsBwd &params,
                                                               cudaStream_t stream) {
  TORCH_CHECK(params.seqlen % 2048 == 0 && params.is_variable_B && params.is_variable_C &&
              params.delta_softplus && params.z_ptr != nullptr,
              "ssmc bench: only the bf16 backward with seqlen % 2048 == 0, variable B/C, "
              "softplus and z is built");
  using Ktraits = Selective_Scan_bwd_kernel_traits<128, 16, true, true, true, true, true,
                                                   c10::BFloat16, float>;
  constexpr int kSmemSize = Ktraits::kSmemSize + MAX_DSTATE * sizeof(typename Ktraits::scan_t)
                            + (128 + 4 * MAX_DSTATE) * sizeof(typename Ktraits::weight_t);
  auto kernel = &selective_scan_bwd_kernel<Ktraits>;
  if (kSmemSize >= 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kSmemSize));
  }
  dim3 grid(params.batch, params.dim);
  kernel<<<grid, 128, kSmemSize, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""


def build_selective_scan(build_dir: str = "/tmp/ssmc_anchor_build", jobs: int = 16):
    """JIT-build mamba_ssm's CUDA selective scan for sm_90 (forward; backward for bf16 at the
    fwd+bwd rows' configuration, see _BWD_STUB); module or None."""
    if _state["selective_scan_cuda"] is not None:
        return _state["selective_scan_cuda"]
    if not SCAN_SRC.is_dir():
        _state["reason"] = f"{SCAN_SRC} missing (bring the sdist's csrc/selective_scan with carry)"
        return None
    try:
        from torch.utils.cpp_extension import load
        os.makedirs(build_dir, exist_ok=True)
        stub = Path(build_dir) / "selective_scan_bwd_stub.cu"
        stub.write_text(_BWD_STUB)
        os.environ.setdefault("MAX_JOBS", str(jobs))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources = [SCAN_SRC / "selective_scan.cpp"] + sorted(SCAN_SRC.glob("selective_scan_fwd_*.cu"))
        t0 = time.time()
        mod = load(
            name="selective_scan_cuda",
            sources=[str(s) for s in sources] + [str(stub)],
            extra_include_paths=[str(SCAN_SRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
                               "--expt-extended-lambda", "-lineinfo",
                               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                               "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                               "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                               "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                               "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                               "-gencode", "arch=compute_90,code=sm_90"],
            build_directory=build_dir, verbose=False)
        print(f"[anchors] built selective_scan_cuda in {time.time() - t0:.0f} s", flush=True)
        _state["selective_scan_cuda"] = mod
        sys.modules["selective_scan_cuda"] = mod
        return mod
    except Exception as e:  # noqa: BLE001 - any build failure becomes the reason in the table
        _state["reason"] = f"JIT build of selective_scan_cuda failed: {type(e).__name__}: {str(e)[-300:]}"
        return None


def _import_mamba(cuda_scan: bool):
    if "mamba_ssm" not in sys.modules:
        if cuda_scan:
            build_selective_scan()
        if "selective_scan_cuda" not in sys.modules:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    import mamba_ssm  # noqa: F401
    return mamba_ssm


def mamba_ssd_anchor():
    """mamba_ssm's ``mamba_chunk_scan_combined`` (Triton)."""
    try:
        _import_mamba(cuda_scan=False)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined, None
    except Exception as e:  # noqa: BLE001
        return None, f"mamba_ssm not importable: {type(e).__name__}: {e}"


def mamba_state_update_anchor():
    """mamba_ssm's ``selective_state_update`` (Triton)."""
    try:
        _import_mamba(cuda_scan=False)
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        return selective_state_update, None
    except Exception as e:  # noqa: BLE001
        return None, f"mamba_ssm not importable: {type(e).__name__}: {e}"


def mamba_selective_scan_anchor():
    """mamba_ssm's ``selective_scan_fn`` (CUDA, JIT-built here; about two minutes once)."""
    try:
        if "mamba_ssm" in sys.modules and _state["selective_scan_cuda"] is None:
            mod = build_selective_scan()
            if mod is None:
                return None, _state["reason"]
            # mamba_ssm bound the placeholder at import time: point it at the real module.
            import mamba_ssm.ops.selective_scan_interface as ssi
            ssi.selective_scan_cuda = mod
        _import_mamba(cuda_scan=True)
        if _state["selective_scan_cuda"] is None:
            return None, _state["reason"] or "selective_scan_cuda not built"
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn, None
    except Exception as e:  # noqa: BLE001
        return None, f"mamba_ssm selective scan unavailable: {type(e).__name__}: {e}"


def fla_simple_gla_anchor():
    """fla's ``chunk_simple_gla`` (Triton): SSD without D/z as gated linear attention.

    Mapping: q = C, k = B (expanded to heads), v = Delta * x, g = Delta * A (log decay), scale 1.
    """
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla, None
    except Exception as e:  # noqa: BLE001
        return None, f"fla not importable: {type(e).__name__}: {e}"
