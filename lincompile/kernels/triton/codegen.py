"""Triton source generated from a `MethodSpec`: one module per (spec, head dims, dtype).

What the generator covers (everything else is declared unsupported, so the reference serves it):
  kind          "linear" only (softmax / quadratic KV caches and Linformer stay on the reference);
  feature map   identity (x * sqrt(scale)), l2, elu1, relu, angular, cosformer, performer, hedgehog, inlined as
                the prologue `_phi` (codegen_features); F = spec.feature_dim(dk) feature columns (BF padded);
  normalizer    none or denominator (num / max(den, DENOMINATOR_EPS), global and kernel-local terms together);
  local branch  none, relu2 (relu(phi_q.phi_k)^2) or softmax (raw q.k * scale, online over tiles) in the group;
  global branch inclusive (phi(q) S + causal in-chunk dots) or grouped (alpha phi(q) S over completed groups);
  conv          causal depthwise conv on V (K//2 + 1 live taps) as banded tile products;
  decay         gamma^(t - s) on the inclusive branch alone (retnet); the state term gamma^(t - start + 1);
                the kernels read log gamma per KV head where alpha goes (alpha_ptr);
  group size    <= MAX_GROUP; not yoso / taylor.

Forms (each a `@triton.jit` kernel in the module; grid = (DV blocks, B * H), one program per query head, GQA
read through h // (H / HKV) and never materialised):
  chunked_fwd  causal prefill from a state, returning the new state. Chunks are aligned to positions: with
               groups a chunk is exactly one group (so the local branch is one tile and the group buffer of the
               state is the head of the first chunk); without groups, CHUNK positions. Left padding (a per-row
               count of leading padding tokens) is handled in the kernel: padding queries sit at the row's
               start position and see only the state, as in the reference.
  verify_fwd   k draft tokens under a chain or tree (ancestor matrix) from a state, state unchanged; a tree may
               cross a group boundary (earlier-group ancestors and buffer go to the grouped branch).
  recurrent    one token per row (decode), reading and returning the state with vector ops only.
Accumulation is fp32; fp32 inputs use IEEE dots, bf16/fp16 inputs TF32 dots.
"""
from __future__ import annotations

from dataclasses import dataclass

from lincompile.kernels.triton import codegen_features as features
from lincompile.methods.feature_maps import DENOMINATOR_EPS
from lincompile.methods.spec import MethodSpec

#: Largest group size a chunk (one group per chunk) may hold.
MAX_GROUP = 128
#: Chunk length (positions) for methods without groups.
CHUNK = 64
FORMS = ("chunked_fwd", "verify", "recurrent")
DTYPES = ("float32", "bfloat16", "float16")


def unsupported_reason(spec: MethodSpec) -> str | None:
    """Why the generator cannot express `spec` (None when it can)."""
    if spec.kind != "linear":
        return f"kind={spec.kind!r} (only kind='linear' is generated)"
    if reason := features.unsupported_map(spec):
        return reason
    if spec.local == "yoso":
        return "local='yoso'"
    if spec.decay and (spec.global_branch != "inclusive" or spec.local != "none" or spec.conv != "none"):
        return "decay=True beside a local branch or conv (generated: decay on the inclusive branch alone)"
    if spec.conv == "centered":
        return "conv='centered' (not causal)"
    if spec.uses_groups and spec.group_size > MAX_GROUP:
        return f"group_size={spec.group_size} > {MAX_GROUP}"
    return None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Plan:
    """A spec with its shape class: the compile-time constants of one generated module."""

    spec: MethodSpec
    dk: int
    dv: int
    dtype: str
    block_v: int

    def __post_init__(self) -> None:
        reason = unsupported_reason(self.spec)
        if reason:
            raise ValueError(f"{self.spec.name}: cannot generate a Triton kernel: {reason}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")

    @property
    def chunk(self) -> int:
        return self.spec.group_size if self.spec.uses_groups else CHUNK

    @property
    def half(self) -> int:
        return self.spec.conv_kernel // 2

    def constants(self) -> dict[str, int]:
        """Module-level tl.constexpr values."""
        chunk = self.chunk
        f = self.spec.feature_dim(self.dk)
        return {"DK": self.dk, "DV": self.dv, "BK": max(16, _pow2(self.dk)), "BV": self.block_v,
                "F": f, "BF": max(16, _pow2(f)),
                "C": chunk, "BC": max(16, _pow2(chunk)), "G": self.spec.group_size,
                "BG": max(16, _pow2(self.spec.group_size)), "HALF": self.half,
                "BW": max(16, _pow2(self.half)), "KC": self.spec.conv_kernel,
                "NPREV": -(-self.half // chunk) if self.spec.conv != "none" else 0}


class _Source:
    """Lines of Python source with an indent level."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.extend(("    " * self.level + part).rstrip() for part in line.split("\n"))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Gen:
    """Emits the module for one plan; each method writes one jit function."""

    def __init__(self, plan: Plan) -> None:
        self.p = plan
        spec = plan.spec
        self.groups = spec.uses_groups
        self.glob = spec.global_branch
        self.norm = spec.normalizer == "denominator"
        self.local = spec.local
        self.conv = spec.conv == "causal"
        self.kernel_terms = self.glob != "none" or self.local == "relu2"
        self.prec = "ieee" if plan.dtype == "float32" else "tf32"
        self.src = _Source()

    def dot(self, a: str, b: str) -> str:
        return f"tl.dot({a}, {b}, input_precision=\"{self.prec}\")"

    # Accumulators carried through the tiles: (name, initial value for a tile of BQ query rows).
    def accumulators(self, rows: str) -> list[tuple[str, str]]:
        acc = []
        if self.kernel_terms:
            acc.append(("num", f"tl.full([{rows}, BV], 0.0, tl.float32)"))
        if self.norm:
            acc.append(("den", f"tl.full([{rows}], 0.0, tl.float32)"))
        if self.local == "softmax":
            acc += [("m_i", f"tl.full([{rows}], float(\"-inf\"), tl.float32)"),
                    ("l_i", f"tl.full([{rows}], 0.0, tl.float32)"),
                    ("sm", f"tl.full([{rows}, BV], 0.0, tl.float32)")]
        return acc

    def acc_names(self, rows: str = "BC") -> str:
        return ", ".join(name for name, _ in self.accumulators(rows))

    def module(self) -> str:
        s = self.src
        spec = self.p.spec
        s(f'"""Generated by lincompile.kernels.triton.codegen for {spec.name!r} (dk={self.p.dk}, dv={self.p.dv}, '
          f'{self.p.dtype}). Do not edit."""',
          "import triton",
          "import triton.language as tl",
          "")
        for name, value in self.p.constants().items():
            s(f"{name} = tl.constexpr({value})")
        for name, value in features.constants(spec, self.p.dk).items():
            s(f"{name} = tl.constexpr({value!r})")
        s(f"EPS = tl.constexpr({DENOMINATOR_EPS!r})", "")
        self.reductions()
        s(features.phi_source(spec))
        if self.kernel_terms or self.local == "softmax":
            self.kernel_tile()
        if self.conv:
            self.conv_tile()
        self.finish()
        self.chunk_block()
        self.chunked_fwd()
        self.verify_fwd()
        self.recurrent()
        return s.text()

    def reductions(self) -> None:
        """Sum and max over an axis as tl.reduce with the standard library's combine functions: tl.sum / tl.max
        are themselves jit functions built at `import triton`, so they fail under TRITON_INTERPRET=1 set after
        that import; tl.reduce is a builtin, and the interpreter still takes its numpy fast path for these."""
        self.src("@triton.jit", "def _rsum(x, axis: tl.constexpr):",
                 "    return tl.reduce(x, axis, tl.standard._sum_combine)", "", "",
                 "@triton.jit", "def _rmax(x, axis: tl.constexpr):",
                 "    return tl.reduce(x, axis, tl.standard._elementwise_max)", "", "")

    def kernel_tile(self) -> None:
        """One tile of keys for the global, kernel-local and softmax-local branches."""
        s = self.src
        accs = self.acc_names()
        s("@triton.jit",
          f"def _kernel_tile(fq, qr, qpos, vis, fk, kr, kpos, vt, kern, fresh, alpha, scale, {accs}):")
        s.level += 1
        s('"""Keys kpos visible to queries qpos (vis): kern rows feed local/grouped, fresh rows inclusive."""')
        if self.groups:
            s("same = (qpos[:, None] // G) == (kpos[None, :] // G)")
        if self.kernel_terms:
            s(f"a = {self.dot('fq', 'tl.trans(fk)')}", "w = tl.full(a.shape, 0.0, tl.float32)")
            if self.glob == "inclusive" and self.p.spec.decay:
                s("lag = tl.maximum(qpos[:, None] - kpos[None, :], 0).to(tl.float32)",
                  "w += tl.where(vis & fresh[None, :], a * tl.exp(alpha * lag), 0.0)")
            elif self.glob == "inclusive":
                s("w += tl.where(vis & fresh[None, :], a, 0.0)")
            if self.glob == "grouped":
                s("w += alpha * tl.where(vis & kern[None, :] & (same == 0), a, 0.0)")
            if self.local == "relu2":
                s("r = tl.maximum(a, 0.0)", "w += tl.where(vis & kern[None, :] & same, r * r, 0.0)")
            s(f"num += {self.dot('w', 'vt')}")
            if self.norm:
                s("den += _rsum(w, 1)")
        if self.local == "softmax":
            s(f"sc = {self.dot('qr', 'tl.trans(kr)')} * scale",
              "ok = vis & kern[None, :] & same",
              "sc = tl.where(ok, sc, float(\"-inf\"))",
              "m_new = tl.maximum(m_i, _rmax(sc, 1))",
              "m_use = tl.where(m_new == float(\"-inf\"), 0.0, m_new)",
              "pr = tl.where(ok, tl.exp(sc - m_use[:, None]), 0.0)",
              "corr = tl.exp(m_i - m_use)",
              "l_i = l_i * corr + _rsum(pr, 1)",
              f"sm = sm * corr[:, None] + {self.dot('pr', 'vt')}",
              "m_i = m_new")
        s(f"return {accs}")
        s.level -= 1
        s("", "")

    def conv_tile(self) -> None:
        self.src("@triton.jit",
                 "def _conv_tile(qpos, vis, kpos, vt, ok, wrow, cv):",
                 '    """Causal depthwise conv: tap HALF - lag of this head\'s filter for lags 0..HALF."""',
                 "    lag = qpos[:, None] - kpos[None, :]",
                 "    m = vis & ok[None, :] & (lag >= 0) & (lag <= HALF)",
                 "    band = tl.load(wrow + (HALF - lag), mask=m, other=0.0)",
                 f"    return cv + {self.dot('band', 'vt')}", "", "")

    def finish(self) -> None:
        """Combine the accumulators with the state's phi(q) S term into the output tile."""
        s = self.src
        accs = self.acc_names()
        s("@triton.jit", f"def _finish(fq, S, z, alpha, {accs}):")
        s.level += 1
        if self.glob != "none":
            gain = "alpha * " if self.glob == "grouped" else ""
            s(f"num += {gain}{self.dot('fq', 'S')}")
            if self.norm:
                s(f"den += {gain}_rsum(fq * z[None, :], 1)")
        if self.kernel_terms:
            s("out = num / tl.maximum(den, EPS)[:, None]" if self.norm else "out = num")
        else:
            s("out = sm * 0.0")
        if self.local == "softmax":
            s("out += tl.where(l_i[:, None] > 0, sm / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)")
        s("return out")
        s.level -= 1
        s("", "")

    def init_accs(self, rows: str) -> None:
        for name, value in self.accumulators(rows):
            self.src(f"{name} = {value}")

    def chunk_block(self) -> None:
        """Outputs of one query tile against the chunk of positions [p, p + C) and the state."""
        s = self.src
        s("@triton.jit",
          "def _chunk_block(qb, kb, vb, gkb, gvb, winb, wrow, qi, qok, qpos, qlim, p, r0, end, npad, S, z, alpha,",
          "                 ck, cmk, cf, fpb, cv_, cmv, scale, sqrt_scale):")
        s.level += 1
        s('"""Query rows qi (ok: qok) at qpos see keys at positions < qlim. Returns (out, fk, vt, kern, new)."""',
          "rows = tl.arange(0, BC)",
          "qr = tl.load(qb + qi[:, None] * DK + ck[None, :], mask=qok[:, None] & cmk[None, :], other=0.0)"
          ".to(tl.float32)",
          "fq = tl.where(qok[:, None], _phi(qr, qpos, ck, cf, sqrt_scale, fpb), 0.0)",
          "kpos = p + rows",
          "inrow = rows < C",
          "new = inrow & (kpos >= r0) & (kpos < end)",
          "ki = npad + kpos - r0",
          "kr = tl.load(kb + ki[:, None] * DK + ck[None, :], mask=new[:, None] & cmk[None, :], other=0.0)"
          ".to(tl.float32)",
          "vt = tl.load(vb + ki[:, None] * DV + cv_[None, :], mask=new[:, None] & cmv[None, :], other=0.0)"
          ".to(tl.float32)")
        if self.groups:
            s("gstart = r0 // G * G",
              "buf = inrow & (kpos < r0) & (kpos >= gstart)",
              "slot = kpos - gstart",
              "kr += tl.load(gkb + slot[:, None] * DK + ck[None, :], mask=buf[:, None] & cmk[None, :], other=0.0)",
              "vt += tl.load(gvb + slot[:, None] * DV + cv_[None, :], mask=buf[:, None] & cmv[None, :], other=0.0)",
              "kern = new | buf")
        else:
            s("kern = new")
        s("fk = tl.where(kern[:, None], _phi(kr, kpos, ck, cf, sqrt_scale, fpb), 0.0)",
          "vis = kpos[None, :] < qlim[:, None]")
        self.init_accs("BC")
        accs = self.acc_names()
        if self.kernel_terms or self.local == "softmax":
            s(f"{accs} = _kernel_tile(fq, qr, qpos, vis, fk, kr, kpos, vt, kern, new, alpha, scale, {accs})")
        s(f"out = _finish({self.carried('fq', 'tl.maximum(p, r0)')}, S, z, alpha, {accs})")
        if self.conv:
            s("cv = tl.full([BC, BV], 0.0, tl.float32)",
              "for m in tl.static_range(NPREV + 1):")
            s.level += 1
            s("cpos = p - m * C + rows",
              "cnew = inrow & (cpos >= r0) & (cpos < end)",
              "cwin = inrow & (cpos < r0) & (cpos >= r0 - HALF)",
              "cvt = tl.load(vb + (npad + cpos - r0)[:, None] * DV + cv_[None, :], mask=cnew[:, None] & cmv[None, :],"
              " other=0.0).to(tl.float32)",
              "cvt += tl.load(winb + (cpos - r0 + HALF)[:, None] * DV + cv_[None, :],"
              " mask=cwin[:, None] & cmv[None, :], other=0.0)",
              "cv = _conv_tile(qpos, cpos[None, :] < qlim[:, None], cpos, cvt, cnew | cwin, wrow, cv)")
            s.level -= 1
            s("out += cv")
        s("return out, fk, vt, kern, new")
        s.level -= 1
        s("", "")

    def prologue(self, rows_name: str) -> None:
        """Program ids, head indexing, column ranges and the per-head bases of every tensor."""
        s = self.src
        s("iv = tl.program_id(0)",
          "bh = tl.program_id(1)",
          "b = bh // H",
          "h = bh % H",
          "hg = H // HKV",
          "hk = h // hg",
          "sh = (b * HKV + hk).to(tl.int64)",
          "ck = tl.arange(0, BK)",
          "cmk = ck < DK",
          "kfirst = cmk & (ck * 0 + iv == 0)",
          "cf = tl.arange(0, BF)",
          "cmf = cf < F",
          "ffirst = cmf & (cf * 0 + iv == 0)",
          "fpb = fp_ptr + hk.to(tl.int64) * FP",
          "cv_ = iv * BV + tl.arange(0, BV)",
          "cmv = cv_ < DV",
          f"qb = q_ptr + (b * H + h).to(tl.int64) * {rows_name} * DK",
          f"kb = k_ptr + sh * {rows_name} * DK",
          f"vb = v_ptr + sh * {rows_name} * DV",
          f"ob = o_ptr + (b * H + h).to(tl.int64) * {rows_name} * DV",
          "gkb = gk_ptr + sh * G * DK",
          "gvb = gv_ptr + sh * G * DV",
          "winb = win_ptr + sh * HALF * DV",
          "wrow = w_ptr + h * KC",
          self.alpha_load())
        if self.glob != "none":
            s("S = tl.load(s_ptr + sh * F * DV + cf[:, None] * DV + cv_[None, :], mask=cmf[:, None] & cmv[None, :],"
              " other=0.0)")
        else:
            s("S = 0.0")
        s("z = tl.load(z_ptr + sh * F + cf, mask=cmf, other=0.0)" if self.norm else "z = 0.0")

    def alpha_load(self) -> str:
        """`alpha`: the grouped branch's gain, or log gamma of this KV head under decay."""
        if self.p.spec.decay:
            return "alpha = tl.load(alpha_ptr + hk)  # log gamma of this KV head"
        return "alpha = tl.load(alpha_ptr)" if self.glob == "grouped" else "alpha = 1.0"

    def carried(self, fq: str, start: str) -> str:
        """phi(q) as it meets the state: times gamma^(qpos - start + 1) under decay (start: the position after the
        state's last token)."""
        if not self.p.spec.decay:
            return fq
        return f"{fq} * tl.exp(alpha * (qpos - {start} + 1).to(tl.float32))[:, None]"

    def chunked_fwd(self) -> None:
        s = self.src
        s("@triton.jit",
          "def chunked_fwd(q_ptr, k_ptr, v_ptr, o_ptr, r0_ptr, npad_ptr, s_ptr, s_out, z_ptr, z_out, gk_ptr, gv_ptr,",
          "                gk_out, gv_out, win_ptr, win_out, alpha_ptr, w_ptr, fp_ptr, scale, sqrt_scale, T, H, HKV):")
        s.level += 1
        s('"""Causal prefill of T tokens (the first npad[b] of row b padding) from a state; writes the new state."""')
        self.prologue("T")
        s("r0 = tl.load(r0_ptr + b).to(tl.int32)",
          "npad = tl.load(npad_ptr + b).to(tl.int32)",
          "end = r0 + T - npad",
          "rows = tl.arange(0, BC)",
          "p0 = r0 // C * C",
          "for i0 in range(0, npad, BC):")
        s.level += 1
        s("qi = i0 + rows",
          "qok = qi < npad",
          "qpos = r0 + rows * 0",
          "out, fk, vt, kern, new = _chunk_block(qb, kb, vb, gkb, gvb, winb, wrow, qi, qok, qpos, qpos, p0, r0, end,",
          "                                      npad, S, z, alpha, ck, cmk, cf, fpb, cv_, cmv, scale,",
          "                                      sqrt_scale)",
          "tl.store(ob + qi[:, None] * DV + cv_[None, :], out.to(o_ptr.dtype.element_ty),"
          " mask=qok[:, None] & cmv[None, :])")
        s.level -= 1
        s("for p in range(p0, end, C):")
        s.level += 1
        s("pos = p + rows",
          "qok = (rows < C) & (pos >= r0) & (pos < end)",
          "qi = npad + pos - r0",
          "out, fk, vt, kern, new = _chunk_block(qb, kb, vb, gkb, gvb, winb, wrow, qi, qok, pos, pos + 1, p, r0, end,",
          "                                      npad, S, z, alpha, ck, cmk, cf, fpb, cv_, cmv, scale,",
          "                                      sqrt_scale)",
          "tl.store(ob + qi[:, None] * DV + cv_[None, :], out.to(o_ptr.dtype.element_ty),"
          " mask=qok[:, None] & cmv[None, :])")
        if self.glob == "grouped":
            s("done = p + C <= end",
              f"S += tl.where(done, {self.dot('tl.trans(fk)', 'vt')}, 0.0)")
            if self.norm:
                s("z += tl.where(done, _rsum(fk, 0), 0.0)")
        if self.glob == "inclusive":
            keep = ""
            if self.p.spec.decay:  # S = gamma^(new tokens) S + sum_s gamma^(last - s) phi(k_s) v_s
                s("last = tl.minimum(p + C, end) - 1",
                  "keep = tl.exp(alpha * (last - tl.maximum(p, r0) + 1).to(tl.float32))",
                  "fresh = tl.where(new[:, None], fk * tl.exp(alpha * (last - pos).to(tl.float32))[:, None], 0.0)")
                keep = "keep * "
            else:
                s("fresh = tl.where(new[:, None], fk, 0.0)")
            s(f"S = {keep}S + {self.dot('tl.trans(fresh)', 'vt')}")
            if self.norm:
                s(f"z = {keep}z + _rsum(fresh, 0)")
        s.level -= 1
        s("if h % hg == 0:")
        s.level += 1
        self.write_state()
        s.level -= 1
        s.level -= 1
        s("", "")

    def write_state(self) -> None:
        """The new state parts (by the first query head of each KV head): S, z, group buffer, conv window."""
        s = self.src
        if self.glob != "none":
            s("tl.store(s_out + sh * F * DV + cf[:, None] * DV + cv_[None, :], S, mask=cmf[:, None] & cmv[None, :])")
            if self.norm:
                s("tl.store(z_out + sh * F + cf, z, mask=ffirst)")
        if self.groups:
            s("grow = tl.arange(0, BG)",
              "gpos = end // G * G + grow",
              "gnew = (grow < G) & (gpos >= r0) & (gpos < end)",
              "gbuf = (grow < G) & (gpos < r0) & (gpos < end)",
              "gslot = gpos - r0 // G * G",
              "gi = npad + gpos - r0",
              "nk = tl.load(kb + gi[:, None] * DK + ck[None, :], mask=gnew[:, None] & cmk[None, :], other=0.0)"
              ".to(tl.float32)",
              "nk += tl.load(gkb + gslot[:, None] * DK + ck[None, :], mask=gbuf[:, None] & cmk[None, :], other=0.0)",
              "tl.store(gk_out + sh * G * DK + grow[:, None] * DK + ck[None, :], nk,"
              " mask=(grow[:, None] < G) & kfirst[None, :])",
              "nv = tl.load(vb + gi[:, None] * DV + cv_[None, :], mask=gnew[:, None] & cmv[None, :], other=0.0)"
              ".to(tl.float32)",
              "nv += tl.load(gvb + gslot[:, None] * DV + cv_[None, :], mask=gbuf[:, None] & cmv[None, :], other=0.0)",
              "tl.store(gv_out + sh * G * DV + grow[:, None] * DV + cv_[None, :], nv,"
              " mask=(grow[:, None] < G) & cmv[None, :])")
        if self.conv:
            s("wr = tl.arange(0, BW)",
              "wpos = end - HALF + wr",
              "wnew = (wr < HALF) & (wpos >= r0)",
              "wold = (wr < HALF) & (wpos < r0)",
              "nw = tl.load(vb + (npad + wpos - r0)[:, None] * DV + cv_[None, :], mask=wnew[:, None] & cmv[None, :],"
              " other=0.0).to(tl.float32)",
              "nw += tl.load(winb + (wpos - r0 + HALF)[:, None] * DV + cv_[None, :], mask=wold[:, None] & cmv[None, :],"
              " other=0.0)",
              "tl.store(win_out + sh * HALF * DV + wr[:, None] * DV + cv_[None, :], nw,"
              " mask=(wr[:, None] < HALF) & cmv[None, :])")
        if self.glob == "none" and not self.groups and not self.conv:
            s("pass")

    def verify_fwd(self) -> None:
        s = self.src
        s("@triton.jit",
          "def verify_fwd(q_ptr, k_ptr, v_ptr, o_ptr, r0_ptr, depth_ptr, anc_ptr, s_ptr, z_ptr, gk_ptr, gv_ptr,",
          "               win_ptr, alpha_ptr, w_ptr, fp_ptr, scale, sqrt_scale, N, H, HKV, BT: tl.constexpr):")
        s.level += 1
        s('"""N draft tokens at positions r0 + depth, each seeing the state and its ancestors (anc [N, N])."""')
        self.prologue("N")
        s("r0 = tl.load(r0_ptr + b).to(tl.int32)",
          "rows = tl.arange(0, BT)",
          "ok = rows < N",
          "qpos = r0 + tl.load(depth_ptr + rows, mask=ok, other=0).to(tl.int32)",
          "qr = tl.load(qb + rows[:, None] * DK + ck[None, :], mask=ok[:, None] & cmk[None, :], other=0.0)"
          ".to(tl.float32)",
          "fq = tl.where(ok[:, None], _phi(qr, qpos, ck, cf, sqrt_scale, fpb), 0.0)",
          "kr = tl.load(kb + rows[:, None] * DK + ck[None, :], mask=ok[:, None] & cmk[None, :], other=0.0)"
          ".to(tl.float32)",
          "fk = tl.where(ok[:, None], _phi(kr, qpos, ck, cf, sqrt_scale, fpb), 0.0)",
          "vt = tl.load(vb + rows[:, None] * DV + cv_[None, :], mask=ok[:, None] & cmv[None, :], other=0.0)"
          ".to(tl.float32)",
          "anc = tl.load(anc_ptr + rows[:, None] * N + rows[None, :], mask=ok[:, None] & ok[None, :], other=0) != 0")
        self.init_accs("BT")
        accs = self.acc_names()
        if self.groups:
            s("grow = tl.arange(0, BG)",
              "bpos = r0 // G * G + grow",
              "bok = (grow < G) & (bpos < r0)",
              "bk = tl.load(gkb + grow[:, None] * DK + ck[None, :], mask=bok[:, None] & cmk[None, :], other=0.0)",
              "bv = tl.load(gvb + grow[:, None] * DV + cv_[None, :], mask=bok[:, None] & cmv[None, :], other=0.0)",
              "fb = tl.where(bok[:, None], _phi(bk, bpos, ck, cf, sqrt_scale, fpb), 0.0)",
              f"{accs} = _kernel_tile(fq, qr, qpos, bpos[None, :] < qpos[:, None], fb, bk, bpos, bv, bok, grow < 0,",
              f"                      alpha, scale, {accs})")
        if self.kernel_terms or self.local == "softmax":
            s(f"{accs} = _kernel_tile(fq, qr, qpos, anc, fk, kr, qpos, vt, ok, ok, alpha, scale, {accs})")
        s(f"out = _finish({self.carried('fq', 'r0')}, S, z, alpha, {accs})")
        if self.conv:
            s("wr = tl.arange(0, BW)",
              "wpos = r0 - HALF + wr",
              "wok = wr < HALF",
              "wv = tl.load(winb + wr[:, None] * DV + cv_[None, :], mask=wok[:, None] & cmv[None, :], other=0.0)",
              "cv = tl.full([BT, BV], 0.0, tl.float32)",
              "cv = _conv_tile(qpos, wpos[None, :] < qpos[:, None], wpos, wv, wok, wrow, cv)",
              "cv = _conv_tile(qpos, anc, qpos, vt, ok, wrow, cv)",
              "out += cv")
        s("tl.store(ob + rows[:, None] * DV + cv_[None, :], out.to(o_ptr.dtype.element_ty),"
          " mask=ok[:, None] & cmv[None, :])")
        s.level -= 1
        s("", "")

    def recurrent(self) -> None:
        """Decode: one token per row through the state, with vector ops (no tile products of padded rows)."""
        s = self.src
        s("@triton.jit",
          "def recurrent(q_ptr, k_ptr, v_ptr, o_ptr, r0_ptr, real_ptr, s_ptr, s_out, z_ptr, z_out, gk_ptr, gv_ptr,",
          "              gk_out, gv_out, win_ptr, win_out, alpha_ptr, w_ptr, fp_ptr, scale, sqrt_scale, H, HKV):")
        s.level += 1
        s('"""One token per row at position r0[b]; a padding token (real[b] == 0) reads the state and keeps it."""')
        self.prologue("1")
        s("r0 = tl.load(r0_ptr + b).to(tl.int32)",
          "real = tl.load(real_ptr + b) != 0",
          "one = tl.arange(0, 1)",
          "qr = tl.load(qb + one[:, None] * DK + ck[None, :], mask=cmk[None, :], other=0.0).to(tl.float32)",
          "kr = tl.where(real, tl.load(kb + one[:, None] * DK + ck[None, :], mask=cmk[None, :], other=0.0), 0.0)"
          ".to(tl.float32)",
          "vr = tl.where(real, tl.load(vb + one[:, None] * DV + cv_[None, :], mask=cmv[None, :], other=0.0), 0.0)"
          ".to(tl.float32)",
          "fq = _phi(qr, r0 + one, ck, cf, sqrt_scale, fpb)")
        kernel = self.kernel_terms or self.local == "softmax"
        if kernel:
            s("num = tl.full([1, BV], 0.0, tl.float32)")
            if self.norm:
                s("den = tl.full([1], 0.0, tl.float32)")
        if self.glob == "inclusive":  # a padding row reads gamma S (decay) and keeps S
            keep = "tl.exp(alpha) * " if self.p.spec.decay else ""
            s("fk = tl.where(real, _phi(kr, r0 + one, ck, cf, sqrt_scale, fpb), 0.0)",
              "s_kept = S", f"S = {keep}S + tl.trans(fk) * vr")
            if self.norm:
                s("z_kept = z", f"z = {keep}z + _rsum(fk, 0)")
        if self.glob != "none":
            gain = "alpha * " if self.glob == "grouped" else ""
            s(f"num += {gain}_rsum(tl.trans(fq) * S, 0)[None, :]")
            if self.norm:
                s(f"den += {gain}_rsum(fq * z[None, :], 1)")
        if self.groups:
            s("grow = tl.arange(0, BG)",
              "off = r0 % G",
              "write = (grow == off) & real",
              "keep = (grow < off) & (grow < G)",
              "bk = tl.load(gkb + grow[:, None] * DK + ck[None, :], mask=keep[:, None] & cmk[None, :], other=0.0)",
              "bv = tl.load(gvb + grow[:, None] * DV + cv_[None, :], mask=keep[:, None] & cmv[None, :], other=0.0)",
              "bk = tl.where(write[:, None], kr, bk)",
              "bv = tl.where(write[:, None], vr, bv)",
              "valid = keep | write")
            if self.local == "relu2" or self.glob == "grouped":
                s("fb = tl.where(valid[:, None], _phi(bk, r0 // G * G + grow, ck, cf, sqrt_scale, fpb), 0.0)")
            if self.local == "relu2":
                s("d = _rsum(fb * fq, 1)",
                  "w = tl.where(valid, tl.maximum(d, 0.0) * tl.maximum(d, 0.0), 0.0)",
                  "num += _rsum(w[:, None] * bv, 0)[None, :]")
                if self.norm:
                    s("den += _rsum(w, 0)")
        if kernel:
            s("out = num / tl.maximum(den, EPS)[:, None]" if self.norm else "out = num")
        if self.local == "softmax":
            s("sc = _rsum(bk * qr, 1) * scale",
              "sc = tl.where(valid, sc, float(\"-inf\"))",
              "mx = _rmax(sc, 0)",
              "pr = tl.where(valid, tl.exp(sc - tl.where(mx == float(\"-inf\"), 0.0, mx)), 0.0)",
              "tot = _rsum(pr, 0)",
              "out += tl.where(tot > 0, _rsum(pr[:, None] * bv, 0) / tl.where(tot > 0, tot, 1.0), 0.0)[None, :]")
        if self.conv:
            s("wr = tl.arange(0, BW)",
              "wok = wr < HALF",
              "win = tl.load(winb + wr[:, None] * DV + cv_[None, :], mask=wok[:, None] & cmv[None, :], other=0.0)",
              "taps = tl.load(wrow + wr, mask=wok, other=0.0)",
              "conv = _rsum(taps[:, None] * win, 0)[None, :] + tl.load(wrow + HALF) * vr")
            s("out = conv" if not kernel else "out += conv")
        s("tl.store(ob + one[:, None] * DV + cv_[None, :], out.to(o_ptr.dtype.element_ty), mask=cmv[None, :])")
        s("if h % hg == 0:")
        s.level += 1
        if self.groups:
            s("full = real & (off == G - 1)")
            if self.glob == "grouped":
                s(f"S += tl.where(full, {self.dot('tl.trans(fb)', 'bv')}, 0.0)")
                if self.norm:
                    s("z += tl.where(full, _rsum(fb, 0), 0.0)")
            s("tl.store(gk_out + sh * G * DK + grow[:, None] * DK + ck[None, :], tl.where(full, 0.0, bk),"
              " mask=(grow[:, None] < G) & kfirst[None, :])",
              "tl.store(gv_out + sh * G * DV + grow[:, None] * DV + cv_[None, :], tl.where(full, 0.0, bv),"
              " mask=(grow[:, None] < G) & cmv[None, :])")
        if self.glob == "inclusive":
            s("S = tl.where(real, S, s_kept)")
            if self.norm:
                s("z = tl.where(real, z, z_kept)")
        if self.glob != "none":
            s("tl.store(s_out + sh * F * DV + cf[:, None] * DV + cv_[None, :], S, mask=cmf[:, None] & cmv[None, :])")
            if self.norm:
                s("tl.store(z_out + sh * F + cf, z, mask=ffirst)")
        if self.conv:
            s("nxt = tl.load(winb + (wr + 1)[:, None] * DV + cv_[None, :],"
              " mask=(wr[:, None] + 1 < HALF) & cmv[None, :], other=0.0)",
              "nxt = tl.where((wr[:, None] == HALF - 1), vr, nxt)",
              "tl.store(win_out + sh * HALF * DV + wr[:, None] * DV + cv_[None, :], tl.where(real, nxt, win),"
              " mask=wok[:, None] & cmv[None, :])")
        if self.glob == "none" and not self.groups and not self.conv:
            s("pass")
        s.level -= 2
        s("")


def generate(plan: Plan) -> str:
    """The Triton module source for a plan (all forms)."""
    return _Gen(plan).module()
