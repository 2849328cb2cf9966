"""Group-wise integer weight quantization: the grid every 4-/3-/8-bit method here shares.

A weight W (out × in) is split along its input dimension into groups of `group_size` columns
(-1: one group per row; the last group is shorter when `group_size` does not divide the width,
as in GPTQ's checkpoints). Each row of each group gets an asymmetric grid: scale = (max − min) /
(2^bits − 1) and an integer zero point, so q = clamp(round(w / scale) + zero, 0, 2^bits − 1) and
w ≈ (q − zero) · scale. Scales are rounded to fp16 (what checkpoints store) before any weight
is rounded, and zero points are kept in 1 … 2^bits − 1, because GPTQ's checkpoint format stores
zero − 1 (a group that would need zero 0 gets a slightly wider grid with zero 1).
Round-to-nearest (RTN) applies the grid directly; GPTQ and AWQ choose what to round so that the
layer's output, not its weights, stays close.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.errors import TunesmithError
from tunesmith.quantized.gptq.weights import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantGrid:
    bits: int = 4
    group_size: int = 128
    """Input columns per scale/zero; -1 for one per output row."""

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise TunesmithError(
                f"--bits: {self.bits} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise TunesmithError(
                f"--group-size: {self.group_size} must be -1 (per row) or a multiple of 8 (>= 8)"
            )

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def width(self, in_features: int) -> int:
        """Columns per group for a layer with `in_features` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def groups_of(self, in_features: int) -> int:
        """How many groups a row of `in_features` has (the last one may be shorter)."""
        return -(-in_features // self.width(in_features))

    def g_idx(self, in_features: int, device=None) -> torch.Tensor:
        """The group of each input column, in order."""
        return torch.arange(in_features, device=device) // self.width(in_features)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per row of `w` (rows × columns of one group), shape (rows,)."""
        low = w.min(dim=1).values.clamp(max=0)
        high = w.max(dim=1).values.clamp(min=0)
        scale = (high - low) / self.levels
        zero = torch.round(-low / scale)
        # zero 0 cannot be stored (checkpoints hold zero - 1): widen those grids to zero 1
        scale = torch.where(zero < 1, high / (self.levels - 1), scale)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.clamp(min=2.0**-20).half().float()  # exactly what checkpoints store
        zero = torch.round(-low / scale).clamp(1, self.levels)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of `w` (rows × k) for per-row `scale`, `zero` (rows,)."""
        return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, self.levels)

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (q - zero[:, None]) * scale[:, None]


def rtn_quantize(weight: torch.Tensor, grid: QuantGrid) -> QuantizedWeight:
    """Round-to-nearest on the group grid: the baseline."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = grid.groups_of(in_features)
    width = grid.width(in_features)
    q = torch.empty_like(w, dtype=torch.uint8)
    scales = torch.empty(out_features, groups, device=w.device)
    zeros = torch.empty(out_features, groups, device=w.device)
    for g in range(groups):
        part = w[:, g * width : (g + 1) * width]
        scale, zero = grid.params(part)
        q[:, g * width : (g + 1) * width] = grid.quantize(part, scale, zero).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedWeight(q, scales, zeros, grid.g_idx(in_features), grid.bits)
