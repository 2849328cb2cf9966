"""The causal-LM loss, as a sum and a count of trained tokens, so that any batching
(micro-batches, packing) can normalise by the trained tokens of the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.encode import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose target label is not -100, and the
    number of those positions. logits (batch, seq, vocab), labels (batch, seq); position t
    predicts labels[t + 1]. The sum is computed in fp32."""
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())
