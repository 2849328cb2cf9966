"""The Bradley–Terry loss of a reward model's scores, with the optional centring penalty."""

from __future__ import annotations

from tunesmith.objectives.losses import reward_loss
from tunesmith.objectives.rows import Rows


def loss(config, policy: Rows, reference: Rows | None = None, flags=None):
    chosen, rejected = policy.pairs()
    per_pair = reward_loss(chosen, rejected)
    if config.center_rewards:
        per_pair = per_pair + config.center_rewards * (chosen + rejected) ** 2
    c, r = chosen.detach(), rejected.detach()
    n = len(c)
    return per_pair, {
        "reward_accuracy": ((c > r).float().sum(), n),
        "reward_margin": ((c - r).sum(), n),
        "reward_chosen": (c.sum(), n),
        "reward_rejected": (r.sum(), n),
    }
