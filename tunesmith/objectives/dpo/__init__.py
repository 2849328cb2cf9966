"""Direct preference optimisation (objective `dpo`, Rafailov et al. 2023), with the IPO and
hinge variants: the policy's log-ratio to a reference on the chosen answer against the rejected
one. The reference is the base with the adapter switched off (no second copy), a frozen copy
for full fine-tuning, or log-probabilities computed once before training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective

PAIR_METRICS = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


class DPOConfig(ObjectiveConfig):
    """DPO on preference pairs."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference (the KL weight): lower lets the policy move
    further from it."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid: DPO's logistic loss; ipo: IPO's squared loss on per-token log-ratios; hinge:
    SLiC's hinge loss."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """The share of pairs assumed mislabelled (conservative DPO); sigmoid only."""
    precompute_reference: bool = False
    """Compute the reference log-probabilities of every pair once before training, keep them
    with the data cache, and free the reference (full fine-tuning then needs no frozen copy)."""


DPO = register_objective(
    Objective(
        name="dpo",
        config=DPOConfig,
        summary="DPO (and IPO, hinge) on preference pairs, against a reference model.",
        formats=("preference",),
        implementation="tunesmith.objectives.dpo.impl",
        group=2,
        reference=True,
        metrics=PAIR_METRICS,
    )
)
