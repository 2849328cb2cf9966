"""llama.cpp's K-quant block formats, written in vectorised numpy (the `gguf` package reads
and dequantizes them but has no quantizer): Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, as ggml's
reference quantizers (`quantize_row_q{2,3,4,5,6}_K_ref`, the path `llama-quantize` takes
without an importance matrix) compute them, IQ4_NL (Q2_K's and Q3_K's fallback) as
`quantize_iq4_nl` does, and the per-tensor type mix of `llama-quantize`'s presets.

Q2_K splits a super-block into 16 blocks of 16 with a 4-bit scale and a 4-bit min each (the
same search as Q4_K's, on absolute error); Q3_K into 16 blocks of 16 with a signed 6-bit scale
each, its levels refined one weight at a time (`_q3_levels`: ggml's make_q3_quants).

A super-block is 256 weights. Q4_K and Q5_K split it into 8 blocks of 32, each with a 6-bit
scale and a 6-bit min found by a weighted least-squares search (`_scale_min_search`: ggml's
`make_qkx2_quants`), the 8 scales and mins quantized against two fp16 super-scales; Q6_K
splits it into 16 blocks of 16, each with a signed 8-bit scale found by a search over
candidate scales (`_signed_scale_search`: ggml's `make_qx_quants`, weights x²), against one
fp16 super-scale. Every sum runs in float32 in ggml's element order (one position at a time,
vectorised over all blocks), and rounding is ggml's round-half-to-even, so the bytes follow
the reference; a compiler that fuses multiply-adds (llama.cpp built with -march=native) can
round a sum differently in the last bit, which can move a weight by one step where two
candidates tie.

Rows that are not whole 256-value super-blocks fall back as `llama-quantize` does: Q2_K and
Q3_K to IQ4_NL, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (those `gguf` quantizes), and to
f16 when rows are not whole 32-value blocks either.
"""

from __future__ import annotations

import re

import numpy as np

QK_K = 256
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32

PRESETS = {
    "q2_k": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}
"""`--outtype` preset: the type of the tensors no rule below picks another for."""
FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
"""llama-quantize's type for rows that are not whole super-blocks."""


def _nearest(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even, as float32 arithmetic does."""
    return np.rint(values).astype(np.int32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis one element at a time (ggml's loop order), in float32:
    `np.add.accumulate` adds strictly in order, unlike `np.sum`'s pairwise reduction."""
    return np.add.accumulate(terms.astype(F32, copy=False), axis=-1)[..., -1]


def _fp16(values: np.ndarray) -> np.ndarray:
    """(the fp16 values, them back in float32): round to nearest even, as GGML_FP32_TO_FP16."""
    half = values.astype(np.float16)
    return half, half.astype(F32)


# --- the searches -----------------------------------------------------------------------------


def _scale_min_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad=False):
    """Per group (rows of x, w): (scale, the min as a positive offset, levels 0..nmax) that
    minimise Σ w·(scale·L − min − x)² (with `mad`: Σ w·|scale·L − min − x|) over nstep + 1
    candidate scales (ggml's make_qkx2_quants)."""

    def error(diff):
        return np.abs(diff) if mad else diff * diff

    n = x.shape[1]
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    flat = mx == mn
    span = np.where(flat, F32(1), mx - mn)
    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    levels = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * levels.astype(F32) + mn[:, None] - x
    best = _seq_sum(w * error(diff))
    for step in range(nstep + 1):
        # ggml divides by max − min with the min of the best candidate so far
        span = np.where(flat, F32(1), mx - mn)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        trial = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = trial.astype(F32)
        sum_l = _seq_sum(w * lf)
        sum_l2 = _seq_sum(w * lf * lf)
        sum_xl = _seq_sum(w * lf * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        cur = _seq_sum(w * error(diff))
        better = ok & (cur < best) & ~flat
        levels = np.where(better[:, None], trial, levels)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    levels = np.where(flat[:, None], 0, levels)
    return scale.astype(F32), (-mn).astype(F32), levels


def _signed_scale_search(x, nmax: int, w=None):
    """Per group: (scale, levels 0..2·nmax−1) with x ≈ scale·(L − nmax), weights `w` (x² when
    None), the best of 19 candidate scales around nmax/max|x| (ggml's make_qx_quants,
    rmse_type 1)."""
    absx = np.abs(x)
    at = absx.argmax(axis=1)  # the first of equal maxima, as ggml's strict >
    peak = x[np.arange(len(x)), at]
    amax = absx[np.arange(len(x)), at]
    zero = amax < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x if w is None else w

    def trial(iscale):
        levels = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = levels.astype(F32)
        return levels, _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    iscale = F32(-nmax) / peak
    levels, sumlx, suml2 = trial(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
        cand, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = np.where(better, sumlx / suml2, scale).astype(F32)
        levels = np.where(better[:, None], cand, levels)
        scale = new_scale
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale.astype(F32), levels


# --- with an importance matrix (llama-quantize --imatrix) --------------------------------------
#
# ggml's quantize_<type>(..., quant_weights) paths: each weight's importance is its column's
# mean squared activation (`imatrix.py`), times sqrt(σ² + x²) for the types that scale by it;
# block scales and mins are then fitted to the blocks by `_qp_search` (make_qp_quants).


def _qp_search(x: np.ndarray, nmax: int, w: np.ndarray):
    """Per row of non-negative values x (a super-block's block scales or mins): (scale, levels
    0..nmax) minimising Σ w·(x − scale·L)² (ggml's make_qp_quants: 9 candidate scales, then up
    to 5 passes moving one level at a time)."""
    top = np.maximum(x.max(axis=1), F32(0))
    zero = top == 0
    top = np.where(zero, F32(1), top)
    iscale = F32(nmax) / top
    levels = _nearest(iscale[:, None] * x)
    scale = F32(1) / iscale
    diff = x - scale[:, None] * levels.astype(F32)
    best = _seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial_i = (F32(0.1) * F32(step) + F32(nmax)) / top
        trial_l = np.minimum(nmax, _nearest(trial_i[:, None] * x))
        diff = x - (F32(1) / trial_i)[:, None] * trial_l.astype(F32)
        mse = _seq_sum(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial_i, iscale)
    levels = np.minimum(nmax, _nearest(iscale[:, None] * x))
    lf = levels.astype(F32)
    sumlx = _seq_sum(w * x * lf)
    suml2 = _seq_sum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], levels[:, i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            move = (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.minimum(nmax, _nearest(np.where(move, xi * sl2 / slx, 0)))
            move &= new != levels[:, i]
            nf = new.astype(F32)
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take = move & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = np.where(take, new, levels[:, i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero, F32(0), sumlx / suml2).astype(F32)
    return scale, np.where(zero[:, None], 0, levels)


def _importance_weights(sb: np.ndarray, qw: np.ndarray, group: int, double: bool) -> np.ndarray:
    """qw · sqrt(σ² + x²) per weight, σ² = (2·)Σx²/256 per super-block, grouped by `group`."""
    sum_x2 = _seq_sum(sb * sb)
    sigma2 = (F32(2) * sum_x2 if double else sum_x2) / F32(QK_K)
    weights = qw * np.sqrt(sigma2[:, None] + sb * sb)
    return weights.reshape(-1, group)


def _tile(importance: np.ndarray, rows: int) -> np.ndarray:
    """The per-column importance as one row per super-block of `rows` rows."""
    return np.tile(np.asarray(importance, dtype=F32).reshape(-1, QK_K), (rows, 1))


# --- the shared steps ---------------------------------------------------------------------------


def _requantize(blocks, levels, scale_codes, min_codes, d, dmin, nmax: int) -> np.ndarray:
    """Each weight's level against the stored block scale d·code and min dmin·code (ggml's
    second pass); a block whose stored scale is 0 keeps the search's levels."""
    n = blocks.shape[0]
    block_d = (d[:, None] * scale_codes.astype(F32)).reshape(n, 1)
    block_m = (dmin[:, None] * min_codes.astype(F32)).reshape(n, 1)
    live = block_d[:, 0] != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest((blocks + block_m) / np.where(live[:, None], block_d, 1)), 0, nmax)
    return np.where(live[:, None], again, levels)


def _super_scales(values: np.ndarray, top: int):
    """(codes 0..top, the super-scale) of non-negative block scales or mins by their maximum
    (the reference path); all-zero rows get code 0 and scale 0."""
    peak = np.maximum(values.max(axis=1), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where((peak > 0)[:, None], _nearest((F32(top) / peak)[:, None] * values), 0)
    return codes, np.where(peak > 0, peak / F32(top), F32(0)).astype(F32)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) levels 0..3 as 64 bytes: per 128, byte l holds l, l+32, l+64, l+96."""
    q = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# --- Q4_K and Q5_K ----------------------------------------------------------------------------


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (ggml's K_SCALE layout)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _qk_scale_min(sb: np.ndarray, nmax: int, rmin: float, nstep: int, importance, rows: int):
    """Q4_K/Q5_K's common part on super-blocks sb (nb, 256): the head (fp16 super-scales, the
    scale/min bytes) and each weight's level re-quantized against them. Without importance:
    quantize_row_q{4,5}_K_ref (weights av|x| + |x|, scales by their maximum); with it:
    quantize_row_q{4,5}_K_impl (weights importance·sqrt(σ² + x²), 37 candidate scales,
    scales and mins fitted by make_qp_quants)."""
    nb = sb.shape[0]
    blocks = sb.reshape(nb * 8, 32)
    if importance is None:
        av_x = np.sqrt(_seq_sum(blocks * blocks) / F32(32))
        weights = av_x[:, None] + np.abs(blocks)
        scales, mins, levels = _scale_min_search(blocks, weights, nmax, rmin, 0.1, nstep)
        ls, d_value = _super_scales(scales.reshape(nb, 8), 63)
        lm, m_value = _super_scales(mins.reshape(nb, 8), 63)
    else:
        weights = _importance_weights(sb, _tile(importance, rows), 32, True)
        scales, mins, levels = _scale_min_search(blocks, weights, nmax, -0.9, 0.05, 36)
        sw = _seq_sum(weights).reshape(nb, 8)
        d_value, ls = _qp_search(scales.reshape(nb, 8), 63, sw)
        m_value, lm = _qp_search(mins.reshape(nb, 8), 63, sw)
    ls, lm = np.minimum(63, ls).astype(np.uint8), np.minimum(63, lm).astype(np.uint8)
    d16, d = _fp16(d_value)
    m16, dmin = _fp16(m_value)
    levels = _requantize(blocks, levels, ls, lm, d, dmin, nmax).reshape(nb, 256).astype(np.uint8)
    head = [d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2)]
    return np.concatenate([*head, _pack_scales(ls, lm)], axis=1), levels


def quantize_q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights (each a multiple of 256 long) as Q4_K bytes, 144 per 256;
    `importance`: one weight per column (llama-quantize --imatrix)."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    head, levels = _qk_scale_min(sb, 15, -1.0, 20, importance, rows)
    q = levels.reshape(-1, 4, 2, 32)  # per 64: low nibbles the first 32, high the next 32
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1).reshape(rows, -1)


def quantize_q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights as Q5_K bytes, 176 per 256."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    head, levels = _qk_scale_min(sb, 31, -0.5, 15, importance, rows)
    q = levels.reshape(-1, 4, 2, 32)
    low = q & 0xF
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # bit 2n: first half of chunk n, bit 2n+1: second half
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for n in range(4):
        for half in range(2):
            qh |= high[:, n, half, :] << np.uint8(2 * n + half)
    return np.concatenate([head, qh, qs], axis=1).reshape(rows, -1)


# --- Q6_K -------------------------------------------------------------------------------------


def quantize_q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights as Q6_K bytes, 210 per 256: 16 blocks of 16 with a signed 8-bit
    scale each, against one fp16 super-scale. With `importance`, the block search is weighted
    by it alone (quantize_row_q6_K_impl), not by x²."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    nb = sb.shape[0]
    blocks = sb.reshape(nb * 16, 16)
    w = None if importance is None else _tile(importance, rows).reshape(-1, 16)
    scales, levels = _signed_scale_search(blocks, 32, w)
    scales = scales.reshape(nb, 16)
    levels = levels.reshape(nb, 256)
    absolute = np.abs(scales)
    at = absolute.argmax(axis=1)
    max_scale = scales[np.arange(nb), at]
    zero = absolute[np.arange(nb), at] < GROUP_MAX_EPS
    max_scale = np.where(zero, F32(1), max_scale)
    iscale = F32(-128) / max_scale
    d16, d = _fp16(F32(1) / iscale)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    block_d = (d[:, None] * sc.astype(F32)).reshape(nb * 16, 1)
    live = block_d[:, 0] != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest(blocks / np.where(live[:, None], block_d, 1)), -32, 31) + 32
    levels = np.where(live[:, None], again, levels.reshape(nb * 16, 16)).reshape(nb, 256)
    levels = levels.astype(np.uint8)
    q = levels.reshape(nb, 2, 4, 32)  # per 128: four runs of 32
    ql = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)  # fmt: skip
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out.reshape(rows, -1)


# --- Q2_K and Q3_K ----------------------------------------------------------------------------


def quantize_q2_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights as Q2_K bytes, 84 per 256: 16 blocks of 16 with a 4-bit scale
    and a 4-bit min each. Without importance: quantize_row_q2_K_ref (make_qkx2_quants on
    |error|, scales by their maximum); with it: quantize_row_q2_K_impl (make_qkx3_quants with
    importance·sqrt(σ² + x²), σ² = Σx²/256, scales and mins by make_qp_quants)."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    nb = sb.shape[0]
    blocks = sb.reshape(nb * 16, 16)
    if importance is None:
        scales, mins, levels = _scale_min_search(blocks, np.abs(blocks), 3, -0.5, 0.1, 15, True)
        ls, d_value = _super_scales(scales.reshape(nb, 16), 15)
        lm, m_value = _super_scales(mins.reshape(nb, 16), 15)
    else:
        weights = _importance_weights(sb, _tile(importance, rows), 16, False)
        scales, mins, levels = _scale_min_search(blocks, weights, 3, -0.9, 0.05, 36)
        sw = _seq_sum(weights).reshape(nb, 16)
        d_value, ls = _qp_search(scales.reshape(nb, 16), 15, sw)
        m_value, lm = _qp_search(mins.reshape(nb, 16), 15, sw)
    # as ggml's byte arithmetic: the scale's byte, the min's shifted into the high nibble
    packed = ls.astype(np.uint8) | (lm.astype(np.int32) << 4).astype(np.uint8)
    d16, d = _fp16(d_value)
    m16, dmin = _fp16(m_value)
    levels = _requantize(blocks, levels, packed & 0xF, packed >> 4, d, dmin, 3).reshape(nb, 256)
    tail = [d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2)]
    return np.concatenate([packed, _pack_2bit(levels), *tail], axis=1).reshape(rows, -1)


def _q3_levels(x: np.ndarray, nmax: int = 4):
    """Per group of 16: (scale, levels 0..2·nmax−1) by ggml's make_q3_quants with its rmse
    refinement: start at nmax/max|x|, then up to 5 passes that move one weight at a time to
    the level that raises (Σ w·x·L)² / Σ w·L² (weights x²), in ggml's element order."""
    absx = np.abs(x)
    at = absx.argmax(axis=1)
    peak = x[np.arange(len(x)), at]
    zero = absx[np.arange(len(x)), at] < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    iscale = F32(-nmax) / peak
    levels = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    lf = levels.astype(F32)
    sumlx = _seq_sum(w * x * lf)
    suml2 = _seq_sum(w * lf * lf)
    for _ in range(5):  # a pass that changes nothing changes nothing on a repeat: no early stop
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], levels[:, i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            move = slx > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(_nearest(np.where(move, xi * sl2 / slx, 0)), -nmax, nmax - 1)
            move &= new != levels[:, i]
            nf = new.astype(F32)
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take = move & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = np.where(take, new, levels[:, i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero, F32(0), sumlx / suml2).astype(F32)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale, levels


def quantize_q3_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights as Q3_K bytes, 110 per 256: 16 blocks of 16 with a signed
    6-bit scale each, 3-bit levels as 2 low bits and a high-bit mask. Without importance:
    quantize_row_q3_K_ref (make_q3_quants, scales by their largest magnitude); with it:
    quantize_row_q3_K_impl (make_qx_quants with importance·sqrt(σ² + x²), the scales fitted
    by make_qx_quants weighted by each block's total weight)."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    nb = sb.shape[0]
    blocks = sb.reshape(nb * 16, 16)
    if importance is not None:
        weights = _importance_weights(sb, _tile(importance, rows), 16, True)
        scales, levels = _signed_scale_search(blocks, 4, weights)
        sw = _seq_sum(weights).reshape(nb, 16)
        d_block, ls = _signed_scale_search(scales.reshape(nb, 16), 32, sw)
        return _q3_pack(blocks, levels, ls.astype(np.uint8), d_block, rows)
    scales, levels = _q3_levels(blocks)
    scales = scales.reshape(nb, 16)
    absolute = np.abs(scales)
    at = absolute.argmax(axis=1)
    max_scale = scales[np.arange(nb), at]
    live_sb = absolute[np.arange(nb), at] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(live_sb, F32(-32) / np.where(live_sb, max_scale, 1), F32(0))
    ls = np.where(live_sb[:, None], np.clip(_nearest(iscale[:, None] * scales), -32, 31) + 32, 0)
    with np.errstate(divide="ignore"):
        d_block = np.where(live_sb, F32(1) / np.where(live_sb, iscale, 1), F32(0))
    return _q3_pack(blocks, levels, ls.astype(np.uint8), d_block, rows)


def _q3_pack(blocks, levels, ls, d_block, rows: int) -> np.ndarray:
    """Q3_K bytes from the 6-bit scale codes `ls` (0..63, 32 = zero) and super-scale: levels
    re-quantized against the stored scales, split into a high-bit mask and 2 low bits."""
    nb = ls.shape[0]
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = ls >> 4
    for j in range(16):
        packed[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
    d16, d = _fp16(d_block.astype(F32))
    sc = ls.astype(np.int32) - 32
    block_d = (d[:, None] * sc.astype(F32)).reshape(nb * 16, 1)
    live = block_d[:, 0] != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest(blocks / np.where(live[:, None], block_d, 1)), -4, 3) + 4
    levels = np.where(live[:, None], again, levels).reshape(nb, 256)
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for bit in range(8):  # weight j's high bit: byte j % 32, bit j // 32
        hmask |= ((levels[:, 32 * bit : 32 * bit + 32] > 3).astype(np.uint8)) << bit
    low = np.where(levels > 3, levels - 4, levels)
    out = [hmask, _pack_2bit(low), packed, d16.view(np.uint8).reshape(nb, 2)]
    return np.concatenate(out, axis=1).reshape(rows, -1)


# --- IQ4_NL (the fallback of Q2_K and Q3_K rows that are not whole super-blocks) ---------------

IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


def _best_index(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8: the nearest of the sorted `values` (the upper on a tie)."""
    table = values.astype(F32)
    upper = np.clip(np.searchsorted(table, x, side="right"), 1, len(table) - 1)
    lower = upper - 1
    pick = np.where(x - table[lower] < table[upper] - x, lower, upper)
    pick = np.where(x <= table[0], 0, pick)
    return np.where(x >= table[-1], len(table) - 1, pick)


def quantize_iq4_nl(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 weights (multiples of 32) as IQ4_NL bytes, 18 per 32: one fp16 scale and
    4-bit indexes into a non-linear table (ggml's quantize_iq4_nl; with `importance`, one per
    column, the search weights are importance · sqrt(σ² + x²))."""
    rows = x.shape[0]
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)
    values = IQ4_NL_VALUES.astype(F32)
    if importance is None:
        w = blocks * blocks
    else:
        qw = np.tile(np.asarray(importance, dtype=F32).reshape(-1, 32), (rows, 1))
        sigma2 = F32(2) * _seq_sum(blocks * blocks) / F32(32)
        w = qw * np.sqrt(sigma2[:, None] + blocks * blocks)
    absx = np.abs(blocks)
    at = absx.argmax(axis=1)
    peak = blocks[np.arange(len(blocks)), at]
    zero = absx[np.arange(len(blocks)), at] < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)

    def sums(inverse):
        q = values[_best_index(IQ4_NL_VALUES, inverse[:, None] * blocks)]
        return _seq_sum(w * q * blocks), _seq_sum(w * q * q)

    d = -peak / values[0]
    sumqx, sumq2 = sums(F32(1) / d)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = sumqx / sumq2
    best = d * sumqx
    for step in range(-7, 8):
        sumqx, sumq2 = sums((F32(step) + values[0]) / peak)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(better, sumqx / sumq2, d).astype(F32)
        best = np.where(better, d * sumqx, best)
    d = np.where(zero, F32(0), d).astype(F32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, F32(1) / np.where(d != 0, d, 1), F32(0))
    index = _best_index(IQ4_NL_VALUES, inverse[:, None] * blocks).astype(np.uint8)
    qs = index[:, :16] | (index[:, 16:] << 4)
    d16 = d.astype(np.float16)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(rows, -1)


CHUNK_VALUES = 1 << 15
"""Weights quantized per numpy pass: small enough for the temporaries to stay in cache (about
1.8x faster than whole tensors on this CPU), large enough to amortise the passes."""


def _chunked(quantize):
    def run(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        rows = max(1, CHUNK_VALUES // max(x.shape[1], 1))
        parts = [quantize(x[at : at + rows], importance) for at in range(0, x.shape[0], rows)]
        return np.concatenate(parts, axis=0)

    run.__doc__ = quantize.__doc__
    return run


QUANTIZERS = {
    "q2_k": _chunked(quantize_q2_k),
    "q3_k": _chunked(quantize_q3_k),
    "q4_k": _chunked(quantize_q4_k),
    "q5_k": _chunked(quantize_q5_k),
    "q6_k": _chunked(quantize_q6_k),
    "iq4_nl": _chunked(quantize_iq4_nl),
}
"""Each type's quantizer for a 2-D array (rows of whole blocks), with an optional importance
matrix (one weight per column) as llama-quantize --imatrix passes it."""


# --- which tensor gets which type ---------------------------------------------------------------


def use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's layers that get more bits in the _M presets: the first and last
    eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def preset_type(
    name: str, row_length: int, preset: str, layers: int, output_tied: bool, gqa: int = 1
) -> str:
    """The type `llama-quantize` gives GGUF tensor `name` (a matrix whose rows are
    `row_length` long) under `preset`, for a model of `layers` blocks whose query heads share
    each key/value head `gqa` ways (llama.cpp's llama_tensor_get_type, dense models):

    - the output head (or, when it is tied, the token embeddings): Q6_K;
    - attn_v: Q2_K → Q4_K with gqa ≥ 4, else Q3_K; Q3_K_M → Q5_K in the first 2 layers, else
      Q4_K; Q3_K_L → Q5_K; Q4_K_M, Q5_K_M → Q6_K in `use_more_bits` layers; Q4_K_S → Q5_K in
      the first 4; and a 70B model (80 layers) lifts Q3_K/Q4_K attn_v to Q5_K;
    - ffn_down: Q2_K → Q3_K; Q3_K_M → Q5_K in the first sixteenth, else Q4_K; Q3_K_L → Q5_K;
      Q4_K_M, Q5_K_M → Q6_K in `use_more_bits` layers; Q4_K_S → Q5_K in the first eighth;
    - attn_output: Q2_K → Q3_K; Q3_K_M → Q4_K; Q3_K_L → Q5_K;
    - the preset's type otherwise; then the fallbacks for rows that are not whole
      super-blocks (`FALLBACK`), and f16 for rows that are not whole 32-value blocks."""
    kind = PRESETS[preset]
    match = re.match(r"blk\.(\d+)\.", name)
    layer = int(match.group(1)) if match else -1
    more = preset in ("q4_k_m", "q5_k_m") and use_more_bits(layer, layers)
    if name == "output.weight" or (output_tied and name == "token_embd.weight"):
        kind = "q6_k"
    elif name.endswith("attn_v.weight"):
        if preset == "q2_k":
            kind = "q4_k" if gqa >= 4 else "q3_k"
        elif preset == "q3_k_m":
            kind = "q5_k" if layer < 2 else "q4_k"
        elif preset == "q3_k_l":
            kind = "q5_k"
        elif more:
            kind = "q6_k"
        elif preset == "q4_k_s" and layer < 4:
            kind = "q5_k"
        if layers == 80 and kind in ("q3_k", "q4_k"):  # llama.cpp's LLM_TYPE_70B
            kind = "q5_k"
    elif name.endswith("ffn_down.weight"):
        if preset == "q2_k":
            kind = "q3_k"
        elif preset == "q3_k_m":
            kind = "q5_k" if layer < layers // 16 else "q4_k"
        elif preset == "q3_k_l":
            kind = "q5_k"
        elif more:
            kind = "q6_k"
        elif preset == "q4_k_s" and layer < layers // 8:
            kind = "q5_k"
    elif name.endswith("attn_output.weight"):
        kind = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(preset, kind)
    if row_length % QK_K:
        kind = FALLBACK[kind]
        if row_length % 32:
            kind = "f16"
    return kind
