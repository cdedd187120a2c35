"""The chunk-parallel prefill: two kernels that split `chunked_fwd`'s walk over chunks so every chunk of every
head is its own program (grid = (DV blocks, heads, chunks)).

  chunk_sums     per KV head and chunk c: the chunk's addition to the state, dS_c = phi(K_c)^T V_c and
                 dz_c = sum phi(K_c) (grouped: only a completed group, its buffered head included; inclusive: the
                 call's own keys), written to [B, HKV, NC, F, DV] / [B, HKV, NC, F] fp32.
  chunk_outputs  per query head and chunk c: the chunk's outputs from S_c = S_0 + sum_{c' < c} dS_c' (the
                 launcher's exclusive prefix sum, same layout), exactly the body of `chunked_fwd`'s loop; chunk 0
                 also serves the row's padding queries and writes the group buffer and conv window of the new
                 state (the launcher writes S and z: S_0 plus every dS_c).
Chunk c of row b starts at position r0 // C * C + c * C; NC covers the longest row, and chunks past a row's end
add zero. Not for decay (its state term is a decayed scan), which keeps `chunked_fwd`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lincompile.kernels.triton.codegen import _Gen


def chunk_sums(gen: _Gen) -> None:
    s = gen.src
    s("@triton.jit",
      "def chunk_sums(k_ptr, v_ptr, r0_ptr, npad_ptr, gk_ptr, gv_ptr, ds_ptr, dz_ptr, fp_ptr, sqrt_scale, T, HKV,",
      "               NC):")
    s.level += 1
    s('"""dS_c and dz_c of every chunk c of every KV head (see the module docstring of codegen_parallel)."""')
    if gen.glob == "none":
        s("pass")
        s.level -= 1
        s("", "")
        return
    s("iv = tl.program_id(0)",
      "sh = tl.program_id(1).to(tl.int64)",
      "c = tl.program_id(2)",
      "b = sh // HKV",
      "ck = tl.arange(0, BK)",
      "cmk = ck < DK",
      "cf = tl.arange(0, BF)",
      "cmf = cf < F",
      "cv_ = iv * BV + tl.arange(0, BV)",
      "cmv = cv_ < DV",
      "fpb = fp_ptr + (sh % HKV) * FP",
      "r0 = tl.load(r0_ptr + b).to(tl.int32)",
      "npad = tl.load(npad_ptr + b).to(tl.int32)",
      "end = r0 + T - npad",
      "p = r0 // C * C + c * C",
      "kpos, kr, vt, kern, new, fk = _keys(k_ptr + sh * T * DK, v_ptr + sh * T * DV, gk_ptr + sh * G * DK,",
      "                                    gv_ptr + sh * G * DV, p, r0, end, npad, ck, cmk, cf, fpb, cv_, cmv,",
      "                                    sqrt_scale)")
    s("fresh = tl.where(p + C <= end, fk, 0.0)" if gen.glob == "grouped" else "fresh = tl.where(new[:, None], fk, 0.0)")
    s("cell = sh * NC + c",
      f"tl.store(ds_ptr + cell * F * DV + cf[:, None] * DV + cv_[None, :], {gen.dot('tl.trans(fresh)', 'vt')},"
      " mask=cmf[:, None] & cmv[None, :])")
    if gen.norm:
        s("tl.store(dz_ptr + cell * F + cf, _rsum(fresh, 0), mask=cmf & (cf * 0 + iv == 0))")
    s.level -= 1
    s("", "")


def chunk_outputs(gen: _Gen) -> None:
    s = gen.src
    s("@triton.jit",
      "def chunk_outputs(q_ptr, k_ptr, v_ptr, o_ptr, r0_ptr, npad_ptr, sp_ptr, zp_ptr, gk_ptr, gv_ptr, gk_out, gv_out,",
      "                  win_ptr, win_out, alpha_ptr, w_ptr, fp_ptr, scale, sqrt_scale, T, H, HKV, NC):")
    s.level += 1
    s('"""The outputs of chunk c of one query head from its prefix state S_c, z_c (see codegen_parallel)."""')
    gen.prologue("T", sums=False)
    s("c = tl.program_id(2)")
    gen.row_bounds()
    gen.load_sums("sp_ptr + (sh * NC + c) * F * DV", "zp_ptr + (sh * NC + c) * F")
    s("p = p0 + c * C")
    s("if c == 0:")
    s.level += 1
    gen.padding_queries()
    s.level -= 1
    gen.chunk_rows()
    s("if (c == 0) & (h % hg == 0):")
    s.level += 1
    gen.write_state(sums=False)
    s.level -= 2
    s("", "")
