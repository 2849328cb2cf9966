"""Training objectives, the second axis beside the methods: what the loss is computed from.
One folder per objective (`sft`, `dpo`, `simpo`, `orpo`, `kto`, `reward`, `distill`,
`grpo`): its `__init__` is the schema and the registry entry (no torch), its `impl.py` the
loss. `losses.py` holds the
loss formulas from log-probabilities; `rows.py` what a loss takes (`train/logps.py` computes it);
`registry.py` is the registry (see its docstring)."""

import tunesmith.objectives.builtins  # noqa: F401  (registers the built-ins, in their order)
from tunesmith.objectives.distill import DistillConfig
from tunesmith.objectives.dpo import DPOConfig
from tunesmith.objectives.grpo import GRPOConfig, RewardSpec
from tunesmith.objectives.kto import KTOConfig
from tunesmith.objectives.orpo import ORPOConfig
from tunesmith.objectives.registry import (
    SFT_FORMATS,
    Objective,
    ObjectiveConfig,
    ObjectiveError,
    find_objective,
    objective_names,
    objective_of,
    register_objective,
    registered_objectives,
    unregister_objective,
)
from tunesmith.objectives.reward import RewardConfig
from tunesmith.objectives.sft import SFTConfig
from tunesmith.objectives.simpo import SimPOConfig

__all__ = [
    "DistillConfig",
    "DPOConfig",
    "GRPOConfig",
    "RewardSpec",
    "KTOConfig",
    "ORPOConfig",
    "RewardConfig",
    "SFTConfig",
    "SimPOConfig",
    "SFT_FORMATS",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveError",
    "find_objective",
    "objective_names",
    "objective_of",
    "register_objective",
    "registered_objectives",
    "unregister_objective",
]
