"""Several adapters on one plain `transformers` model, whatever their method: state
(`state.py`), the modules that hold adapter weights (`holders.py`, `saved.py`), which modules
to adapt (`targets.py`), which adapters run (`activation.py`), merging (`merging.py`) and
PEFT-format save/load (`peft_format.py`). The methods themselves are in `tunesmith.methods`;
everything here reaches them through `tunesmith.registry`. A new method's implementation
builds on what this package exports (`AdapterHolder`, `register_adapter`, `PREFIX`, ...)."""

from tunesmith.adapters.activation import disabled, register_adapter, route, set_active
from tunesmith.adapters.holders import AdapterHolder, LinearWrapper
from tunesmith.adapters.merging import merge, merge_and_unload, unmerge
from tunesmith.adapters.peft_format import PREFIX, common_peft_keys, load_adapter, save_adapter
from tunesmith.adapters.state import (
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    modules_of,
    trainable_parameters,
)
from tunesmith.adapters.targets import find_targets, hidden_size

__all__ = [
    "PREFIX",
    "AdapterHolder",
    "LinearWrapper",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "common_peft_keys",
    "delete_adapter",
    "disabled",
    "find_targets",
    "hidden_size",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "modules_of",
    "register_adapter",
    "route",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
