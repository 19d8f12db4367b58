"""Compile generated Triton kernels for sm_90 without a GPU (Triton's own compiler and ptxas):
``python tests/compile_sm90.py MODULE.py KERNEL_SUFFIX 'JSON constexprs'...`` compiles the
module's @jit kernel whose name ends with KERNEL_SUFFIX once per constexpr set, pointers as
fp32, other parameters as i32, and prints ``ok`` per set. Run by the tests in a subprocess with
TRITON_INTERPRET=0 (under the interpreter @jit kernels cannot be compiled)."""
import importlib.util
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def main(path, suffix, *constexpr_sets):
    spec = importlib.util.spec_from_file_location("ssmc_compile_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = next(v for n, v in vars(module).items()
                  if n.endswith(suffix) and isinstance(v, triton.runtime.jit.JITFunction))
    for text in constexpr_sets:
        values = json.loads(text)
        names = kernel.arg_names
        signature = {p: ("constexpr" if p in values else "*fp32" if p.endswith("_ptr") else "i32")
                     for p in names}
        constexprs = {(names.index(p),): v for p, v in values.items()}
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32))
        print("ok", text, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
