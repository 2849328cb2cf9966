"""A linear layer that holds GPTQ-format packed weights (see `pack.py`) and computes with the
dequantized weight. Any device: the weight is unpacked in torch for each forward, so it runs on
CPU (and on GPUs without GPTQ kernels) at the cost of one dequantization per call."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.quantized.gptq.packing import packed_shapes, unpack_gptq
from tunesmith.quantized.gptq.weights import QuantizedWeight


class GPTQLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        groups: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for name, (shape, tensor_dtype) in packed_shapes(
            out_features, in_features, groups, bits
        ).items():
            self.register_buffer(name, torch.zeros(shape, dtype=tensor_dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), False)
            if bias
            else None
        )

    def unpacked(self) -> QuantizedWeight:
        return unpack_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight this layer computes with."""
        return self.unpacked().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
