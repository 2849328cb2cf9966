"""GPTQ (Frantar et al. 2023) for one linear layer, in torch.

Given calibration inputs X of a layer (n × in), GPTQ minimises ‖X Wᵀ − X Ŵᵀ‖² column by
column: it quantizes one input column of W, then spreads that column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian H⁻¹ (H = 2 XᵀX / n), so later columns
compensate. H⁻¹ is used through the upper Cholesky factor of H⁻¹ (numerically stable), updates
are applied lazily in blocks of 128 columns, `damp` (a fraction of the mean diagonal of H) is
added to the diagonal, and with `act_order` the columns are processed from the largest Hessian
diagonal (most active input) down. Group scales/zeros are chosen when a group's first column is
reached, from the weights as updated so far.
"""

from __future__ import annotations

import torch

from tunesmith.quantize.rtn import QuantGrid
from tunesmith.quantized.gptq.weights import QuantizedWeight


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over calibration rows, accumulated batch by batch (fp32)."""

    def __init__(self, in_features: int, device=None) -> None:
        self.h = torch.zeros(in_features, in_features, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.h *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.h += x.T @ x


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize `weight` (out × in) with GPTQ for the input statistics `hessian` (in × in)."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    out_features, in_features = w.shape
    groups = grid.groups_of(in_features)
    width = grid.width(in_features)
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = (
        torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    )
    w = w[:, order]
    h = h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    position = torch.argsort(order)  # where each original column sits in processing order
    q = torch.zeros_like(w)
    scales = torch.zeros(out_features, groups, device=w.device)
    zeros = torch.zeros(out_features, groups, device=w.device)
    ready = torch.zeros(groups, dtype=torch.bool)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            group = int(order[start + i]) // width
            if not ready[group]:
                # the group's grid, from its columns' current (error-updated) values
                members = position[group * width : (group + 1) * width]
                current = w[:, members]
                inside = (members >= start) & (members < end)
                current[:, inside] = block[:, members[inside] - start]
                scales[:, group], zeros[:, group] = grid.params(current)
                ready[group] = True
            scale, zero = scales[:, group], zeros[:, group]
            value = block[:, i : i + 1]
            codes = grid.quantize(value, scale, zero)
            q[:, start + i] = codes[:, 0]
            error = (value[:, 0] - grid.dequantize(codes, scale, zero)[:, 0]) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ h_inv[start:end, end:]
    g_idx = grid.g_idx(in_features, w.device)
    return QuantizedWeight(q[:, position].to(torch.uint8), scales, zeros, g_idx, grid.bits)
