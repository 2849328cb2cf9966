"""ORPO (objective `orpo`, Hong et al. 2024): reference-free; the supervised loss on the chosen
answer plus an odds-ratio term that favours it over the rejected one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.dpo import PAIR_METRICS
from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective


class ORPOConfig(ObjectiveConfig):
    """ORPO on preference pairs (no reference model)."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term (ORPO's λ)."""


ORPO = register_objective(
    Objective(
        name="orpo",
        config=ORPOConfig,
        summary="ORPO: supervised loss plus an odds-ratio preference term, no reference.",
        formats=("preference",),
        implementation="tunesmith.objectives.orpo.impl",
        group=2,
        metrics=(*PAIR_METRICS, "nll"),
    )
)
