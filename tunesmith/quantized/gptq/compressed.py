"""compressed-tensors' "pack-quantized" layout (the format llm-compressor writes): transformers
loads it with the `compressed-tensors` package, vLLM with its W4A16/W8A16 kernels (CPU
included, where GPTQ's format needs symmetric weights). Per quantized linear:

    weight_packed      int32 (out, ⌈in/k⌉)        codes, k = 32 // bits per word, along the input
    weight_scale       (out, groups)              in the checkpoint's dtype
    weight_zero_point  int32 (⌈out/k⌉, groups)    zero points, packed along the output
    weight_shape       int64 (2,)                 [out, in]
    weight_g_idx       int32 (in,)                only when GPTQ ran in activation order

Values are stored offset by 2**(bits-1) (the format's signed codes made unsigned), which is
exactly tunesmith's unsigned codes and zero points; value j of a word sits in bits j·bits …
(j+1)·bits − 1 and no value straddles words (3 bits: 10 per word). The weight is
(code − zero point) · scale, the same arithmetic as GPTQ's format.
"""

from __future__ import annotations

import torch

from tunesmith.quantized.gptq.weights import QuantizedWeight

FORMAT = "pack-quantized"
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
"""The tensors a pack-quantized linear may have (the last two only for asymmetric weights and
activation order)."""


def compressed_config(method: str, bits: int, group_size: int, act_order: bool, ignore):
    """config.json's `quantization_config` for a model whose linears (except `ignore`) are
    group-quantized asymmetric integers."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "actorder": "group" if act_order else None,
        "dynamic": False,
        "observer": "minmax",
        "block_structure": None,
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "tunesmith": {"method": method},
    }


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `values` (rows, cols) into int32 words along dim 1, 32 // bits per word."""
    per = 32 // bits
    rows, cols = values.shape
    padded = torch.zeros(rows, -(-cols // per) * per, dtype=torch.int64, device=values.device)
    padded[:, :cols] = values.to(torch.int64)
    shifts = torch.arange(per, dtype=torch.int64, device=values.device) * bits
    words = (padded.view(rows, -1, per) << shifts).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    values = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(words.shape[0], -1)[:, :cols]


def pack_compressed(qw: QuantizedWeight, dtype: torch.dtype, act_order: bool) -> dict:
    """The pack-quantized tensors (without the module prefix) of a quantized weight."""
    out_features, in_features = qw.q.shape
    tensors = {
        "weight_packed": _pack(qw.q, qw.bits),
        "weight_scale": qw.scales.to(dtype).contiguous(),
        "weight_zero_point": _pack(qw.zeros.round().long().T, qw.bits).T.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if act_order:
        tensors["weight_g_idx"] = qw.g_idx.to(torch.int32)
    return tensors


def compressed_shapes(out_features, in_features, groups, bits, dtype, act_order) -> dict:
    """Shapes and dtypes of `pack_compressed`'s tensors, known before quantizing."""
    per = 32 // bits
    shapes = {
        "weight_packed": ((out_features, -(-in_features // per)), torch.int32),
        "weight_scale": ((out_features, groups), dtype),
        "weight_zero_point": ((-(-out_features // per), groups), torch.int32),
        "weight_shape": ((2,), torch.int64),
    }
    if act_order:
        shapes["weight_g_idx"] = ((in_features,), torch.int32)
    return shapes


def unpack_compressed(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None):
    """A QuantizedWeight from one module's pack-quantized tensors (symmetric checkpoints have
    no zero point: it is 2**(bits-1))."""
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"].float()
    if scales.dim() == 1:
        scales = scales[:, None]
    groups = scales.shape[1]
    q = _unpack(tensors["weight_packed"], bits, in_features).to(torch.uint8)
    if "weight_zero_point" in tensors:
        zeros = _unpack(tensors["weight_zero_point"].T, bits, out_features).T.float()
    else:
        zeros = torch.full((out_features, groups), float(2 ** (bits - 1)))
    if "weight_g_idx" in tensors:
        g_idx = tensors["weight_g_idx"].long()
    else:
        size = group_size or in_features
        g_idx = torch.arange(in_features) // size
    return QuantizedWeight(q.contiguous(), scales.contiguous(), zeros.contiguous(), g_idx, bits)
