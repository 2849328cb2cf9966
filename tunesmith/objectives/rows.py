"""What an objective's loss takes: one value per row of a batch (summed answer
log-probabilities, or a reward head's scores) with each row's answer-token count, and the
batch entries the training loop adds for objectives. The values are computed in
`tunesmith.train.logps`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_HEAD = "score"
"""The reward head's attribute on the model (transformers' sequence-classification name)."""
REFERENCE_LOGPS = "reference_logps"
"""The batch entry holding precomputed reference log-probabilities (one per row)."""
UNIT_FLAGS = "unit_flags"
"""The batch entry holding one flag per row (KTO: 1 for a desirable example)."""
TEACHER_IDS = "teacher_ids"
"""Distillation: the teacher's precomputed top-k token ids per answer token (rows of k)."""
TEACHER_LOGPS = "teacher_logps"
"""... and their log-probabilities (temperature 1)."""
ADVANTAGES = "advantages"
"""GRPO: each completion's advantage (one per row)."""
OLD_LOGPS = "old_logps"
"""GRPO: the generating policy's log-probability of each completion token (rows, seq - 1)."""
REFERENCE_TOKEN_LOGPS = "reference_token_logps"
"""GRPO: the reference's log-probability of each completion token (rows, seq - 1)."""
BATCH_ONLY = (
    REFERENCE_LOGPS,
    UNIT_FLAGS,
    TEACHER_IDS,
    TEACHER_LOGPS,
    ADVANTAGES,
    OLD_LOGPS,
    REFERENCE_TOKEN_LOGPS,
)
"""The batch entries an objective reads that are not model inputs."""


@dataclass
class Rows:
    """One value per row of a batch (summed answer log-probabilities, or scores) and each row's
    answer-token count. Units are consecutive rows: (chosen, rejected) pairs."""

    values: torch.Tensor
    counts: torch.Tensor

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values[0::2], self.values[1::2]

    def pair_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.counts[0::2], self.counts[1::2]


def pair_metrics(chosen_reward, rejected_reward, chosen_logps, rejected_logps) -> dict:
    """The pair metrics as {name: (sum, count)}: reward accuracy (ties count as wrong, as TRL
    counts them), margin, and the answers' summed log-probabilities."""
    c, r = chosen_reward.detach(), rejected_reward.detach()
    n = len(c)
    return {
        "reward_accuracy": ((c > r).float().sum(), n),
        "reward_margin": ((c - r).sum(), n),
        "logps_chosen": (chosen_logps.detach().sum(), n),
        "logps_rejected": (rejected_logps.detach().sum(), n),
    }
