"""The printers: every dialect's printed form is run (numpy/torch eval, C compiled with gcc and
called through ctypes, Triton under TRITON_INTERPRET=1, TIR through tvm.compile) and compared
with the float64 ``evaluate`` of the same sympy expressions."""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import families as F
from conftest import assert_rel_close
from ssmc.discretize import derive_elementwise, discretize, evaluate, split_complex
from ssmc.errors import TargetError
from ssmc.ir import Method
from ssmc.printers import DIALECTS, cse_print, print_expr

METHODS = list(Method)
KEYS = ("abar", "bbar", "bbar_prev")


def exprs_of(d):
    return dict(zip(KEYS, (d.abar, d.bbar, d.bbar_prev)))


def split_exprs(method):
    """The complex-a forms as real/imaginary parts in a_re, a_im (for real-only dialects)."""
    out = {}
    for k, e in exprs_of(derive_elementwise(method, complex_a=True)).items():
        out[f"{k}_re"], out[f"{k}_im"] = split_complex(e)
    return out


def inputs(rng, size, complex_a=False, lo=1e-3, hi=3.0):
    """dt and a with |a dt| in [lo, hi] (log-uniform), a with negative real part."""
    a = -np.exp(rng.uniform(np.log(1e-2), np.log(1e2), size))
    dt = np.exp(rng.uniform(np.log(lo), np.log(hi), size)) / np.abs(a)
    if complex_a:
        a = a + 1j * rng.normal(0, 2, size) * np.abs(a)
    return dt, a


def reference(method, dt, a):
    vals = evaluate(derive_elementwise(method, np.iscomplexobj(a)), dt, a)
    ref = dict(zip(KEYS, vals))
    if np.iscomplexobj(a):
        ref = {f"{k}_{p}": getattr(v, "real" if p == "re" else "imag") for k, v in ref.items()
               for p in ("re", "im")}
    return ref


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# numpy and torch: eval

@pytest.mark.parametrize("complex_a", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_numpy_and_torch_print_what_evaluate_computes(method, complex_a, seed):
    rng = np.random.default_rng(seed)
    dt, a = inputs(rng, 64, complex_a, lo=1e-9)
    d = derive_elementwise(method, complex_a)
    ref = dict(zip(KEYS, evaluate(d, dt, a)))
    names = {"dt": "delta", "a": "A"}
    envs = {"numpy": {"np": np, "delta": dt, "A": a},
            "torch": {"torch": torch, "delta": torch.from_numpy(dt), "A": torch.from_numpy(a)}}
    for dialect, env in envs.items():
        for key, expr in exprs_of(d).items():
            got = np.broadcast_to(np.asarray(eval(print_expr(expr, dialect, names), dict(env))), dt.shape)
            assert_rel_close(f"{dialect} {key}", got, ref[key], "float64")
        lines, finals = cse_print(exprs_of(d), dialect, names)
        scope = dict(env)
        exec("\n".join(lines), scope)
        for key, text in finals.items():
            got = np.broadcast_to(np.asarray(eval(text, scope)), dt.shape)
            assert_rel_close(f"{dialect} cse {key}", got, ref[key], "float64")


@pytest.mark.parametrize("method", METHODS)
def test_numpy_and_torch_print_matrix_forms(method, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(0, 0.6, (3, 4, 4)) - 1.5 * np.eye(4)
    dt = rng.uniform(0.05, 1.0, 3)
    d = discretize(F.dense(state=4, method=method))
    ref = dict(zip(KEYS, evaluate(d, dt, A)))
    names = {"dt": "dt[..., None, None]"}
    envs = {"numpy": {"np": np, "scipy": scipy, "dt": dt, "a": A},
            "torch": {"torch": torch, "dt": torch.from_numpy(dt), "a": torch.from_numpy(A)}}
    for dialect, env in envs.items():
        lines, finals = cse_print(exprs_of(d), dialect, names)
        scope = dict(env)
        exec("\n".join(lines), scope)
        for key, text in finals.items():
            got = np.broadcast_to(np.asarray(eval(text, scope)), A.shape)
            assert_rel_close(f"{dialect} {method.value} {key}", got, ref[key], "float64")


# ---------------------------------------------------------------------------------------------
# C: compiled with warnings as errors (no double promotion), called through ctypes

def c_function(name, outputs, args, dtype):
    ctype = "float" if dtype == "float32" else "double"
    names = {a: f"{a}[i]" for a in args}
    lines, finals = cse_print(outputs, "c", names, dtype=dtype)
    params = ", ".join([f"const {ctype} *restrict {a}" for a in args]
                       + [f"{ctype} *restrict {k}" for k in outputs])
    body = "\n".join(f"        {ln}" for ln in lines)
    body += "\n" + "\n".join(f"        {k}[i] = {v};" for k, v in finals.items())
    return f"void {name}(int n, {params}) {{\n    for (int i = 0; i < n; ++i) {{\n{body}\n    }}\n}}\n"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_c_compiles_and_matches(dtype, tmp_path, seed):
    src = ["#include <math.h>\n"]
    for m in METHODS:
        src.append(c_function(f"real_{m.value}", exprs_of(derive_elementwise(m)), ["dt", "a"], dtype))
        src.append(c_function(f"complex_{m.value}", split_exprs(m), ["dt", "a_re", "a_im"], dtype))
    (tmp_path / "disc.c").write_text("\n".join(src))
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wdouble-promotion", "-Wfloat-conversion",
             "-fPIC", "-O2"]
    subprocess.run(["gcc", *flags, "-c", "disc.c", "-o", "disc.o"], cwd=tmp_path, check=True)
    subprocess.run(["gcc", "-shared", "disc.o", "-o", "libdisc.so", "-lm"], cwd=tmp_path, check=True)
    lib = ctypes.CDLL(str(tmp_path / "libdisc.so"))
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "float32" else np.float64
    n = 257
    for m in METHODS:
        for complex_a in (False, True):
            dt, a = inputs(rng, n, complex_a, lo=1e-7)
            # Round the inputs to the kernel's precision so that the reference sees the same ones.
            dt = dt.astype(np_dtype)
            a = a.astype(np.complex64 if complex_a else np.float32) if dtype == "float32" else a
            ref = reference(m, dt, a)
            args = [dt] + ([a.real.copy(), a.imag.copy()] if complex_a else [a.astype(np_dtype)])
            args = [np.ascontiguousarray(x, dtype=np_dtype) for x in args]
            outs = {k: np.full(n, np.nan, dtype=np_dtype) for k in ref}
            fn = getattr(lib, f"{'complex' if complex_a else 'real'}_{m.value}")
            fn(ctypes.c_int(n), *[x.ctypes.data_as(ctypes.c_void_p) for x in args + list(outs.values())])
            for k, got in outs.items():
                # Bilinear's 1/(a dt - 2) and the split complex forms lose a few ulps more.
                tol = 1e-5 if dtype == "float32" else 1e-12
                assert_rel_close(f"C {dtype} {m.value} {k}", got, ref[k], tol=tol)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_zoh_keeps_digits_for_tiny_steps(tmp_path, seed):
    """expm1f keeps fp32 precision where expf(x) - 1 would lose every digit, element by element,
    for real a and for the split complex form."""
    d = derive_elementwise(Method.ZOH)
    split = {k: v for k, v in split_exprs(Method.ZOH).items() if k in ("bbar_re", "bbar_im")}
    src = "#include <math.h>\n" + c_function("zoh", {"bbar": d.bbar}, ["dt", "a"], "float32") \
        + c_function("zoh_c", split, ["dt", "a_re", "a_im"], "float32")
    assert "expm1f(" in src
    (tmp_path / "z.c").write_text(src)
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-fPIC", "-shared", "z.c", "-o", "z.so",
                    "-lm"], cwd=tmp_path, check=True)
    lib = ctypes.CDLL(str(tmp_path / "z.so"))
    rng = np.random.default_rng(seed)
    n = 64
    a = -rng.uniform(0.1, 10, n).astype(np.float32)
    a_im = (rng.normal(0, 3, n) * -a).astype(np.float32)
    dt = (np.logspace(-9, -3, n) / -a).astype(np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    out = np.full(n, np.nan, np.float32)
    lib.zoh(ctypes.c_int(n), ptr(dt), ptr(a), ptr(out))
    ref = evaluate(d, dt, a)[1]
    assert np.max(np.abs(out / ref - 1)) < 1e-6
    re, im = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    lib.zoh_c(ctypes.c_int(n), ptr(dt), ptr(a), ptr(a_im), ptr(re), ptr(im))
    ref = evaluate(derive_elementwise(Method.ZOH, True), dt, a + 1j * a_im.astype(np.float64))[1]
    assert np.max(np.abs((re + 1j * im.astype(np.float64)) / ref - 1)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Triton (interpreted on the CPU) and TIR (tvm.compile for llvm)

def triton_kernel(name, outputs, args):
    lines, finals = cse_print(outputs, "triton", None)
    params = ", ".join([f"{a}_ptr" for a in args] + [f"{k}_ptr" for k in outputs])
    body = [f"    {a} = tl.load({a}_ptr + offs)" for a in args]
    body += [f"    {ln}" for ln in lines]
    body += [f"    tl.store({k}_ptr + offs, {v} + 0.0 * dt)" for k, v in finals.items()]
    return (f"@triton.jit\ndef {name}({params}, BLOCK: tl.constexpr):\n"
            f"    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n" + "\n".join(body) + "\n")


def test_triton_interpreted_matches(tmp_path, monkeypatch, seed):
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    src = ["import triton", "import triton.language as tl", ""]
    for m in METHODS:
        src.append(triton_kernel(f"real_{m.value}", exprs_of(derive_elementwise(m)), ["dt", "a"]))
        src.append(triton_kernel(f"complex_{m.value}", split_exprs(m), ["dt", "a_re", "a_im"]))
    path = tmp_path / f"ssmc_disc_triton_{seed}.py"
    path.write_text("\n".join(src))
    module = load_module(path)
    rng = np.random.default_rng(seed)
    n, block = 256, 64
    for m in METHODS:
        for complex_a in (False, True):
            # No expm1 in Triton: keep |a dt| >= 0.05 where exp(x) - 1 is accurate in fp32.
            dt, a = inputs(rng, n, complex_a, lo=0.05)
            ref = reference(m, dt.astype(np.float32), a.astype(np.complex64 if complex_a else np.float32))
            args = [dt] + ([a.real, a.imag] if complex_a else [a])
            args = [torch.tensor(x, dtype=torch.float32) for x in args]
            outs = {k: torch.full((n,), float("nan")) for k in ref}
            kernel = getattr(module, f"{'complex' if complex_a else 'real'}_{m.value}")
            kernel[(n // block,)](*args, *outs.values(), BLOCK=block)
            for k, got in outs.items():
                assert_rel_close(f"triton {m.value} {k}", got, ref[k], tol=2e-5)
    del triton


def tir_function(name, outputs, args, n):
    names = {a: f"{a}[i]" for a in args}
    lines, finals = cse_print(outputs, "tir", names)
    params = ", ".join(f'{x}: T.Buffer(({n},), "float32")' for x in list(args) + list(outputs))
    body = [f"        {ln}" for ln in lines] + [f"        {k}[i] = {v}" for k, v in finals.items()]
    return (f"@T.prim_func\ndef {name}({params}):\n    for i in range({n}):\n"
            + "\n".join(body) + "\n")


def test_tir_compiles_and_matches(tmp_path, seed):
    tvm = pytest.importorskip("tvm")
    n = 97
    src = ["from tvm.script import tirx as T", ""]
    for m in METHODS:
        src.append(tir_function(f"real_{m.value}", exprs_of(derive_elementwise(m)), ["dt", "a"], n))
        src.append(tir_function(f"complex_{m.value}", split_exprs(m), ["dt", "a_re", "a_im"], n))
    path = tmp_path / f"ssmc_disc_tir_{seed}.py"
    path.write_text("\n".join(src))
    module = load_module(path)
    funcs = {f"{kind}_{m.value}": getattr(module, f"{kind}_{m.value}")
             for m in METHODS for kind in ("real", "complex")}
    lib = tvm.compile(tvm.IRModule(funcs), target="llvm")
    rng = np.random.default_rng(seed)
    for m in METHODS:
        for complex_a in (False, True):
            dt, a = inputs(rng, n, complex_a, lo=0.05)
            dt = dt.astype(np.float32)
            a = a.astype(np.complex64 if complex_a else np.float32)
            ref = reference(m, dt, a)
            args = [dt] + ([a.real.copy(), a.imag.copy()] if complex_a else [a])
            outs = {k: np.full(n, np.nan, np.float32) for k in ref}
            bufs = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in args + list(outs.values())]
            lib[f"{'complex' if complex_a else 'real'}_{m.value}"](*bufs)
            for (k, _), buf in zip(outs.items(), bufs[len(args):]):
                assert_rel_close(f"tir {m.value} {k}", buf.numpy(), ref[k], tol=2e-5)


# ---------------------------------------------------------------------------------------------
# What is printed, and what is refused

def test_names_literals_and_stable_forms():
    d = derive_elementwise(Method.ZOH)
    names = {"dt": "delta", "a": "A_val"}
    assert print_expr(d.bbar, "c", names) == "expm1f(A_val*delta)/A_val"
    assert print_expr(d.bbar, "c", names, dtype="float64") == "expm1(A_val*delta)/A_val"
    assert print_expr(d.bbar, "numpy", names) == "np.expm1(A_val*delta)/A_val"
    assert print_expr(d.bbar, "torch", names) == "torch.expm1(A_val*delta)/A_val"
    assert print_expr(d.bbar, "triton", names) == "(tl.exp(A_val*delta) - 1.0)/A_val"
    assert "T.exp(" in print_expr(d.bbar, "tir", names) and "expm1" not in print_expr(d.bbar, "tir")
    bil = derive_elementwise(Method.BILINEAR)
    assert "2.0f" in print_expr(bil.bbar, "c") and "T.float32(2.0)" in print_expr(bil.bbar, "tir")


def test_cse_computes_the_exponential_once():
    d = derive_elementwise(Method.TRAPEZOIDAL)
    for dialect, fn in (("triton", "tl.exp("), ("c", "expf("), ("tir", "T.exp("), ("numpy", "np.exp(")):
        lines, finals = cse_print(exprs_of(d), dialect)
        text = "\n".join(lines + list(finals.values()))
        assert text.count(fn) == 1, text
    lines, _ = cse_print(exprs_of(d), "c")
    assert all(ln.startswith("const float ") and ln.endswith(";") for ln in lines)
    # The split complex zoh has sin(y/2)**2: printed as a product of one temporary.
    lines, finals = cse_print(split_exprs(Method.ZOH), "c")
    assert "\n".join(lines + list(finals.values())).count("sinf(0.5f*") == 1
    # Without expm1, exp(x) - 1 shares exp(x) with abar.
    lines, finals = cse_print(exprs_of(derive_elementwise(Method.ZOH)), "triton")
    assert "\n".join(lines + list(finals.values())).count("tl.exp(") == 1


def test_refusals_are_clear():
    complex_zoh = derive_elementwise(Method.ZOH, complex_a=True)
    for dialect in ("triton", "c", "tir"):
        with pytest.raises(TargetError, match="complex") as err:
            print_expr(complex_zoh.bbar, dialect)
        assert "split_complex" in str(err.value)
        with pytest.raises(TargetError, match="matrix"):
            print_expr(discretize(F.dense()).abar, dialect)
    with pytest.raises(ValueError, match="dialect"):
        print_expr(complex_zoh.abar, "fortran")
    with pytest.raises(ValueError, match="float32 or float64"):
        print_expr(complex_zoh.abar, "numpy", dtype="fp8")
    assert set(DIALECTS) == {"numpy", "torch", "triton", "c", "tir"}


# ---------------------------------------------------------------------------------------------
# The Δ map (softplus, clamp) in every dialect, run against the math written by hand

def _delta_cases():
    from test_discretize import delta_specs
    return delta_specs()


def _delta_inputs(seed, n=256):
    """raw dt over both sides of softplus's threshold at 20, and a bias; fp32-exact values."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.uniform(-12, 30, n - 6), [-12.0, 0.0, 19.9, 20.0, 20.1, 30.0]])
    bias = rng.uniform(-3, 3, n)
    return raw.astype(np.float32).astype(np.float64), bias.astype(np.float32).astype(np.float64)


def _close(name, got, ref, rtol):
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{name}: NaN/inf"
    err = np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30))
    worst = int(np.argmax(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)))
    assert err <= rtol, (f"{name}: max relative error {err:.2e} > {rtol:.0e} (got {got[worst]!r}, "
                         f"want {ref[worst]!r} at {worst})")


@pytest.mark.parametrize("spec", _delta_cases(), ids=str)
def test_delta_map_numpy_and_torch(spec, seed):
    from test_discretize import delta_by_hand
    from ssmc.discretize import delta_map, without_bias
    raw, bias = _delta_inputs(seed)
    ref = delta_by_hand(spec, raw, bias)
    names = {"dt_raw": "r", "dt_bias": "b"}
    for dialect, mod, wrap, rtol in (("numpy", np, np.asarray, 1e-14),
                                     ("torch", torch, torch.from_numpy, 1e-8)):
        text = print_expr(delta_map(spec), dialect, names, dtype="float64")
        got = eval(text, {{"numpy": "np"}.get(dialect, dialect): mod, "r": wrap(raw), "b": wrap(bias)})
        _close(f"{dialect} {text}", got, ref, rtol)
        plain = print_expr(without_bias(delta_map(spec)), dialect, names, dtype="float64")
        assert "b" not in plain.replace("np.", "").replace("torch.", "").replace("nn.", "")
        got = eval(plain, {{"numpy": "np"}.get(dialect, dialect): mod, "r": wrap(raw)})
        _close(f"{dialect} {plain}", got, delta_by_hand(spec, raw, 0.0), rtol)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_delta_map_c_compiles_and_matches(tmp_path, seed):
    """The printed C Δ (what backends/c's delta_statements emits) compiled warning-free."""
    from test_discretize import delta_by_hand
    from ssmc.backends.c.cexpr import delta_statements
    from ssmc.discretize import delta_map
    from ssmc.plan import make_plan
    specs = _delta_cases()
    src = ["#include <math.h>\n"]
    for i, spec in enumerate(specs):
        for dtype in ("float32", "float64"):
            src.append(c_function(f"delta{i}_{dtype}", {"out": delta_map(spec)},
                                  ["dt_raw", "dt_bias"], dtype))
        plan = make_plan(F.mamba1(softplus=spec.softplus, bias=spec.bias, clamp=spec.clamp))
        line = delta_statements(plan, "r", "b", "")[0]
        assert line == f"float Delta = {print_expr(delta_map(spec), 'c', {'dt_raw': 'r', 'dt_bias': 'b'})};"
    (tmp_path / "delta.c").write_text("\n".join(src))
    # (A map without bias leaves its dt_bias parameter unused.)
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
             "-Wdouble-promotion", "-Wfloat-conversion", "-fPIC", "-O2"]
    subprocess.run(["gcc", *flags, "-c", "delta.c", "-o", "delta.o"], cwd=tmp_path, check=True)
    subprocess.run(["gcc", "-shared", "delta.o", "-o", "libdelta.so", "-lm"], cwd=tmp_path, check=True)
    lib = ctypes.CDLL(str(tmp_path / "libdelta.so"))
    raw, bias = _delta_inputs(seed)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    for i, spec in enumerate(specs):
        ref = delta_by_hand(spec, raw, bias)
        # float64: the threshold form's x for softplus(x > 20) is off by e^-20 / 20 ~ 1e-10.
        for dtype, np_dtype, rtol in (("float32", np.float32, 1e-5), ("float64", np.float64, 2e-10)):
            args = [np.ascontiguousarray(x, dtype=np_dtype) for x in (raw, bias)]
            out = np.full(raw.shape, np.nan, np_dtype)
            getattr(lib, f"delta{i}_{dtype}")(ctypes.c_int(raw.size), *map(ptr, args), ptr(out))
            _close(f"C {dtype} {spec}", out, ref, rtol)


def test_delta_map_triton_interpreted(tmp_path, monkeypatch, seed):
    """The printers' Triton form and the backend's, run with the module helpers every generated
    module has (backends/triton/codegen.HELPERS: softplus is its _softplus)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from test_discretize import delta_by_hand
    from ssmc.backends.triton import codegen
    from ssmc.discretize import delta_map
    from ssmc.plan import make_plan
    specs = _delta_cases()
    src = [codegen.PRELUDE, codegen.HELPERS]
    for i, spec in enumerate(specs):
        plan = make_plan(F.mamba1(softplus=spec.softplus, bias=spec.bias, clamp=spec.clamp))
        forms = {"printer": print_expr(delta_map(spec), "triton", {"dt_raw": "r", "dt_bias": "b"}),
                 "backend": codegen.delta_expr(plan, "r", "b")}
        for kind, text in forms.items():
            src.append(f"@triton.jit\ndef delta{i}_{kind}(r_ptr, b_ptr, out_ptr, BLOCK: tl.constexpr):\n"
                       f"    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
                       f"    r = tl.load(r_ptr + offs)\n    b = tl.load(b_ptr + offs)\n"
                       f"    tl.store(out_ptr + offs, {text} + 0.0 * r)\n")
    path = tmp_path / f"ssmc_delta_triton_{seed}.py"
    path.write_text("\n".join(src))
    module = load_module(path)
    raw, bias = _delta_inputs(seed)
    args = [torch.tensor(x, dtype=torch.float32) for x in (raw, bias)]
    for i, spec in enumerate(specs):
        ref = delta_by_hand(spec, raw, bias)
        for kind in ("printer", "backend"):
            out = torch.full((raw.size,), float("nan"))
            getattr(module, f"delta{i}_{kind}")[(raw.size // 64,)](*args, out, BLOCK=64)
            _close(f"triton {kind} {spec}", out.numpy(), ref, 1e-5)


def test_delta_map_tir_compiles_and_matches(tmp_path, seed):
    """The printers' TIR form and the CPU backend's (fastmath softplus let-lines) compiled."""
    tvm = pytest.importorskip("tvm")
    from test_discretize import delta_by_hand
    from ssmc.backends.cpu.tir import Writer, delta_expr
    from ssmc.discretize import delta_map, discretize
    specs = _delta_cases()
    raw, bias = _delta_inputs(seed)
    n = raw.size
    src = ["from tvm.script import tirx as T", ""]
    params = ", ".join(f'{x}: T.Buffer(({n},), "float32")' for x in ("r", "b", "out"))
    for i, spec in enumerate(specs):
        text = print_expr(delta_map(spec), "tir", {"dt_raw": "r[i]", "dt_bias": "b[i]"})
        src.append(f"@T.prim_func\ndef delta{i}_printer({params}):\n    for i in range({n}):\n"
                   f"        out[i] = {text}\n")
        w = Writer()
        w.depth = 2
        name = delta_expr(w, discretize(F.mamba1(softplus=spec.softplus, bias=spec.bias,
                                                 clamp=spec.clamp)), "r[i]", "b[i]")
        src.append(f"@T.prim_func\ndef delta{i}_backend({params}):\n    for i in range({n}):\n"
                   + "\n".join(w.lines) + f"\n        out[i] = {name}\n")
    path = tmp_path / f"ssmc_delta_tir_{seed}.py"
    path.write_text("\n".join(src))
    module = load_module(path)
    funcs = {f"delta{i}_{k}": getattr(module, f"delta{i}_{k}") for i in range(len(specs))
             for k in ("printer", "backend")}
    lib = tvm.compile(tvm.IRModule(funcs), target="llvm")
    for i, spec in enumerate(specs):
        ref = delta_by_hand(spec, raw, bias)
        for kind in ("printer", "backend"):
            bufs = [tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))
                    for x in (raw, bias, np.full(n, np.nan))]
            lib[f"delta{i}_{kind}"](*bufs)
            _close(f"tir {kind} {spec}", bufs[2].numpy(), ref, 1e-5)


def test_a_clamps_derivative_is_elementwise_in_numpy_and_torch():
    """The Δ map's clamp differentiates to a Piecewise indicator: on arrays and tensors it must
    be an elementwise select (Python's ``a if c else b`` and ``and`` fail on them)."""
    import sympy as sp
    from ssmc.discretize import DT_RAW
    from ssmc.functions import Clamp
    lo, hi = 0.01, 0.5
    slope = sp.diff(Clamp(DT_RAW, lo, hi), DT_RAW)
    values = np.array([-1.0, 0.005, 0.2, 0.49, 0.7])
    want = ((values > lo) & (values < hi)).astype(float)
    for dialect, env, arg in (("numpy", {"np": np}, values),
                              ("torch", {"torch": torch}, torch.from_numpy(values))):
        text = print_expr(slope, dialect, {"dt_raw": "x"})
        got = eval(text, {**env, "x": arg})  # noqa: S307 - our own printer
        np.testing.assert_allclose(np.asarray(got, dtype=float), want, err_msg=text)
