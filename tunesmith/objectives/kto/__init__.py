"""KTO (objective `kto`, Ethayarajh et al. 2024): unpaired examples, each a good or a bad
answer, against a reference model. Each example is trained beside a mismatched one (its prompt
with the next example's answer) whose log-ratio estimates the KL term."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective


class KTOConfig(ObjectiveConfig):
    """KTO on unpaired examples labelled desirable or not."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference."""
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of a desirable example's loss (raise it when they are the fewer)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """Weight of an undesirable example's loss."""
    precompute_reference: bool = False
    """Compute the reference log-probabilities once before training, keep them with the data
    cache, and free the reference."""


KTO = register_objective(
    Objective(
        name="kto",
        config=KTOConfig,
        summary="KTO: unpaired good and bad examples, against a reference model.",
        formats=("unpaired",),
        implementation="tunesmith.objectives.kto.impl",
        group=2,
        reference=True,
        metrics=("kl", "reward_desirable", "reward_undesirable", "reward_margin"),
    )
)
