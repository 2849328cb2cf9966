"""Supervised fine-tuning (objective `sft`, the default): next-token cross-entropy on the
answer tokens, normalised by the trained tokens of the whole step. The loop computes it itself
(`tunesmith.train.loss`); this entry is its schema and its data."""

from __future__ import annotations

from typing import Literal

from tunesmith.objectives.registry import (
    SFT_FORMATS,
    Objective,
    ObjectiveConfig,
    register_objective,
)


class SFTConfig(ObjectiveConfig):
    """Supervised fine-tuning on demonstrations (the default)."""

    name: Literal["sft"] = "sft"


SFT = register_objective(
    Objective(
        name="sft",
        config=SFTConfig,
        summary="Supervised fine-tuning: next-token loss on the answers (the default).",
        formats=SFT_FORMATS,
    )
)
