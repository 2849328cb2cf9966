"""SimPO's loss and metrics (rewards: β × mean log-probability per answer token)."""

from __future__ import annotations

from tunesmith.objectives.losses import simpo_loss
from tunesmith.objectives.rows import Rows, pair_metrics


def loss(config, policy: Rows, reference: Rows | None = None, flags=None):
    chosen, rejected = policy.pairs()
    counts_chosen, counts_rejected = policy.pair_counts()
    per_pair = simpo_loss(
        chosen, rejected, counts_chosen, counts_rejected, beta=config.beta, gamma=config.gamma
    )
    rewards = (
        config.beta * chosen / counts_chosen.clamp(min=1),
        config.beta * rejected / counts_rejected.clamp(min=1),
    )
    return per_pair, pair_metrics(*rewards, chosen, rejected)
