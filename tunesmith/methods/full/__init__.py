"""Full fine-tuning (method `full`): every weight trains. The run keeps fp32 master weights
unless `train.fp32_master_weights: false`, checkpoints and saves a whole Hugging Face model.
This module is the schema; `impl.py` saves and restores the weights."""

from __future__ import annotations

from typing import Literal

from tunesmith.methods.schema import field_name, method_config
from tunesmith.registry import Method, register_method


@method_config
class FullConfig:
    """Full fine-tuning: every weight trains (about 16 bytes per parameter with AdamW)."""

    name: Literal["full"] = field_name("full")


FULL = register_method(
    Method(
        name="full",
        config=FullConfig,
        summary="Full fine-tuning: every weight trains (about 16 bytes per parameter with AdamW).",
        default_lr=2e-5,
        implementation="tunesmith.methods.full.impl",
        trains_adapter=False,
        suggest_in_plan=True,
    )
)
