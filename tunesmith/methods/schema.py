"""One schema per method: a method's config is a pydantic dataclass made by `method_config`.

The same class is the YAML run config's `method:` section (validated by pydantic inside
`tunesmith.config`, whose errors name the file, line and YAML path) and the Python API's
config (`tunesmith.LoRAConfig(r=8)`, whose errors are one-line `AdapterError`s naming the
field). Each field, its documentation (the docstring under it) and its checks (`Field(gt=0)`,
`Literal[...]`, a `__post_init__` for checks across fields) exist once.

    @method_config
    class ScaleConfig:
        name: Literal["scale"] = field_name("scale")
        init: float = Field(1.0, gt=0)
        \"\"\"Starting value of the scale.\"\"\"
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from tunesmith.errors import AdapterError

SCHEMA_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def field_name(name: str) -> Any:
    """The `name` field of a method config: the method's name, keyword-only, so that positional
    construction (`PromptTuningConfig(8)`) starts at the first setting."""
    return Field(name, kw_only=True, description="The method.")


def method_config(cls: type) -> type:
    """Make `cls` a method config: a pydantic dataclass (forbidding unknown keys, documented by
    its attribute docstrings) whose constructor raises `AdapterError` with a one-line message."""
    cls = pydantic_dataclass(cls, config=SCHEMA_CONFIG)
    for name, info in cls.__pydantic_fields__.items():  # docs of inherited fields
        if info.description is None:
            for base in cls.__mro__[1:]:
                inherited = getattr(base, "__pydantic_fields__", {}).get(name)
                if inherited is not None and inherited.description:
                    info.description = inherited.description
                    break
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as err:
            raise AdapterError(library_message(type(self), err)) from None

    cls.__init__ = __init__
    return cls


def fields_of(cls: type) -> dict[str, Any]:
    """{field name: pydantic FieldInfo} of a method config (or any pydantic model)."""
    found = getattr(cls, "__pydantic_fields__", None)
    return dict(found) if found is not None else dict(getattr(cls, "model_fields", {}))


def settings(config: Any) -> dict[str, Any]:
    """A config's fields as a dict, without its `name`."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "name"}


# --- messages for the Python API -------------------------------------------------------------
def library_message(cls: type, err: ValidationError) -> str:
    """The first problem of a failed construction as one line naming the keyword argument, e.g.
    "r must be a positive integer, got 0"; a check's own error (from `__post_init__`) as it
    is."""
    error = err.errors()[0]
    kind, loc, value = error["type"], error["loc"], error.get("input")
    cause = (error.get("ctx") or {}).get("error")
    if kind == "value_error" and isinstance(cause, AdapterError):
        return str(cause)
    where = _argument(loc)
    info = fields_of(cls).get(str(loc[0])) if loc else None
    bounds = _bounds(info) if info is not None else {}
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(n for n in fields_of(cls) if n != "name")
        return f"{cls.__name__} has no setting {loc[-1]!r}; its settings are: {known}"
    greater = kind == "greater_than" and (error.get("ctx") or {}).get("gt") == 0
    if kind.startswith("int_") or (greater and isinstance(value, int)):
        what = "a positive integer" if greater or bounds.get("gt") == 0 else "an integer"
        return f"{where} must be {what}, got {value!r}"
    if "ge" in bounds and "lt" in bounds:
        return f"{where} must be in [{bounds['ge']:g}, {bounds['lt']:g}), got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        return f"{where} must be {sign} {next(iter(error['ctx'].values()))}, got {value!r}"
    if kind == "literal_error":
        choices = error["ctx"]["expected"].replace(" or ", ", ").replace("'", "")
        return f"{where} must be one of {choices}; got {value!r}"
    if kind == "missing_argument" or kind == "missing":
        return f"{where} is required"
    return f"{where}: {error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}"


def _argument(loc: tuple) -> str:
    if not loc:
        return "config"
    head, *rest = loc
    return str(head) + "".join(f"[{part!r}]" for part in rest)


def _bounds(info: Any) -> dict[str, Any]:
    out = {}
    for item in getattr(info, "metadata", []):
        for key in ("gt", "ge", "lt", "le"):
            if getattr(item, key, None) is not None:
                out[key] = getattr(item, key)
    return out
