"""The method registry: every training method (full fine-tuning, the LoRA family, IA3, prompt
and prefix tuning, bottleneck adapters, and any a user registers) is one `Method`.

A `Method` is what the rest of tunesmith may know about a method without importing torch:
its name (the YAML `method.name`), its config class (the one schema, used by the YAML run
config and by the Python API alike), its default learning rate, a few facts the generic code
asks (does it merge, does it add virtual tokens, does it train every weight), and its
`implementation`: an object, or the dotted name of a module imported on first use, that does
the work on a model (see `MethodImplementation`).

Nothing outside a method's own module tests for that method's type or name: generic code asks
`method_named(name)` or `method_of(config)` and calls the answer.

The built-in methods live in `tunesmith.methods`; the first lookup imports that package (the
way entry points load plugins), so this module, at the bottom of the package graph, imports
nothing of tunesmith's at module level but `errors`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tunesmith.errors import AdapterError

BUILTINS = "tunesmith.methods"


class MethodImplementation(Protocol):
    """What a method does on a model. Adapter methods implement the first group; every hook
    below it is optional (the generic code has a default when it is missing):

    - `attach(model, config, *, name, trainable, tokenizer)`: add adapter `name` to `model`
      (validate everything before changing the model), then `tunesmith.adapters.register_adapter`.
    - `tensor_homes(model, name) -> {saved key: (module, attribute)}`: where each tensor of the
      saved adapter lives (PEFT's key names where PEFT has the method).
    - `peft_config(model, name, config, *, base_path) -> dict`: the `adapter_config.json`.
    - `config_from_peft(raw, *, source, model, folder) -> config`: read it back.

    Optional: `saved_tensors(model, name)`, `write_extra(model, name, folder)`,
    `load_tensors(model, name, tensors, *, source, config, hot_swap, folder)`,
    `creation_config(config)`, `hot_swap_structure(config)` (settings a hot swap must keep),
    `check_hot_swap(model, name, old, new, folder)`, `materialize(model, name, config)` (real
    buffers on a meta skeleton); for runs: `load_base(config, model_section, device, dtype,
    base)` (`base`: a random-weight model to prepare instead of loading, `model.init: random`),
    `trace_base(model, config, compute_dtype)`, `prepare_training(model, config, train)` (the
    built model's training-only switches, such as LoRA's fused step), `save(model, folder)`,
    `load_weights(model, folder, device)`; for a quantized base: `compute_dtype(config)` (the
    dtype setting the method fixes, "auto" to keep `model.dtype`) and
    `quant_config(config, compute_dtype)` (how the base is quantized); for adapter arithmetic:
    `combine(model, names, weights, method, name, **settings)` (several of its adapters become
    one new one; `tunesmith.combine.combine_adapters` checks the names and calls it).

    Every hook's name is in `HOOKS`; `Method.hook` refuses any other, so a misspelt hook at a
    call site is an error rather than a hook silently never found.
    """

    def attach(self, model: Any, config: Any, *, name: str, trainable: bool, tokenizer: Any): ...


REQUIRED_HOOKS = ("attach", "tensor_homes", "peft_config", "config_from_peft")
HOOKS = frozenset(
    (
        *REQUIRED_HOOKS,
        "saved_tensors",
        "write_extra",
        "load_tensors",
        "creation_config",
        "hot_swap_structure",
        "check_hot_swap",
        "materialize",
        "load_base",
        "trace_base",
        "prepare_training",
        "save",
        "load_weights",
        "compute_dtype",
        "quant_config",
        "combine",
    )
)
"""The implementation's hooks (see `MethodImplementation`): the only names `Method.hook`
answers for."""


@dataclass(frozen=True)
class Method:
    """One training method; see the module docstring."""

    name: str
    """The YAML `method.name` (and the `name` field of the config class)."""
    config: type
    """The method's config class: a `tunesmith.methods.schema.method_config` dataclass."""
    summary: str
    """One line for help texts and the planner's table."""
    default_lr: float
    """Peak learning rate when `train.lr` is not set."""
    implementation: str | Any
    """The `MethodImplementation`, or the dotted name of a module that is one."""
    trains_adapter: bool = True
    """False for full fine-tuning: the run trains (and saves) the model's own weights."""
    peft_types: tuple[str, ...] = ()
    """The `peft_type` values of `adapter_config.json` this method reads."""
    merge_refusal: str | None = None
    """Why the adapter cannot be folded into the base weights; None: it merges."""
    virtual_tokens: bool = False
    """Adds virtual tokens in front of each sequence: one active at a time, no per-row routing,
    no packing."""
    quantized_base: bool = False
    """Trains on a base quantized while loading (QLoRA)."""
    low_rank: bool = False
    """Its adapter is low-rank factors of a weight update (ΔW = s·B·A), which adapter
    arithmetic (`tunesmith combine`) can combine."""
    sequence_tokens: Callable[[Any], int] = field(default=lambda config: 0, compare=False)
    """Extra positions it adds to each sequence (prompt tuning: its virtual tokens)."""
    cache_tokens: Callable[[Any], int] = field(default=lambda config: 0, compare=False)
    """Key/value positions it puts in front of each row's attention cache (prompt and prefix
    tuning: their virtual tokens), which a batch of rows shares."""
    plan_rows: Callable[[Any], list[tuple[str, Any]]] | None = field(default=None, compare=False)
    """The planner's comparison rows for this method, given the run's method config:
    [(label, config)]. None: one row with the default config."""
    label: Callable[[Any], str] | None = field(default=None, compare=False)
    """The planner's label of a config of this method (LoRA with DoRA: "dora"); None: name."""
    suggest_in_plan: bool = False
    """`tunesmith plan` may suggest switching to this method when the run does not fit."""

    @property
    def impl(self) -> Any:
        """The implementation, imported on first use."""
        if isinstance(self.implementation, str):
            return importlib.import_module(self.implementation)
        return self.implementation

    def hook(self, name: str) -> Callable | None:
        """The implementation's hook `name` (one of `HOOKS`), or None when it has none."""
        if name not in HOOKS:
            raise AdapterError(f"{name!r} is not a method hook; hooks: {', '.join(sorted(HOOKS))}")
        return getattr(self.impl, name, None)

    def label_of(self, config: Any) -> str:
        return self.label(config) if self.label else self.name

    def rows_for_plan(self, run_config: Any) -> list[tuple[str, Any]]:
        if self.plan_rows is not None:
            return self.plan_rows(run_config)
        return [(self.name, self.config())]


_METHODS: dict[str, Method] = {}
_builtins_imported = False


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add `method` to the registry (under `method.name`) and return it. A second method of the
    same name is refused unless `replace`."""
    _builtins()  # the built-ins register first, whatever is registered before any lookup
    if not replace and method.name in _METHODS and _METHODS[method.name] != method:
        raise AdapterError(
            f"a method named {method.name!r} is already registered; pick another name or pass "
            "replace=True"
        )
    if _default_name(method.config) != method.name:
        raise AdapterError(
            f"method {method.name!r}: its config class {method.config.__name__} needs a field "
            f'name: Literal["{method.name}"] = "{method.name}" (the YAML method.name)'
        )
    _METHODS[method.name] = method
    return method


def _default_name(config: type) -> object:
    found = getattr(config, "__pydantic_fields__", None) or getattr(
        config, "__dataclass_fields__", {}
    )
    field_info = found.get("name")
    return getattr(field_info, "default", None)


def unregister_method(name: str) -> None:
    """Remove a registered method (tests register and remove their own)."""
    _METHODS.pop(name, None)


def _builtins() -> dict[str, Method]:
    global _builtins_imported
    if not _builtins_imported:
        _builtins_imported = True  # before the import: the built-ins register while it runs
        importlib.import_module(BUILTINS)
    return _METHODS


def method_names() -> list[str]:
    """Every registered method's name, built-ins first."""
    return list(_builtins())


def registered_methods() -> list[Method]:
    return list(_builtins().values())


def find_method(name: object) -> Method | None:
    return _builtins().get(name) if isinstance(name, str) else None


def method_named(name: str) -> Method:
    """The method called `name`; an `AdapterError` naming the known ones otherwise."""
    method = find_method(name)
    if method is None:
        raise AdapterError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return method


def method_of(config: Any) -> Method:
    """The method whose config `config` is (by its `name` field)."""
    method = find_method(getattr(config, "name", None))
    if method is None or not isinstance(config, method.config):
        raise AdapterError(
            f"{type(config).__name__} is not the config of a registered method; known: "
            f"{', '.join(method_names())}"
        )
    return method


def method_for_peft_type(peft_type: str) -> Method | None:
    """The adapter method that reads `adapter_config.json` files of this `peft_type`."""
    for method in _builtins().values():
        if peft_type in method.peft_types:
            return method
    return None


def peft_types() -> list[str]:
    return [t for m in _builtins().values() for t in m.peft_types]
