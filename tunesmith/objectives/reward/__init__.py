"""A Bradley–Terry reward model (objective `reward`): a scalar head on the last token learns to
score the chosen answer above the rejected one. The result loads with transformers'
`AutoModelForSequenceClassification` (num_labels 1; plus PEFT for an adapter method), and
`tunesmith score` scores prompt/answer pairs with it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective


class RewardConfig(ObjectiveConfig):
    """A reward model trained on preference pairs."""

    name: Literal["reward"] = "reward"
    center_rewards: float = Field(0.0, ge=0)
    """Weight of a penalty on the squared mean reward (keeps scores near 0; TRL's
    center_rewards_coefficient, 0.01 in its docs). 0: off."""


REWARD = register_objective(
    Objective(
        name="reward",
        config=RewardConfig,
        summary="Reward model: a scalar score head trained on preference pairs.",
        formats=("preference",),
        implementation="tunesmith.objectives.reward.impl",
        group=2,
        output="score",
        metrics=("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"),
    )
)
