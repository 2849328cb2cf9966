"""Knowledge distillation (objective `distill`): the student (any method, or full fine-tuning)
learns a teacher's next-token distribution on the data's answer tokens, instead of (or beside)
the answers themselves. The divergence is forward KL (the teacher's mass covered), reverse KL
(the student's mass where the teacher has it) or the generalised Jensen-Shannon divergence
between them, each at a temperature. The teacher's logits are computed on the fly, or once as
its top-k log-probabilities kept with the data cache (`precompute_teacher`); the teacher must
share the student's tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.objectives.registry import (
    SFT_FORMATS,
    Objective,
    ObjectiveConfig,
    register_objective,
)

DISTILL_METRICS = ("kl", "agreement", "ce")


class DistillConfig(ObjectiveConfig):
    """Distillation from a teacher on supervised data."""

    name: Literal["distill"] = "distill"
    teacher: str
    """The teacher: a model folder, a hub id, or an adapter folder (its base is loaded and the
    adapter applied). It must use the student's tokenizer."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl: KL(teacher ‖ student); reverse_kl: KL(student ‖ teacher); jsd: the
    generalised Jensen-Shannon divergence with mixture weight `beta` (GKD's)."""
    beta: float = Field(0.5, gt=0, lt=1)
    """jsd only: the mixture m = beta·teacher + (1 − beta)·student, the loss
    beta·KL(teacher ‖ m) + (1 − beta)·KL(student ‖ m)."""
    temperature: float = Field(1.0, gt=0)
    """Both distributions are softened by it before the divergence."""
    alpha: float = Field(1.0, ge=0, le=1)
    """The divergence's share of the loss; the rest is the usual cross-entropy on the answer
    tokens (1: distillation alone)."""
    precompute_teacher: bool = False
    """Run the teacher once before training, keep its `top_k` log-probabilities per answer
    token with the data cache, and free it. The divergence is then computed on those tokens,
    both distributions renormalised over them (exact when top_k covers the vocabulary)."""
    top_k: int = Field(64, gt=0)
    """Tokens kept per position when `precompute_teacher` is on."""
    teacher_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """The teacher's weights dtype ("auto": the run's compute dtype)."""


DISTILL = register_objective(
    Objective(
        name="distill",
        config=DistillConfig,
        summary="Knowledge distillation: the student learns a teacher's token distribution.",
        formats=SFT_FORMATS,
        implementation="tunesmith.objectives.distill.impl",
        output="logits",
        metrics=DISTILL_METRICS,
    )
)
