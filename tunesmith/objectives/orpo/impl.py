"""ORPO's loss and metrics (rewards: β × mean log-probability per answer token, as TRL
reports them; `nll`: the supervised term)."""

from __future__ import annotations

from tunesmith.objectives.losses import orpo_loss
from tunesmith.objectives.rows import Rows, pair_metrics


def loss(config, policy: Rows, reference: Rows | None = None, flags=None):
    chosen, rejected = policy.pairs()
    counts_chosen, counts_rejected = policy.pair_counts()
    per_pair = orpo_loss(chosen, rejected, counts_chosen, counts_rejected, beta=config.beta)
    mean_chosen = chosen / counts_chosen.clamp(min=1)
    rewards = config.beta * mean_chosen, config.beta * rejected / counts_rejected.clamp(min=1)
    metrics = pair_metrics(*rewards, chosen, rejected)
    metrics["nll"] = (-mean_chosen.detach().sum(), len(chosen))
    return per_pair, metrics
