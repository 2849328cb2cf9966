"""GPTQ's checkpoint layout ("gptq" format, as AutoGPTQ, Optimum, transformers, vLLM and
TGI read it) for a group-quantized linear layer with `bits` per weight:

    qweight  int32 (⌈in·bits/32⌉, out)      codes, packed along the input dimension
    qzeros   int32 (groups, ⌈out·bits/32⌉)  zero points minus one, packed along the output
    scales   fp16  (groups, out)
    g_idx    int32 (in,)                    the group of each input column
    bias     (out,)                         when the layer has one

Packing is a little-endian bit stream in 32-bit words: value i occupies bits i·bits …
i·bits + bits − 1 of the stream, so 3-bit values straddle word boundaries exactly as AutoGPTQ
packs them. The weight is (q − (qzero + 1)) · scale for the column's group.
"""

from __future__ import annotations

import torch

from tunesmith.quantized.gptq.weights import QuantizedWeight


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in 0 … 2³² − 1 to int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` (n, m), each below 2**bits, along dim 0 into int32 words
    (⌈n·bits/32⌉, m)."""
    n, m = values.shape
    rows = -(-n * bits // 32)
    padded = torch.zeros(-(-n // 32) * 32, m, dtype=torch.int64, device=values.device)
    padded[:n] = values.to(torch.int64) & (2**bits - 1)
    chunks = padded.view(-1, 32, m)  # each 32 values fill exactly `bits` words
    words = torch.zeros(chunks.shape[0], bits + 1, m, dtype=torch.int64, device=values.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[:, word] |= (chunks[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= chunks[:, j] >> (32 - shift)
    return _to_int32(words[:, :bits].reshape(-1, m)[:rows])


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_rows`: (n, m) int64 values."""
    m = packed.shape[1]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    full = -(-n // 32) * bits
    if words.shape[0] < full:
        pad = torch.zeros(full - words.shape[0], m, dtype=torch.int64, device=packed.device)
        words = torch.cat([words, pad])
    words = words[:full].view(-1, bits, m)
    mask = 2**bits - 1
    values = torch.empty(words.shape[0], 32, m, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        value = words[:, word] >> shift
        if shift + bits > 32:
            value = value | (words[:, word + 1] << (32 - shift))
        values[:, j] = value & mask
    return values.view(-1, m)[:n]


def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The GPTQ-format tensors (without the module prefix) of a quantized weight."""
    return {
        "qweight": pack_rows(qw.q.T, qw.bits),
        "qzeros": pack_rows((qw.zeros - 1).to(torch.int64), qw.bits).T.contiguous(),
        "scales": qw.scales.T.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def packed_shapes(out_features: int, in_features: int, groups: int, bits: int) -> dict:
    """Shapes and dtypes of `pack_gptq`'s tensors, known before quantizing."""
    return {
        "qweight": ((-(-in_features * bits // 32), out_features), torch.int32),
        "qzeros": ((groups, -(-out_features * bits // 32)), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> QuantizedWeight:
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    q = unpack_rows(qweight, bits, in_features).T.to(torch.uint8)
    zeros = unpack_rows(qzeros.T, bits, out_features).T + 1
    return QuantizedWeight(
        q.contiguous(),
        scales.float().T.contiguous(),
        zeros.float().T.contiguous(),
        g_idx.long(),
        bits,
    )
