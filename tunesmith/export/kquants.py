"""llama.cpp's K-quant block formats, written in vectorised numpy (the `gguf` package reads
and dequantizes them but has no quantizer): Q4_K, Q5_K and Q6_K, as ggml's reference
quantizers (`quantize_row_q{4,5,6}_K_ref`, the path `llama-quantize` takes without an
importance matrix) compute them, and the per-tensor type mix of `llama-quantize`'s presets.

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

Rows that are not whole 256-value super-blocks fall back as `llama-quantize` does: Q4_K to
Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (those `gguf` quantizes), and to f16 when rows are not
whole 32-value blocks either.
"""

from __future__ import annotations

import re

import numpy as np

QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32

PRESETS = {
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}
"""`--outtype` preset: the type of the tensors no rule below picks another for."""
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
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


def _scale_min_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per group (rows of x, w): (scale, the min as a positive offset, levels 0..nmax) that
    minimise Σ w·(scale·L − min − x)² over nstep + 1 candidate scales (ggml's
    make_qkx2_quants without its mean-absolute variant)."""
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
    best = _seq_sum(w * diff * diff)
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
        mad = _seq_sum(w * diff * diff)
        better = ok & (mad < best) & ~flat
        levels = np.where(better[:, None], trial, levels)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    levels = np.where(flat[:, None], 0, levels)
    return scale.astype(F32), (-mn).astype(F32), levels


def _signed_scale_search(x, nmax: int):
    """Per group: (scale, levels 0..2·nmax−1) with x ≈ scale·(L − nmax), weights x², the best
    of 19 candidate scales around nmax/max|x| (ggml's make_qx_quants, rmse_type 1)."""
    absx = np.abs(x)
    at = absx.argmax(axis=1)  # the first of equal maxima, as ggml's strict >
    peak = x[np.arange(len(x)), at]
    amax = absx[np.arange(len(x)), at]
    zero = amax < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x

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


def _qk_scale_min(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K's common part on super-blocks x (nb, 256): the fp16 super-scales and the
    scale/min bytes, and each weight's level after re-quantizing against them."""
    nb = x.shape[0]
    blocks = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(blocks * blocks) / F32(32))
    weights = av_x[:, None] + np.abs(blocks)
    scales, mins, levels = _scale_min_search(blocks, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales).astype(np.uint8)).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins).astype(np.uint8)).astype(np.uint8)
    d16, d = _fp16(max_scale / F32(63))
    m16, dmin = _fp16(max_min / F32(63))
    block_d = (d[:, None] * ls.astype(F32)).reshape(nb * 8, 1)
    block_m = (dmin[:, None] * lm.astype(F32)).reshape(nb * 8, 1)
    live = block_d[:, 0] != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest((blocks + block_m) / np.where(live[:, None], block_d, 1)), 0, nmax)
    levels = np.where(live[:, None], again, levels).reshape(nb, 256).astype(np.uint8)
    head = np.concatenate(
        [
            d16.view(np.uint8).reshape(nb, 2),
            m16.view(np.uint8).reshape(nb, 2),
            _pack_scales(ls, lm),
        ],
        axis=1,
    )
    return head, levels


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of float32 weights (each a multiple of 256 long) as Q4_K bytes, 144 per 256."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    head, levels = _qk_scale_min(sb, 15, -1.0, 20)
    q = levels.reshape(-1, 4, 2, 32)  # per 64: low nibbles the first 32, high the next 32
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1).reshape(rows, -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Rows of float32 weights as Q5_K bytes, 176 per 256."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    head, levels = _qk_scale_min(sb, 31, -0.5, 15)
    q = levels.reshape(-1, 4, 2, 32)
    low = q & 0xF
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # bit 2n: first half of chunk n, bit 2n+1: second half
    shifts = (np.arange(4)[:, None] * 2 + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for n in range(4):
        for half in range(2):
            qh |= high[:, n, half, :] << shifts[n, half]
    return np.concatenate([head, qh, qs], axis=1).reshape(rows, -1)


# --- Q6_K -------------------------------------------------------------------------------------


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of float32 weights as Q6_K bytes, 210 per 256."""
    rows = x.shape[0]
    sb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    nb = sb.shape[0]
    blocks = sb.reshape(nb * 16, 16)
    scales, levels = _signed_scale_search(blocks, 32)
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


CHUNK_VALUES = 1 << 15
"""Weights quantized per numpy pass: small enough for the temporaries to stay in cache (about
1.8x faster than whole tensors on this CPU), large enough to amortise the passes."""


def _chunked(quantize):
    def run(x: np.ndarray) -> np.ndarray:
        rows = max(1, CHUNK_VALUES // max(x.shape[1], 1))
        parts = [quantize(x[at : at + rows]) for at in range(0, x.shape[0], rows)]
        return np.concatenate(parts, axis=0)

    run.__doc__ = quantize.__doc__
    return run


QUANTIZERS = {
    "q4_k": _chunked(quantize_q4_k),
    "q5_k": _chunked(quantize_q5_k),
    "q6_k": _chunked(quantize_q6_k),
}
"""Each K type's quantizer for a 2-D array (rows of whole super-blocks)."""


# --- which tensor gets which type ---------------------------------------------------------------


def use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's layers that get more bits in the _M presets: the first and last
    eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def preset_type(name: str, row_length: int, preset: str, layers: int, output_tied: bool) -> str:
    """The type `llama-quantize` gives GGUF tensor `name` (a matrix whose rows are
    `row_length` long) under `preset`: the output head (or, when it is tied, the token
    embeddings) in Q6_K; in the _M presets attn_v and ffn_down of `use_more_bits` layers in
    Q6_K; in Q4_K_S attn_v of the first 4 layers and ffn_down of the first eighth in Q5_K;
    the preset's type otherwise; then the fallbacks for rows that are not whole blocks."""
    kind = PRESETS[preset]
    match = re.match(r"blk\.(\d+)\.", name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (output_tied and name == "token_embd.weight"):
        kind = "q6_k"
    elif name.endswith("attn_v.weight"):
        if preset in ("q4_k_m", "q5_k_m") and use_more_bits(layer, layers):
            kind = "q6_k"
        elif preset == "q4_k_s" and layer < 4:
            kind = "q5_k"
    elif name.endswith("ffn_down.weight"):
        if preset in ("q4_k_m", "q5_k_m") and use_more_bits(layer, layers):
            kind = "q6_k"
        elif preset == "q4_k_s" and layer < layers // 8:
            kind = "q5_k"
    if row_length % QK_K:
        kind = FALLBACK[kind]
        if row_length % 32:
            kind = "f16"
    return kind
