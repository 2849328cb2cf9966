"""Several adapters on one plain `transformers` model, whatever their method: state
(`state.py`), the modules that hold adapter weights (`holders.py`, `saved.py`), which modules
to adapt (`targets.py`), which adapters run (`activation.py`), merging (`merging.py`) and
PEFT-format save/load (`peft_format.py`). The methods themselves are in `tunesmith.methods`;
everything here reaches them through `tunesmith.registry`."""

from tunesmith.adapters.activation import disabled, route, set_active
from tunesmith.adapters.merging import merge, merge_and_unload, unmerge
from tunesmith.adapters.peft_format import load_adapter, save_adapter
from tunesmith.adapters.state import (
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    trainable_parameters,
)

__all__ = [
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "route",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
