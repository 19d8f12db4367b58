"""The selective scan's backward kernel for complex-diagonal A (y = 2 Re(C h)), appended to the
scan module as ``backward(...)`` like the real one (``scan_backward``: the same two passes,
tiles, checkpoints and launcher; read its docstring first).

Every complex value is a pair of real tiles (``x`` and ``x_i``). The coefficients and their
derivatives are the pass's (re, im) splits (``Discretized.split``, ``Derivatives.split``),
printed from sympy. The walk carries the holomorphic adjoint λ = ∂L/∂h (dL = Re(λ dh)), whose
recurrence is the real one with complex products:

    λ_t = 2 C_t dy_t + Ā_{t+1} λ_{t+1},   λ past the end = conj(the final state's gradient)
    ∂L/∂Δ_t = Re Σ_n (λ_t Ā_t h_{t-1} (∂Ā/∂Δ)/Ā + λ_t B_t x_t ∂B̄/∂Δ
                      [+ λ_t B_{t-1} x_{t-1} ∂B̄₋/∂Δ])
    ∂L/∂x_t = Re Σ_n λ_t B̄_t B_t [+ λ_{t+1} B̄₋_{t+1} B_t] + D dy_t

A complex parameter's gradient is the conjugate of its holomorphic sum (torch's convention for
a real loss, ∂L/∂Re p + i ∂L/∂Im p), written as (re, im) pairs; a real input's is the real
part. The two associative scans compose (Ā, b) pairs with complex products
(``_ssmc_cpair``; complex multiplication commutes, so the reverse scan is the real one's).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ssmc.ir import KernelPlan

from .codegen import Lines, delta_expr, print_one
from .scan_backward import _BackwardGen

Part = Optional[str]
Cx = Tuple[Part, Part]   # (re, im) texts; None: exactly zero
TILE = "(BLOCK_D, N, CHUNK)"
ZEROS = "tl.zeros([BLOCK_D, N, CHUNK], dtype=tl.float32)"
RATIO_OF = {"ratio_dt": "abar_dt_over_abar", "ratio_a": "abar_a_over_abar"}


def _p(t: str) -> str:
    return t if t.replace("_", "").replace(".", "").isalnum() or t.startswith("(") else f"({t})"


def _mul(*factors: Part) -> Part:
    return None if any(f is None for f in factors) else " * ".join(_p(f) for f in factors)


def _add(*terms: Tuple[str, Part]) -> Part:
    out = ""
    for sign, t in terms:
        if t is not None:
            out = (t if sign == "+" else f"-{_p(t)}") if not out else f"{out} {sign} {t}"
    return f"({out})" if out else None


def cmul(x: Cx, y: Cx) -> Cx:
    (xr, xi), (yr, yi) = x, y
    return (_add(("+", _mul(xr, yr)), ("-", _mul(xi, yi))),
            _add(("+", _mul(xr, yi)), ("+", _mul(xi, yr))))


def cadd(*xs: Cx) -> Cx:
    return _add(*(("+", x[0]) for x in xs)), _add(*(("+", x[1]) for x in xs))


def real(x: Part) -> Cx:
    return x, None


def _or_zeros(t: Part) -> str:
    return ZEROS if t is None else f"tl.broadcast_to({t}, {TILE})"


def pair(name: str) -> Cx:
    return name, f"{name}_i"


class ComplexBackwardGen(_BackwardGen):
    """Emits the complex-A backward kernel (the real generator's layout and launcher)."""

    def __init__(self, plan: KernelPlan):
        super().__init__(plan)
        d, der = plan.disc, plan.disc.derivatives
        split = dict(zip(("abar", "bbar", "bbar_prev"), d.split))
        self.coefs = {k: split[k] for k in self.coefs}
        dsplit = dict(der.split)
        self.grads = {k: dsplit[k] for k in self.grads}
        if self.ratios:
            self.ratios = {k: dsplit[RATIO_OF[k]] for k in self.ratios}

    def names(self) -> Dict[str, str]:
        return {"dt": "dt3", "a_re": "a3", "a_im": "a3_i"}

    def params(self) -> List[str]:
        p = super().params()
        planes = ["stride_A_plane"] if self.sel["A"] else []
        planes += [f"stride_{w}_plane" for w in ("B", "C") if self.sel[w]]
        at = p.index("BLOCK_D: tl.constexpr")
        return p[:at] + planes + p[at:]

    def print_cx(self, o: Lines, keys: Dict[str, Tuple[object, object]], prefix: str,
                 names: Optional[Dict[str, str]] = None,
                 rename: Optional[Dict[str, str]] = None) -> Dict[str, Cx]:
        """The split (re, im) expressions of ``keys`` printed as ``name``, ``name_i``;
        {key: (re, im) names}, None for a part that is exactly zero."""
        rename = rename or {}
        flat, flat_names = {}, {}
        for k, (re, im) in keys.items():
            nm = rename.get(k, k)
            flat[k], flat[k + "_i"] = re, im
            flat_names[k], flat_names[k + "_i"] = nm, nm + "_i"
        live = self.print_math(o, flat, prefix, names, flat_names)
        return {k: (flat_names[k] if k in live else None,
                    flat_names[k + "_i"] if k + "_i" in live else None) for k in keys}

    # ---- kernel ------------------------------------------------------------------------------
    def kernel(self, name: str) -> str:
        sel = self.sel
        o = Lines()
        o.jit_def(name, self.params())
        self.common_setup(o)
        if sel["A"]:
            o("a_rows = A_ptr + bat * stride_A_b + ch64[:, None] * stride_A_d "
              "+ nn[None, :] * stride_A_n",
              "# dA per token: (b, d, n, l, 2) (re, im) pairs",
              "da_rows = (bat * n_channels + ch64[:, None]) * N * seqlen + nn[None, :] * seqlen")
        else:
            o("# constant complex parameters: (.., d, n, 2) (re, im) pairs",
              "a = tl.load(A_ptr + dn * 2).to(tl.float32)",
              "a_i = tl.load(A_ptr + dn * 2 + 1).to(tl.float32)",
              "a3 = a[:, :, None]", "a3_i = a_i[:, :, None]")
        for w in ("B", "C"):
            lw = w.lower()
            if sel[w]:
                o(f"# the program's channels share one group of {w}",
                  f"group_{lw} = (pid_d * BLOCK_D) // cpg_{w}",
                  f"{lw}_rows = {w}_ptr + bat * stride_{w}_b + group_{lw}.to(tl.int64) * "
                  f"stride_{w}_g + nn * stride_{w}_n",
                  f"d{lw}_part = 0 if ATOMIC_BC else (pid_d % (cpg_{w} // BLOCK_D)).to(tl.int64)  "
                  f"# which partial d{w} this channel block writes")
            else:
                o(f"{lw}t = tl.load({w}_ptr + dn * 2).to(tl.float32)",
                  f"{lw}t_i = tl.load({w}_ptr + dn * 2 + 1).to(tl.float32)",
                  f"{lw}3 = {lw}t[:, :, None]", f"{lw}3_i = {lw}t_i[:, :, None]")
        if not sel["dt"]:
            o("dr = tl.load(delta_ptr + chl).to(tl.float32)")
        if self.bias:
            o("if HAS_DT_BIAS:",
              "    dt_bias = tl.load(dt_bias_ptr + chl).to(tl.float32)",
              "else:",
              "    dt_bias = zero_d")
            if sel["dt"]:
                o("dt_bias = dt_bias[:, None]")
        if not sel["dt"]:
            o(f"dt = {delta_expr(self.plan, 'dr')}", "dt3 = dt[:, None, None]")
        if "D" in self.terms:
            o("if HAS_D:",
              "    d_skip = tl.load(D_ptr + chl).to(tl.float32)",
              "else:",
              "    d_skip = zero_d")
        state = "(seq64 * n_channels * N + dn) * 2"
        ckpt = "ckpt_ptr + ((slot0 + c).to(tl.int64) * n_channels * N + dn) * 2"
        # ---- pass 1
        o("", "# pass 1: forward over the chunks, keeping only each chunk's initial state",
          "h = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "h_i = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "if HAS_H0:",
          f"    h = tl.load(h0_ptr + {state}, mask=dn_ok, other=0.0)",
          f"    h_i = tl.load(h0_ptr + {state} + 1, mask=dn_ok, other=0.0)",
          "for c in range(0, n_chunks):")
        o.indent()
        o(f"tl.store({ckpt}, h, mask=dn_ok)", f"tl.store({ckpt} + 1, h_i, mask=dn_ok)")
        self.load_chunk(o, backward=False)
        o("P, P_i, H, H_i = tl.associative_scan((abar_m, abar_m_i, bx, bx_i), 2, _ssmc_cpair)")
        new = cadd(cmul(("P", "P_i"), ("h[:, :, None]", "h_i[:, :, None]")), ("H", "H_i"))
        o(f"h_new = tl.sum(tl.where(t3 == CHUNK - 1, {new[0]}, 0.0), axis=2)",
          f"h_i = tl.sum(tl.where(t3 == CHUNK - 1, {new[1]}, 0.0), axis=2)",
          "h = h_new")
        o.dedent()
        o("tl.debug_barrier()  # pass 2 reads the checkpoints other threads wrote")
        # ---- pass 2
        o("", "# pass 2: backward over the chunks; lam = dL/dh at the next chunk's first step",
          "# (holomorphic: conj of the final state's gradient), Abar past the end is 1",
          "lam = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "lam_i = tl.zeros([BLOCK_D, N], dtype=tl.float32)",
          "if HAS_DHT:",
          f"    lam = tl.load(dhT_ptr + {state}, mask=dn_ok, other=0.0)",
          f"    lam_i = -tl.load(dhT_ptr + {state} + 1, mask=dn_ok, other=0.0)")
        accs = self.accumulators()
        o(*(f"{name} = {init}" for name, init, _ in accs))
        o("for i in range(0, n_chunks):")
        o.indent()
        o("c = n_chunks - 1 - i",
          f"h0c = tl.load({ckpt}, mask=dn_ok, other=0.0)",
          f"h0c_i = tl.load({ckpt} + 1, mask=dn_ok, other=0.0)")
        self.load_chunk(o, backward=True)
        self.chunk_backward(o)
        o.dedent()
        o("if HAS_H0:").indent()
        self.first_step(o)
        dh0 = cmul(("abar0", "abar0_i"), ("lam", "lam_i"))
        o(f"tl.store(dh0_ptr + {state}, {dh0[0]}, mask=dn_ok)",
          f"tl.store(dh0_ptr + {state} + 1, -{dh0[1]}, mask=dn_ok)").dedent()
        o("# per (sequence, channel block): the launcher sums over sequences; complex ones "
          "conjugated")
        for name, _, store in accs:
            o(store)
        return o.text()

    def accumulators(self):
        sel, out = self.sel, []
        dn_acc = "tl.zeros([BLOCK_D, N], dtype=tl.float32)"
        row_dn = "(seq64 * n_channels * N + dn) * 2"
        row_d = "seq64 * n_channels + ch"
        cx = ([] if sel["A"] else [("a", "A")]) + [(w.lower(), w) for w in ("B", "C")
                                                   if not sel[w]]
        for lw, w in cx:
            out.append((f"acc_{lw}", dn_acc,
                        f"tl.store(d{w}_ptr + {row_dn}, acc_{lw}, mask=dn_ok)"))
            out.append((f"acc_{lw}_i", dn_acc,
                        f"tl.store(d{w}_ptr + {row_dn} + 1, -acc_{lw}_i, mask=dn_ok)"))
        if not sel["dt"]:
            out.append(("acc_dt", "zero_d", f"tl.store(ddelta_ptr + {row_d}, acc_dt, mask=ch_ok)"))
        if "D" in self.terms:
            out.append(("acc_d", "zero_d", f"tl.store(dD_ptr + {row_d}, acc_d, mask=ch_ok)"))
        if self.bias:
            out.append(("acc_bias", "zero_d",
                        f"tl.store(ddt_bias_ptr + {row_d}, acc_bias, mask=ch_ok)"))
        return out

    def first_step(self, o: Lines):
        """``abar0``, ``abar0_i``: Abar at the sequence's first step (1 for an empty one)."""
        sel = self.sel
        o("first_ok = ch_ok & ((ch * 0 + seq_end) > seq_start)")
        if sel["dt"]:
            o("dr = tl.load(dt_rows + seq_start, mask=first_ok, other=0.0).to(tl.float32)[:, None]",
              f"dt0 = {delta_expr(self.plan, 'dr')}  # dt_bias is [BLOCK_D, 1] here")
        else:
            o("dt0 = dt[:, None]")
        if sel["A"]:
            o("a0 = tl.load(a_rows + seq_start, mask=dn_ok & first_ok[:, None], other=-1.0)"
              ".to(tl.float32)",
              "a0_i = tl.load(a_rows + stride_A_plane + seq_start, mask=dn_ok & first_ok[:, None], "
              "other=0.0).to(tl.float32)")
        else:
            o("a0 = a", "a0_i = a_i")
        ab = self.print_cx(o, {"abar": self.coefs["abar"]}, "ztmp",
                           {"dt": "dt0", "a_re": "a0", "a_im": "a0_i"}, {"abar": "abar0"})["abar"]
        o(f"abar0 = tl.where(first_ok[:, None], tl.broadcast_to({ab[0] or '0.0'}, (BLOCK_D, N)), "
          "1.0)",
          f"abar0_i = tl.where(first_ok[:, None], tl.broadcast_to({ab[1] or '0.0'}, "
          "(BLOCK_D, N)), 0.0)")

    def next_step(self, o: Lines):
        """``an`` (and the trapezoidal rule's ``bpn``): step t + 1's Abar (B̄₋), complex."""
        sel = self.sel
        o("offs_n = offs + 1",
          "tm_n = offs_n < seq_end",
          "tm2_n = ch_ok[:, None] & tm_n[None, :]")
        names = self.names()
        if sel["dt"]:
            o("drn = tl.load(dt_rows[:, None] + offs_n[None, :], mask=tm2_n, other=0.0)"
              ".to(tl.float32)",
              f"dtn3 = ({delta_expr(self.plan, 'drn')})[:, None, :]")
            names["dt"] = "dtn3"
        if sel["A"]:
            mask = "mask=tm_n[None, None, :] & dn_ok[:, :, None]"
            o(f"an3 = tl.load(a_rows[:, :, None] + offs_n[None, None, :], {mask}, other=-1.0)"
              ".to(tl.float32)",
              f"an3_i = tl.load(a_rows[:, :, None] + stride_A_plane + offs_n[None, None, :], "
              f"{mask}, other=0.0).to(tl.float32)")
            names.update(a_re="an3", a_im="an3_i")
        keys, rename = {"abar": self.coefs["abar"]}, {"abar": "an"}
        if self.trap:
            keys["bbar_prev"], rename["bbar_prev"] = self.coefs["bbar_prev"], "bpn"
        got = self.print_cx(o, keys, "ntmp", names, rename)
        m = "tm_n[None, None, :]"
        an = got["abar"]
        o(f"an = tl.where({m}, {_or_zeros(an[0])}, 1.0)",
          f"an_i = tl.where({m}, {_or_zeros(an[1])}, 0.0)")
        if self.trap:   # no step t + 1 past the sequence's end: no previous-token term
            bp = got["bbar_prev"]
            o(f"bpn = tl.where({m}, {_or_zeros(bp[0])}, 0.0)",
              f"bpn_i = tl.where({m}, {_or_zeros(bp[1])}, 0.0)")

    def load_chunk(self, o: Lines, backward: bool):
        sel = self.sel
        o("t0 = seq_start + c * CHUNK",
          "offs = t0 + tt",
          "tm = offs < seq_end",
          "tm2 = ch_ok[:, None] & tm[None, :]",
          "tm3 = tm[None, None, :]",
          "x = tl.load(u_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)",
          "x3 = x[:, None, :]")
        if sel["dt"]:
            o("dr = tl.load(dt_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)",
              f"dt = {delta_expr(self.plan, 'dr')}",
              "dt3 = dt[:, None, :]")
        if sel["A"]:
            # past the end a = -1 keeps coefficients like expm1(a dt) / a finite
            mask = "mask=tm3 & dn_ok[:, :, None]"
            o(f"a3 = tl.load(a_rows[:, :, None] + offs[None, None, :], {mask}, other=-1.0)"
              ".to(tl.float32)",
              f"a3_i = tl.load(a_rows[:, :, None] + stride_A_plane + offs[None, None, :], {mask}, "
              "other=0.0).to(tl.float32)")
        for w in ("B", "C"):
            if w == "C" and not backward:
                continue
            lw = w.lower()
            if sel[w]:
                for sfx, plane in (("", ""), ("_i", f" + stride_{w}_plane")):
                    o(f"{lw}t{sfx} = tl.load({lw}_rows[:, None]{plane} + offs[None, :], "
                      f"mask=tm[None, :], other=0.0).to(tl.float32)",
                      f"{lw}3{sfx} = {lw}t{sfx}[None, :, :]")
        if self.trap:
            o("# B_{t-1} x_{t-1}, zero at the sequence's first step",
              "offs_p = offs - 1",
              "tm_p = tm & (offs_p >= seq_start)",
              "xp = tl.load(u_rows[:, None] + offs_p[None, :], "
              "mask=ch_ok[:, None] & tm_p[None, :], other=0.0).to(tl.float32)",
              "xp3 = xp[:, None, :]")
            if sel["B"]:
                for sfx, plane in (("", ""), ("_i", " + stride_B_plane")):
                    o(f"bp3{sfx} = tl.load(b_rows[:, None]{plane} + offs_p[None, :], "
                      "mask=tm_p[None, :], other=0.0).to(tl.float32)[None, :, :]")
            else:
                o("bp3 = b3", "bp3_i = b3_i")
        keys = dict(self.coefs)
        if backward:
            keys.update(self.grads)
            keys.update(self.ratios or {})
        self.c = self.print_cx(o, keys, "btmp" if backward else "ftmp")
        ab = self.c["abar"]
        bb = cmul(self.c["bbar"], pair("b3"))
        o(f"abar_m = tl.where(tm3, {_or_zeros(ab[0])}, 1.0)",
          f"abar_m_i = tl.where(tm3, {_or_zeros(ab[1])}, 0.0)",
          "# Bbar B per (channel, state, step)",
          f"bb = {_or_zeros(bb[0])}", f"bb_i = {_or_zeros(bb[1])}")
        bx = cmul(pair("bb"), real("x3"))
        if self.trap:
            bx = cadd(bx, cmul(self.c["bbar_prev"], cmul(pair("bp3"), real("xp3"))))
        o(f"bx = tl.where(tm3, {bx[0]}, 0.0)", f"bx_i = tl.where(tm3, {bx[1]}, 0.0)")

    def chunk_backward(self, o: Lines):
        sel, terms, c = self.sel, self.terms, self.c
        hs = cadd(cmul(("P", "P_i"), ("h0c[:, :, None]", "h0c_i[:, :, None]")), ("H", "H_i"))
        o("P, P_i, H, H_i = tl.associative_scan((abar_m, abar_m_i, bx, bx_i), 2, _ssmc_cpair)",
          f"hs = {hs[0]}  # the chunk's states", f"hs_i = {hs[1]}",
          "g = tl.load(dout_rows[:, None] + offs[None, :], mask=tm2, other=0.0).to(tl.float32)")
        if "z" in terms:
            o("if HAS_Z:",
              "    zt = tl.load(z_rows[:, None] + offs[None, :], mask=tm2, other=0.0)"
              ".to(tl.float32)",
              "    sig = 1.0 / (1.0 + tl.exp(-zt))",
              "    y = 2.0 * tl.sum(c3 * hs - c3_i * hs_i, axis=1)"
              + (" + d_skip[:, None] * x" if "D" in terms else ""),
              "    dzt = g * y * sig * (1.0 + zt * (1.0 - sig))",
              "    tl.store(dz_ptr + grad_rows[:, None] + offs[None, :], "
              "dzt.to(dz_ptr.dtype.element_ty), mask=tm2)",
              "    dy = g * zt * sig",
              "else:",
              "    dy = g")
        else:
            o("dy = g")
        o("dy3 = dy[:, None, :]")
        if "D" in terms:
            o("dx = d_skip[:, None] * dy",
              "if HAS_D:",
              "    acc_d += tl.sum(dy * x, axis=1)")
        else:
            o("dx = tl.zeros_like(dy)")
        self.next_step(o)
        lam3 = cadd(("R", "R_i"), cmul(("Q", "Q_i"), ("lam[:, :, None]", "lam_i[:, :, None]")))
        o("# lam_t = 2 C_t dy_t + Abar_{t+1} lam_{t+1}, lam entering from the next chunk",
          "Q, Q_i, R, R_i = tl.associative_scan((an, an_i, tl.broadcast_to(2.0 * c3 * dy3, "
          f"{TILE}), tl.broadcast_to(2.0 * c3_i * dy3, {TILE})), 2, _ssmc_cpair, reverse=True)",
          f"lam3 = {lam3[0]}", f"lam3_i = {lam3[1]}")
        if self.trap:
            o("lam_in = lam  # lam at the next chunk's first step", "lam_in_i = lam_i")
        o("lam = tl.sum(tl.where(t3 == 0, lam3, 0.0), axis=2)",
          "lam_i = tl.sum(tl.where(t3 == 0, lam3_i, 0.0), axis=2)",
          "lam3 = tl.where(tm3, lam3, 0.0)", "lam3_i = tl.where(tm3, lam3_i, 0.0)")
        lam = pair("lam3")
        if self.ratios:
            dab = cmul(lam, ("hs - bx", "hs_i - bx_i"))
            o(f"dabar_h = {dab[0]}  # lam_t Abar_t h_{{t-1}}", f"dabar_h_i = {dab[1]}")
            dabar = pair("dabar_h")
        else:
            o("h_prev = tl.where(t3 == 0, h0c[:, :, None], tl.gather(hs, prev_t, 2))",
              "h_prev_i = tl.where(t3 == 0, h0c_i[:, :, None], tl.gather(hs_i, prev_t, 2))")
            dab = cmul(lam, pair("h_prev"))
            o(f"dabar = {dab[0]}", f"dabar_i = {dab[1]}")
            dabar = pair("dabar")
        dbb = cmul(lam, cmul(pair("b3"), real("x3")))
        o(f"dbbar = {dbb[0]}", f"dbbar_i = {dbb[1]}",
          f"dx += tl.sum({cmul(lam, pair('bb'))[0]}, axis=1)")
        if self.trap:
            lbpn = cmul(pair("lam_n3"), pair("bpn"))
            dbp = cmul(lam, cmul(pair("bp3"), real("xp3")))
            o("# step t + 1's previous-token term: lam_{t+1} Bbar_prev_{t+1} (B_t x_t)",
              "lam_n3 = tl.where(t3 == CHUNK - 1, lam_in[:, :, None], tl.gather(lam3, next_t, 2))",
              "lam_n3_i = tl.where(t3 == CHUNK - 1, lam_in_i[:, :, None], "
              "tl.gather(lam3_i, next_t, 2))",
              f"lbpn = {lbpn[0]}", f"lbpn_i = {lbpn[1]}",
              f"dbbarp = {dbp[0]}", f"dbbarp_i = {dbp[1]}",
              f"dx += tl.sum({cmul(pair('lbpn'), pair('b3'))[0]}, axis=1)")
        o("tl.store(du_ptr + grad_rows[:, None] + offs[None, :], dx.to(du_ptr.dtype.element_ty), "
          "mask=tm2)")

        def chain(var) -> Cx:
            first = c[f"ratio_{var}"] if self.ratios else c[f"abar_{var}"]
            parts = [cmul(dabar, first), cmul(pair("dbbar"), c[f"bbar_{var}"])]
            if self.trap:
                parts.append(cmul(pair("dbbarp"), c[f"bbar_prev_{var}"]))
            return cadd(*parts)
        ddt, da = chain("dt")[0], chain("a")
        o(f"ddt = tl.sum({ddt}, axis=1)" if ddt else "ddt = tl.zeros_like(dy)")
        draw = print_one(self.delta_raw, {"dt_raw": "dr", "dt_bias": "dt_bias"})
        if sel["dt"]:
            o(f"ddr = tl.where(tm2, ddt * ({draw}), 0.0)",
              "tl.store(ddelta_ptr + grad_rows[:, None] + offs[None, :], "
              "ddr.to(ddelta_ptr.dtype.element_ty), mask=tm2)")
            if self.bias:
                o("acc_bias += tl.sum(ddr, axis=1)")
        else:
            o(f"ddr = tl.sum(ddt, axis=1) * ({draw})", "acc_dt += ddr")
            if self.bias:
                o("acc_bias += ddr")
        if sel["A"]:
            at = "dA_ptr + (da_rows[:, :, None] + offs[None, None, :]) * 2"
            mask = "mask=tm3 & dn_ok[:, :, None]"
            o(f"tl.store({at}, {_or_zeros(da[0])}, {mask})",
              f"tl.store({at} + 1, -{_or_zeros(da[1])}, {mask})")
        else:
            for part, sfx in zip(da, ("", "_i")):
                if part is not None:
                    o(f"acc_a{sfx} += tl.sum({part}, axis=2)")
        lb = cmul(lam, c["bbar"])
        o(f"lb = {_or_zeros(lb[0])}", f"lb_i = {_or_zeros(lb[1])}")
        b_val = cmul(pair("lb"), real("x3"))
        if self.trap:   # selective B_t: from step t + 1; a constant B: each step's own term
            b_val = cadd(b_val, cmul(pair("lbpn"), real("x3")) if sel["B"] else
                         cmul(cmul(lam, c["bbar_prev"]), real("xp3")))
        c_val = (_mul("2.0", "hs", "dy3"), _mul("2.0", "hs_i", "dy3"))
        for w, val in (("B", b_val), ("C", c_val)):
            lw = w.lower()
            if sel[w]:
                o(f"d{lw}_ptrs = d{w}_ptr + ((((d{lw}_part * n_rows + bat) * "
                  f"(n_channels // cpg_{w}) + group_{lw}) * N + nn[:, None]) * seqlen + "
                  "offs[None, :]) * 2")
                for part, sign, off in ((val[0], "", ""), (val[1], "-", " + 1")):
                    o("if ATOMIC_BC:",
                      f"    tl.atomic_add(d{lw}_ptrs{off}, {sign}tl.sum({part}, axis=0), "
                      "mask=tm[None, :], sem='relaxed')",
                      "else:",
                      f"    tl.store(d{lw}_ptrs{off}, {sign}tl.sum({part}, axis=0), "
                      "mask=tm[None, :])")
            else:
                for part, sfx in zip(val, ("", "_i")):
                    o(f"acc_{lw}{sfx} += tl.sum(tl.where(tm3, {part}, 0.0), axis=2)")
