"""GRPO's advantages and loss.

Advantages: within each group of `num_generations` completions of one prompt,
A = (r − mean(group)) / (std + 1e-4) (`scale_rewards: group`), with the std of the whole batch
(`batch`), or A = r − mean(group) (`none`). The std is the unbiased one, as TRL computes it.

Per completion token, with ρ = exp(log π − log π_old) (π_old: the policy that generated the
sample; the same weights on the first pass, so ρ = 1 there and the gradient is A·∇log π):

    ℓ = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·(exp(r) − r − 1),  r = log π_ref − log π

(the KL term is the k3 estimator, as TRL's). `loss_type` says how token losses make the step's
loss: `grpo` averages each completion's tokens, then the completions; `dr_grpo` sums and
divides by completions × max_completion_tokens; `dapo` sums and divides by the step's tokens.
The loop divides a step's summed losses by its units, so the loss module
(`train.objective.GRPOLoss`) returns the sum and `units` the divisor's share of each
micro-batch: the step's loss is that of one big batch."""

from __future__ import annotations

import numpy as np
import torch


def advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """Each completion's advantage from its total reward; `rewards` holds whole groups in
    order (prompt 0's `group` completions, then prompt 1's, ...)."""
    grouped = rewards.reshape(-1, group)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        std = grouped.std(axis=1, ddof=1, keepdims=True)
        centred = centred / (std + 1e-4)
    elif scale == "batch":
        std = rewards.std(ddof=1) if rewards.size > 1 else 0.0
        centred = centred / (std + 1e-4)
    return centred.reshape(-1)


def token_losses(logps, old_logps, ref_logps, adv, config):
    """(per-token loss, clipped flags, KL per token or None): all flat over the completion
    tokens; `adv` is each token's completion's advantage."""
    ratio = torch.exp(logps - old_logps)
    low, high = 1 - config.epsilon, 1 + (config.epsilon_high or config.epsilon)
    clipped_ratio = ratio.clamp(low, high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if config.beta:
            loss = loss + config.beta * kl
    return loss, clipped, kl


def reduce(loss: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, loss_type: str):
    """A micro-batch's summed loss for `loss_type` (before the loop's division by units)."""
    if loss_type == "grpo":
        per_row = torch.zeros(len(lengths), dtype=loss.dtype, device=loss.device)
        per_row = per_row.index_add(0, rows, loss)
        return (per_row / lengths.clamp(min=1)).sum()
    return loss.sum()


def grpo_loss(logps, old_logps, ref_logps, adv_rows, rows, lengths, config):
    """The summed loss and the metrics of a micro-batch from flat per-token log-probabilities,
    each token's row (`rows`), each row's completion length and advantage."""
    adv = adv_rows[rows].to(logps.dtype)
    loss, clipped, kl = token_losses(logps, old_logps, ref_logps, adv, config)
    n = len(logps)
    metrics = {"clip_ratio": (clipped.float().sum().detach(), n)}
    if kl is not None:
        metrics["kl"] = (kl.detach().sum(), n)
    return reduce(loss, rows, lengths, config.loss_type), metrics
