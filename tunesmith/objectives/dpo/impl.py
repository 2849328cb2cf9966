"""DPO's loss and metrics from the policy's and the reference's log-probabilities."""

from __future__ import annotations

from tunesmith.objectives.losses import dpo_loss
from tunesmith.objectives.rows import Rows, pair_metrics


def loss(config, policy: Rows, reference: Rows | None, flags=None):
    chosen, rejected = policy.pairs()
    ref_chosen, ref_rejected = reference.pairs()
    counts_chosen, counts_rejected = policy.pair_counts()
    per_pair = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=config.beta,
        loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
        chosen_tokens=counts_chosen,
        rejected_tokens=counts_rejected,
    )
    rewards = config.beta * (chosen - ref_chosen), config.beta * (rejected - ref_rejected)
    return per_pair, pair_metrics(*rewards, chosen, rejected)
