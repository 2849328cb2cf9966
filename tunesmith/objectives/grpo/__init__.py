"""Group relative policy optimisation (objective `grpo`, Shao et al. 2024): online
reinforcement learning from rewards computed on the model's own samples. Each prompt gets
`num_generations` completions from the serving engine; reward functions score them; each
completion's advantage is its reward against its group's mean (and spread); the clipped
policy-ratio loss raises the likelihood of the better ones, with an optional KL pull towards
the reference (the base with the adapter off). Data: prompt-only records (`{"prompt": ...}`
plus any other columns, which the reward functions receive)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.objectives.registry import Objective, ObjectiveConfig, register_objective

BUILTIN_REWARDS = {
    "exact_match": "1 when the completion equals `column` (case, spaces and surrounding "
    "punctuation ignored), else 0",
    "numeric_match": "1 when the completion's last number equals `column`'s, else 0",
    "regex": "1 when the whole completion matches `pattern` (a format check), else 0",
    "length": "0 up to `limit` tokens, then down by 1 per `limit` tokens over it, to -1",
}
GRPO_METRICS = ("clip_ratio", "kl")


class RewardSpec(BaseModel):
    """One reward function and its weight in the total reward."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    function: str
    """A built-in (exact_match, numeric_match, regex, length) or `module:function` or
    `path/to/file.py:function` with TRL's signature `(prompts, completions, **columns) ->
    list[float]` (None for a completion it does not score)."""
    weight: float = 1.0
    """Its weight in the total reward (the weighted sum of all functions)."""
    column: str = "answer"
    """exact_match and numeric_match: the data column holding the reference answer."""
    pattern: str | None = None
    """regex: the regular expression the whole completion must match."""
    limit: int | None = Field(None, gt=0)
    """length: completion tokens allowed before the penalty starts."""
    kwargs: dict[str, Any] = {}
    """Extra keyword arguments for a user function."""

    @model_validator(mode="after")
    def _arguments(self) -> RewardSpec:
        if ":" not in self.function and self.function not in BUILTIN_REWARDS:
            raise ValueError(
                f"function: unknown reward {self.function!r}; use one of "
                f"{', '.join(BUILTIN_REWARDS)} or module:function"
            )
        if self.function == "regex" and not self.pattern:
            raise ValueError("function regex needs pattern: the expression to match")
        if self.function == "length" and self.limit is None:
            raise ValueError("function length needs limit: the tokens allowed")
        return self

    @property
    def label(self) -> str:
        return self.function.rsplit(":", 1)[-1]


class GRPOConfig(ObjectiveConfig):
    """GRPO on prompt-only data with reward functions."""

    name: Literal["grpo"] = "grpo"
    rewards: list[RewardSpec] = Field(min_length=1)
    """The reward functions; the total reward is their weighted sum."""
    num_generations: int = Field(4, ge=2)
    """Completions sampled per prompt (a group). A micro-batch holds train.micro_batch_size
    prompts, so micro_batch_size × num_generations sequences."""
    max_completion_tokens: int = Field(64, gt=0)
    """Tokens a completion may have (its stop token included); one cut there is clipped."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions (validation decodes greedily)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens holding this much probability."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """grpo: each completion's token losses averaged, then averaged over completions;
    dr_grpo: summed and divided by completions × max_completion_tokens (no length bias);
    dapo: summed over all tokens of the step and divided by their count (TRL's default)."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """The ratio is clipped to [1 − epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = Field(None, gt=0)
    """The upper clip (DAPO's clip-higher); None: epsilon."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL term against the reference (the base with the adapter off; a frozen
    copy for full fine-tuning); 0 needs no reference pass."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer steps on each batch of generations (μ): the first uses fresh samples, the
    others reuse them, the clipped ratio against the generating policy keeping them close."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantages are reward − group mean, divided by the group's standard deviation (group),
    the whole batch's (batch), or not divided (none; Dr. GRPO)."""
    generation_batch_size: int = Field(64, gt=0)
    """Sequences the engine decodes at once."""


GRPO = register_objective(
    Objective(
        name="grpo",
        config=GRPOConfig,
        summary="GRPO: online RL from reward functions on the model's own samples.",
        formats=("prompt",),
        implementation="tunesmith.objectives.grpo.impl",
        output="generation",
        metrics=GRPO_METRICS,
        run="tunesmith.rollout.run:GRPORun",
    )
)
