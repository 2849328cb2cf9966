"""Which modules an adapter adapts: PEFT's matching rules (a regex for the whole name, or
suffixes that end at a dot), layer indices, `all-linear`, and `modules_to_save` copies."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from tunesmith.adapters.holders import LinearWrapper
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.errors import AdapterError

MLP_SUBLAYERS = ("mlp", "feed_forward", "ffn")
"""Names of a decoder layer's MLP sub-layer."""


def outer_modules(
    model: nn.Module, stop: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` without the insides of tunesmith's wrappers, nor of modules whose name
    `stop` accepts (the wrapper or stopped module itself is yielded)."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        if isinstance(module, (LinearWrapper, ModulesToSave)) or (prefix and stop(prefix)):
            return
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    return walk("", model)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D (or LoRA/IA3 layer already wrapping one) by module name."""
    return {
        name: module
        for name, module in outer_modules(model)
        if isinstance(module, (nn.Linear, Conv1D, LinearWrapper))
    }


def name_matches(spec: str | Sequence[str], name: str) -> bool:
    """PEFT's rule: a string is a regex matching the whole name; a list holds names or
    suffixes that end at a dot boundary."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The index of the layer a module sits in (the first numbered segment), or None."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or (isinstance(module, ModulesToSave) and module.original_module is head):
            return name
    return None


def find_targets(model: nn.Module, config: Any, what: str) -> list[str]:
    """Names of the linear modules `config` adapts (its `targets`, `exclude`, `layers`,
    `layers_pattern` and `modules_to_save`), in model order; `what` names the method in
    messages. Raises if nothing matches; warns about a listed target that matches nothing."""
    linears = linear_modules(model)
    spec = config.targets
    if spec == "all-linear":
        head = output_head_name(model)
        chosen = [n for n in linears if n != head]
    else:
        chosen = [n for n in linears if name_matches(spec, n)]
        if not chosen:
            raise AdapterError(_no_match_message(model, spec, linears, what=what))
        if isinstance(spec, (list, tuple)):
            unused = [t for t in spec if not any(name_matches([t], n) for n in linears)]
            if unused:  # fine for a list meant for several architectures; a typo otherwise
                warnings.warn(
                    f"{what} targets {', '.join(map(repr, unused))} match no linear module of "
                    f"{type(model).__name__}",
                    stacklevel=3,
                )
    if config.modules_to_save:
        chosen = [n for n in chosen if not name_matches(config.modules_to_save, n)]
    if config.exclude:
        chosen = [n for n in chosen if not name_matches(config.exclude, n)]
    layers = getattr(config, "layers", None)
    if layers is not None:
        wanted = set(layers)
        pattern = getattr(config, "layers_pattern", None)
        chosen = [n for n in chosen if layer_index(n, pattern) in wanted]
    if not chosen:
        raise AdapterError(_no_match_message(model, spec, linears, filtered=True, what=what))
    return chosen


def find_targets_or_none(model: nn.Module, config: Any, what: str) -> list[str] | None:
    """`find_targets`, or None where it raises (to test whether a config re-selects a set)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return find_targets(model, config, what)
    except AdapterError:
        return None


def _no_match_message(
    model: nn.Module,
    spec: str | Sequence[str],
    linears: dict[str, nn.Module],
    filtered: bool = False,
    what: str = "LoRA",
) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
    others = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if n and n not in linears and name_matches(spec, n)
    ]
    why = " after exclude/layers/modules_to_save filtering" if filtered else ""
    hint = f"; it matches non-linear modules {', '.join(others[:3])}" if others else ""
    return (
        f"{what} targets {spec!r} match no linear module of {type(model).__name__}{why}{hint}; "
        f"linear modules are: {', '.join(leaves)}"
    )


def check_wrapper_kind(model: nn.Module, targets: list[str], kind: type[LinearWrapper]) -> None:
    """Refuse targets already wrapped by another method's layer (LoRA and IA3 cannot share)."""
    for module_name in targets:
        module = model.get_submodule(module_name)
        if isinstance(module, LinearWrapper) and not isinstance(module, kind):
            raise AdapterError(
                f"{module_name} already has {module.method_label} adapters; "
                f"{module.method_label} and {kind.method_label} cannot share a module "
                "(exclude it from one of them)"
            )


def modules_to_save_names(model: nn.Module, config: Any) -> list[str]:
    """The modules `config.modules_to_save` names (each entry must match one)."""
    if not config.modules_to_save:
        return []

    def is_saved(module_name: str) -> bool:
        return name_matches(config.modules_to_save, module_name)

    found = [n for n, _ in outer_modules(model, stop=is_saved) if n and is_saved(n)]
    for entry in config.modules_to_save:
        if not any(name_matches([entry], n) for n in found):
            raise AdapterError(
                f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}"
            )
    return found


def add_saved_copies(model: nn.Module, saved_names: list[str], name: str) -> None:
    """Give adapter `name` its own trainable copy of each module in `saved_names`."""
    for module_name in saved_names:
        wrapper = model.get_submodule(module_name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper).train(wrapper.training)
            model.set_submodule(module_name, wrapper)
        wrapper.add_copy(name)


def hidden_size(model: nn.Module, what: str = "bottleneck adapters") -> int:
    """The (text) model's hidden size, from its config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise AdapterError(f"{what} need hidden_size in {type(model).__name__}'s config")
    return hidden
