"""The objective registry: what a run's loss is computed from, the second axis beside the
method. Any method trains with any objective (`objective: {name: dpo}` with `method: lora`,
`qlora`, `full`, ...).

An `Objective` is what the generic code may know about an objective without importing torch:
its name (the YAML `objective.name`), its config class, the data formats it trains on, how many
consecutive samples make one training unit (a preference pair is two: chosen, then rejected),
whether it needs a reference model's log-probabilities, what the model gives it (`logps`: the
summed log-probabilities of each sequence's answer tokens; `score`: a scalar head's value on
the last token), the validation metrics it reports, and its `implementation` (a module imported
on first use) with `loss(config, policy, reference, flags) -> (loss per unit, metrics per unit)`.

`sft` (the default) is today's token-level loss; the loop keeps its own path for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunesmith.errors import TunesmithError

BUILTINS = "tunesmith.objectives.builtins"
SFT_FORMATS = ("alpaca", "chat", "completion", "tokenized")


class ObjectiveError(TunesmithError):
    """An objective that does not exist, or a config that is not an objective's."""


class ObjectiveConfig(BaseModel):
    """Base of every objective's config: unknown keys are refused, field docstrings document
    them (`tunesmith config schema`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


@dataclass(frozen=True)
class Objective:
    name: str
    """The YAML `objective.name`."""
    config: type[ObjectiveConfig]
    summary: str
    formats: tuple[str, ...]
    """The data formats it trains on (`data.datasets[].format`)."""
    implementation: str | Any = None
    """The module with `loss(...)` (see the module docstring); None for sft."""
    group: int = 1
    """Consecutive samples per training unit: 2 for a preference pair (chosen, rejected) and
    for an unpaired example with its mismatched KL sample (KTO)."""
    reference: bool = False
    """Needs the reference model's log-probabilities (the base with the adapter switched off,
    a frozen copy for full fine-tuning, or precomputed once)."""
    output: str = "logps"
    """What the loss is computed from: "logps" (per sequence, answer tokens), "score" (a
    scalar head on the last token: a reward model), "logits" (each answer token's
    distribution against a teacher's: distillation, `DistillLoss`) or "generation" (the
    model's own samples, scored by rewards: GRPO, `rollout.run.GRPORun`)."""
    metrics: tuple[str, ...] = ()
    """The per-unit metrics its loss reports, logged as step means and in validation."""
    run: str | None = None
    """`module:Class` of the `train.loop.Run` subclass an objective that makes its own batches
    trains with (GRPO generates them); None: the loop's `Run`."""

    @property
    def impl(self) -> Any:
        if isinstance(self.implementation, str):
            return importlib.import_module(self.implementation)
        return self.implementation

    @property
    def run_class(self) -> Any:
        """The run class (`run`, imported on first use), or None."""
        if self.run is None:
            return None
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def token_level(self) -> bool:
        """The supervised objective: a loss per trained token, no units."""
        return self.implementation is None


_OBJECTIVES: dict[str, Objective] = {}
_loaded = False


def _builtins() -> dict[str, Objective]:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(BUILTINS)
    return _OBJECTIVES


def register_objective(objective: Objective, *, replace: bool = False) -> Objective:
    """Add `objective` under its name; a second one of the same name is refused unless
    `replace`."""
    if not replace and _OBJECTIVES.get(objective.name, objective) != objective:
        raise ObjectiveError(
            f"an objective named {objective.name!r} is already registered; pick another name "
            "or pass replace=True"
        )
    default = objective.config.model_fields.get("name")
    if default is None or default.default != objective.name:
        raise ObjectiveError(
            f"objective {objective.name!r}: its config class {objective.config.__name__} needs "
            f'a field name: Literal["{objective.name}"] = "{objective.name}"'
        )
    _OBJECTIVES[objective.name] = objective
    return objective


def unregister_objective(name: str) -> None:
    _OBJECTIVES.pop(name, None)


def objective_names() -> list[str]:
    return list(_builtins())


def registered_objectives() -> list[Objective]:
    return list(_builtins().values())


def find_objective(name: object) -> Objective | None:
    return _builtins().get(name) if isinstance(name, str) else None


def objective_of(config: Any) -> Objective:
    """The objective whose config `config` is."""
    objective = find_objective(getattr(config, "name", None))
    if objective is None or not isinstance(config, objective.config):
        raise ObjectiveError(
            f"{type(config).__name__} is not the config of a registered objective; known: "
            f"{', '.join(objective_names())}"
        )
    return objective
