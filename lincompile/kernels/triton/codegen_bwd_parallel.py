"""The chunk-parallel backward: `bwd_dq` and `bwd_dkv`'s walks over chunks split so every chunk of every head is
its own program (grid = (B * H, NC)), for the same scope (a causal prefill from the initial
state, every key real; chunk c starts at c * C). Not for decay, which keeps the walks.

  (the forward module's `chunk_sums`, from position 0 with no padding, gives each chunk's addition to S and z;
  the launcher turns them into the exclusive prefix S_c, z_c that chunk c's queries read)
  bwd_dq_chunks   per query head and chunk: the body of `bwd_dq`'s loop from S_c, z_c; also writes the chunk's
                  addition to the reverse state, g phi(Q_c)^T dnum_c and g sum phi(Q_c) dden_c ([B, H, NC, F, DV] /
                  [B, H, NC, F]), and its own partial of alpha's gradient ([B * H, NC]).
  bwd_dkv_chunks  per query head and chunk: the body of `bwd_dkv`'s loop from the reverse state of the chunks
                  after c, which the launcher sums over the KV head's query heads and later chunks, plus the
                  returned state's gradient ([B, HKV, NC, F, DV] / [B, HKV, NC, F]). Only the KV head's first
                  query head (lead == 0) reads it: dk and dv are summed over the query heads anyway, and are linear
                  in it. Tap gradients are written per chunk ([B * H, NC, KC]).
Hedgehog's parameter gradients take one slot per (query head, chunk): bwd_dq_chunks starts it, bwd_dkv_chunks
continues it, the launcher sums the slots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lincompile.kernels.triton.codegen_bwd import _BwdGen


def bwd_dq_chunks(gen: _BwdGen) -> None:
    s = gen.src
    s("@triton.jit",
      "def bwd_dq_chunks(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dnum_ptr, dden_ptr, dal_ptr, alpha_ptr, fp_ptr,",
      "                  gf_ptr, sp_ptr, zp_ptr, rs_ptr, rz_ptr, scale, sqrt_scale, T, H, HKV, NC):")
    s.level += 1
    s('"""One chunk of bwd_dq from its prefix state, and the chunk\'s addition to the reverse state."""')
    gen.prologue_bwd()
    s("c = tl.program_id(1)", "p = c * C")
    gen.load_sums("sp_ptr + (sh * NC + c) * F * DV", "zp_ptr + (sh * NC + c) * F")
    if gen.glob == "grouped":
        s("dal = tl.full([BC], 0.0, tl.float32)")
    gen.feature_accumulators(load=False, slot="hb * NC + c")
    gen.dq_chunk()
    if gen.glob != "none":
        s("cell = hb * NC + c",
          f"tl.store(rs_ptr + cell * F * DV + cf[:, None] * DV + cv_[None, :], {gen.state_gain} * "
          f"{gen.dot('tl.trans(fq)', 'dnum')}, mask=cmf[:, None] & cmv[None, :])")
        if gen.norm:
            s(f"tl.store(rz_ptr + cell * F + cf, {gen.state_gain} * _rsum(fq * dden[:, None], 0), mask=cmf)")
    if gen.glob == "grouped":
        s("tl.store(dal_ptr + hb * NC + c, _rsum(dal, 0))")
    gen.store_feature_grads()
    s.level -= 1
    s("", "")


def bwd_dkv_chunks(gen: _BwdGen) -> None:
    s = gen.src
    s("@triton.jit",
      "def bwd_dkv_chunks(q_ptr, k_ptr, v_ptr, do_ptr, dnum_ptr, dden_ptr, dk_ptr, dv_ptr, dw_ptr, alpha_ptr, w_ptr,",
      "                   fp_ptr, gf_ptr, gs_ptr, gz_ptr, ggk_ptr, ggv_ptr, gwin_ptr, scale, sqrt_scale, T, H, HKV,",
      "                   NC):")
    s.level += 1
    s('"""One chunk of bwd_dkv from the reverse state of the chunks after it (read by the lead query head)."""')
    gen.prologue_bwd()
    s("c = tl.program_id(1)",
      "p = c * C",
      "lead = h % (H // HKV)")
    if gen.glob != "none":
        s("firstf = cmf & (cf * 0 + lead == 0)",
          "dS = tl.load(gs_ptr + (sh * NC + c) * F * DV + cf[:, None] * DV + cv_[None, :],"
          " mask=firstf[:, None] & cmv[None, :], other=0.0)")
        if gen.norm:
            s("dz = tl.load(gz_ptr + (sh * NC + c) * F + cf, mask=firstf, other=0.0)")
    if gen.conv:
        s("lags = tl.arange(0, BL)", "dtap = tl.full([BL], 0.0, tl.float32)", "wrow = w_ptr + h * KC")
    gen.feature_accumulators(load=True, slot="hb * NC + c")
    gen.dkv_chunk()
    if gen.conv:
        s("tl.store(dw_ptr + (hb * NC + c) * KC + HALF - lags, dtap, mask=lags <= HALF)")
    gen.store_feature_grads()
    s.level -= 1
    s("", "")
