"""Reading a run config: YAML with line numbers, `key=value` overrides, and validation that
reports every problem at once (`ConfigError`), each with its file, line and YAML path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from tunesmith.config.messages import ConfigError, clean_loc, describe
from tunesmith.config.schema import RunConfig, method_section
from tunesmith.methods import LoRAConfig
from tunesmith.objectives import find_objective, objective_names
from tunesmith.objectives.sft import SFTConfig
from tunesmith.registry import find_method


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from YAML, apply `key=value` overrides (dotted paths, list indices as
    numbers: `data.datasets.0.weight=2`) and validate. Raises `ConfigError` listing every
    problem, each as `file:line: yaml.path: what is wrong`."""
    raw, lines = read_config_file(path)
    return config_from_dict(raw, overrides, source=str(path), lines=lines)


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple, int]]:
    """A config file's mapping as YAML gives it (not validated) and the line of each YAML path
    (for `config_from_dict`'s messages)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node tree gives line numbers, and the values are built from it
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{where}: not valid YAML ({problem})"]) from None
    finally:
        loader.dispose()
    lines = _line_numbers(node)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of sections (model, data, ...)"])
    return raw, lines


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "<config>",
    lines: dict[tuple, int] | None = None,
) -> RunConfig:
    """Validate a config given as a dict (after applying overrides); see `load_config`."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, plain types
    lines = dict(lines or {})
    overridden: set[tuple] = set()
    problems = []
    for item in overrides:
        try:
            overridden.add(apply_override(raw, item))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    errors, method = _validate_method(raw.get("method", "lora"))
    objective_errors, objective = _validate_objective(raw.get("objective", "sft"))
    errors += objective_errors
    run = None
    try:
        run = RunConfig.model_validate(
            {**raw, "method": method or LoRAConfig(), "objective": objective or SFTConfig()}
        )
    except ValidationError as err:
        errors += [(clean_loc(tuple(e["loc"]), raw), e) for e in err.errors()]
    if not errors:
        return run
    # A str-or-list field reports once per alternative; keep the most specific path.
    errors = [
        (loc, e)
        for loc, e in errors
        if not any(len(o) > len(loc) and o[: len(loc)] == loc for o, _ in errors)
    ]
    described = [describe(RunConfig, loc, e, raw, source, lines, overridden) for loc, e in errors]
    raise ConfigError(sorted(described, key=_line_order)) from None


def _validate_method(value: Any) -> tuple[list[tuple[tuple, dict]], Any]:
    """The `method:` section validated by its method's own config class: (errors as
    (cleaned YAML path, pydantic error), the config or None)."""
    section = method_section(value)
    if not isinstance(section, dict):
        return [(("method",), {"type": "dict_type", "input": value})], None
    method = find_method(section["name"])
    if method is None:
        error = {"type": "union_tag_invalid", "input": section, "ctx": {"tag": section["name"]}}
        return [(("method", "name"), error)], None
    try:
        return [], TypeAdapter(method.config).validate_python(section)
    except ValidationError as err:
        raw = {"method": section}
        return [(clean_loc(("method", *e["loc"]), raw), e) for e in err.errors()], None


def _validate_objective(value: Any) -> tuple[list[tuple[tuple, dict]], Any]:
    """The `objective:` section validated by its objective's config class."""
    section = {"name": value} if isinstance(value, str) else value
    if not isinstance(section, dict):
        return [(("objective",), {"type": "dict_type", "input": value})], None
    objective = find_objective(section.get("name", "sft"))
    if objective is None:
        error = {
            "type": "union_tag_invalid",
            "input": section,
            "ctx": {"tag": section.get("name"), "choices": objective_names()},
        }
        return [(("objective", "name"), error)], None
    try:
        return [], objective.config.model_validate({"name": objective.name, **section})
    except ValidationError as err:
        raw = {"objective": section}
        return [(clean_loc(("objective", *e["loc"]), raw), e) for e in err.errors()], None


def _line_order(problem: str) -> tuple[int, int]:
    head = problem.split(": ", 1)[0]
    line = head.rsplit(":", 1)[-1]
    return (0, int(line)) if line.isdigit() else (1, 0)


DEFAULT_NAMES = {"method": "lora", "objective": "sft"}
"""Sections given by name alone (`method: lora`), and the name when they are left out."""


def apply_override(raw: dict[str, Any], item: str) -> tuple:
    """Set one `dotted.key=value` in `raw` (the value parsed as YAML). Returns the key path."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {item!r}: expected key=value, e.g. train.lr=1e-4"])
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return set_path(raw, key, value, f"override {item!r}")


def set_path(raw: dict[str, Any], key: str, value: Any, what: str) -> tuple:
    """Set the dotted `key` of `raw` to `value` (sections made as needed; `what` starts the
    message of a path that cannot be set). Returns the key path."""
    parts: list[Any] = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node, parts[depth] = _list_item(node, part, parts[: depth + 1], what), int(part)
            continue
        child = node.get(part)
        if depth == 0 and part in DEFAULT_NAMES and not isinstance(child, dict):
            # `method: lora` then `method.r=8`; `objective: dpo` then `objective.beta=0.2`
            child = node[part] = {"name": child or DEFAULT_NAMES[part]}
        elif isinstance(child, str) and part in ("datasets", "validation"):
            child = node[part] = [{"path": child}]
        elif child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            where = ".".join(map(str, parts[: depth + 1]))
            raise ConfigError([f"{what}: {where} is a value, not a section"])
        node = child
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, parts, what)
        node[int(last)] = value
        parts[-1] = int(last)
    else:
        node[last] = value
    return tuple(parts)


def _list_item(node: list, part: str, parts: list, what: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        where = ".".join(map(str, parts[:-1]))
        raise ConfigError(
            [f"{what}: {where} has {len(node)} entries; index with 0..{len(node) - 1}"]
        )
    return node[int(part)]


def _line_numbers(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict:
    """Map each YAML path (keys and list indices) to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_numbers(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, value_node in enumerate(node.value):
            child = (*path, index)
            out[child] = value_node.start_mark.line + 1
            _line_numbers(value_node, child, out)
    return out
