"""A quantized weight as GPTQ's checkpoint format describes it (integer codes, per-group scales
and zero points, the group of each input column)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A quantized (out × in) weight: integer codes `q` (uint8, one per weight), per-group
    `scales` and `zeros` (out × groups), and `g_idx` (in,): the group of each input column
    (not monotone when GPTQ quantized in activation order)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        scales = self.scales[:, self.g_idx]
        zeros = self.zeros[:, self.g_idx]
        return (self.q.float() - zeros) * scales
