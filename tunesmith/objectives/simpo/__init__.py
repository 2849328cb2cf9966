"""SimPO (objective `simpo`, Meng et al. 2024): reference-free and length-normalised; the mean
log-probability per answer token of the chosen answer must beat the rejected one's by a
margin."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.dpo import PAIR_METRICS
from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective


class SimPOConfig(ObjectiveConfig):
    """SimPO on preference pairs (no reference model)."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    """Scale of the length-normalised reward."""
    gamma: float = Field(0.5, ge=0)
    """Target reward margin (SimPO's γ; the paper's γ/β ratio of 0.25 with β 2)."""


SIMPO = register_objective(
    Objective(
        name="simpo",
        config=SimPOConfig,
        summary="SimPO: reference-free, length-normalised preference loss.",
        formats=("preference",),
        implementation="tunesmith.objectives.simpo.impl",
        group=2,
        metrics=PAIR_METRICS,
    )
)
