"""KTO's loss and metrics. Units are (example, mismatched KL sample); `flags` holds 1 for a
desirable example, 0 for an undesirable one (on the example's row)."""

from __future__ import annotations

import torch

from tunesmith.objectives.losses import kto_loss
from tunesmith.objectives.rows import Rows


def loss(config, policy: Rows, reference: Rows | None, flags=None):
    logps, kl_logps = policy.pairs()
    ref_logps, ref_kl_logps = reference.pairs()
    desirable = flags[0::2].bool()
    per_example, kl = kto_loss(
        logps,
        ref_logps,
        desirable,
        kl_logps,
        ref_kl_logps,
        beta=config.beta,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
    )
    rewards = (config.beta * (logps - ref_logps)).detach()
    good = desirable.to(rewards.dtype)  # masks, not indexing: shapes stay static
    n = len(rewards)
    return per_example, {
        "kl": (kl * n, n),
        "reward_desirable": ((rewards * good).sum(), good.sum()),
        "reward_undesirable": ((rewards * (1 - good)).sum(), (1 - good).sum()),
        # desirable minus undesirable, per example: a mean over the batch's signed rewards
        "reward_margin": (torch.where(desirable, rewards, -rewards).sum(), n),
    }
