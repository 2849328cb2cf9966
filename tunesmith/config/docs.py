"""The run schema as documentation (`tunesmith config schema`) and a resolved config as YAML."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

import yaml

from tunesmith.config.messages import model_in
from tunesmith.config.schema import RunConfig
from tunesmith.methods.schema import fields_of
from tunesmith.objectives import registered_objectives
from tunesmith.registry import registered_methods


def schema_text() -> str:
    """The documented schema as commented YAML: every section and field with its default."""
    out = [
        "# tunesmith run config. Required fields are marked (required).",
        "# Override any field on the command line: tunesmith <verb> run.yaml train.lr=1e-4",
    ]
    _schema_lines(RunConfig, 0, out)
    return "\n".join(out) + "\n"


def _schema_lines(cls: type, indent: int, out: list[str], summary: str = "") -> None:
    pad = "  " * indent
    for name, field in fields_of(cls).items():
        doc = " ".join((field.description or "").split())
        if summary and name == "name":
            doc = summary
        sub = model_in(field.annotation)
        if cls is RunConfig and name == "method":
            out.append(f"{pad}# {doc}")
            for method in registered_methods():
                out.append(f"{pad}method:  # method {method.name}")
                _schema_lines(method.config, indent + 1, out, method.summary)
            continue
        if cls is RunConfig and name == "objective":
            out.append(f"{pad}# {doc}")
            for objective in registered_objectives():
                out.append(f"{pad}objective:  # objective {objective.name}")
                _schema_lines(objective.config, indent + 1, out, objective.summary)
            continue
        if sub is not None and get_origin(field.annotation) is None:
            out.append(f"{pad}{name}:  # {doc}")
            _schema_lines(sub, indent + 1, out)
            continue
        if sub is not None:  # a list of sources
            out.append(f"{pad}{name}:  # {doc}")
            out.append(f"{pad}  - # each entry:")
            _schema_lines(sub, indent + 2, out)
            continue
        default = (
            "(required)"
            if field.is_required()
            else _yaml_value(field.get_default(call_default_factory=True))
        )
        out.append(f"{pad}{name}: {default}  # {_type_name(field.annotation)}. {doc}")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if get_origin(annotation) is Annotated:  # a constrained type: its base type
        return _type_name(get_args(annotation)[0])
    args = get_args(annotation)
    if args and any(get_origin(a) is Annotated for a in args):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(get_origin(annotation), '__name__', 'type')}[{inner}]"
    text = str(annotation).replace("typing.", "")
    for plain in ("int", "float", "str", "bool"):
        text = text.replace(f"<class '{plain}'>", plain)
    return text.replace("NoneType", "null").replace(" | None", " | null")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_yaml(config: RunConfig) -> str:
    """The resolved config (defaults filled in) as YAML, as written next to a run's outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def schema_markdown() -> str:
    """The documented schema as Markdown (the documentation site's config reference): a table
    per section, and per method for `method`, of each field's type, default and meaning."""
    out: list[str] = []
    for name, field in fields_of(RunConfig).items():
        doc = " ".join((field.description or "").split())
        if name == "method":
            out += ["## method", "", doc, ""]
            for method in registered_methods():
                out += [f"### method: {method.name}", "", method.summary, ""]
                out += _markdown_table(method.config, "method.")
            continue
        if name == "objective":
            out += ["## objective", "", doc, ""]
            for objective in registered_objectives():
                out += [f"### objective: {objective.name}", "", objective.summary, ""]
                out += _markdown_table(objective.config, "objective.")
            continue
        sub = model_in(field.annotation)
        if sub is None:
            out += [f"## {name}", "", doc, ""] + _markdown_rows([(name, field)], "")
            continue
        listed = get_origin(field.annotation) is not None
        out += [f"## {name}", "", doc + (" A list; each entry:" if listed else ""), ""]
        out += _markdown_table(sub, f"{name}[]." if listed else f"{name}.")
    return "\n".join(out) + "\n"


def _markdown_table(cls: type, prefix: str) -> list[str]:
    fields = list(fields_of(cls).items())
    nested = [(n, f) for n, f in fields if model_in(f.annotation) is not None]
    rows = _markdown_rows([(n, f) for n, f in fields if (n, f) not in nested], prefix)
    for name, field in nested:
        rows += ["", f"`{prefix}{name}`: {' '.join((field.description or '').split())}", ""]
        rows += _markdown_table(model_in(field.annotation), f"{prefix}{name}.")
    return rows


def _markdown_rows(fields: list, prefix: str) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields:
        default = (
            "(required)"
            if field.is_required()
            else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
        )
        doc = " ".join((field.description or "").split())
        cells = [f"`{prefix}{name}`", _type_name(field.annotation), default, doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows + [""]
