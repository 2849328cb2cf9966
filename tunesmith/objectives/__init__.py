"""Training objectives, the second axis beside the methods: what the loss is computed from.
One folder per objective (`sft`, `dpo`, `simpo`, `orpo`, `kto`, `reward`): its `__init__` is
the schema and the registry entry (no torch), its `impl.py` the loss. `losses.py` holds the
loss formulas from log-probabilities; `logps.py` computes those from a model and a batch;
`registry.py` is the registry (see its docstring)."""

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

__all__ = [
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
