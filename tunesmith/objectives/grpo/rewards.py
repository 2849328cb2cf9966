"""GRPO's reward functions: the built-ins and user functions named `module:function` or
`path/to/file.py:function`, all called as TRL calls them:

    reward(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` have one entry per completion (a prompt repeats for each of its
group's completions): text, or for a conversational prompt its messages and the completion as
`[{"role": "assistant", "content": text}]`. `columns` holds every other field of the records,
as lists in the same order, and `completion_ids` (the generated token ids). None marks a
completion a function does not score; it counts as 0 in the total and is left out of the
function's mean. A function that raises, or returns the wrong number of values, stops the run
with one line naming it."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunesmith.errors import TrainingError
from tunesmith.objectives.answers import normalize

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _column(columns: dict, name: str, reward: str) -> list:
    if name not in columns:
        known = ", ".join(sorted(k for k in columns if k != "completion_ids")) or "none"
        raise TrainingError(
            f"reward {reward}: the data has no column {name!r} (its columns: {known}); set "
            f"objective.rewards[].column"
        )
    return columns[name]


def exact_match(column: str):
    def reward(prompts, completions, **columns):
        answers = _column(columns, column, "exact_match")
        return [
            float(normalize(_text(c)) == normalize(str(a)))
            for c, a in zip(completions, answers, strict=True)
        ]

    return reward


def numeric_match(column: str):
    def reward(prompts, completions, **columns):
        answers = _column(columns, column, "numeric_match")
        out = []
        for c, a in zip(completions, answers, strict=True):
            got, want = _number(_text(c)), _number(str(a))
            out.append(float(got is not None and want is not None and math.isclose(got, want)))
        return out

    return reward


def regex(pattern: str):
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, **columns):
        return [float(compiled.fullmatch(_text(c).strip()) is not None) for c in completions]

    return reward


def length(limit: int):
    def reward(prompts, completions, completion_ids=None, **columns):
        lengths = [len(ids) for ids in completion_ids]
        return [-min(1.0, max(0, n - limit) / limit) for n in lengths]

    return reward


def load_function(name: str) -> Callable:
    """`module:function` (imported) or `path/to/file.py:function` (loaded from the file)."""
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise TrainingError(f"reward {name}: no file {path}")
            key = f"tunesmith_rewards_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except TrainingError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's module: say which and why
        raise TrainingError(
            f"reward {name}: cannot import {where}: {type(err).__name__}: {err}"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise TrainingError(f"reward {name}: {where} has no function {attr!r}")
    return function


class Rewards:
    """The run's reward functions, their labels and weights."""

    def __init__(self, specs):
        self.specs = list(specs)
        self.functions: list[Callable] = []
        self.labels: list[str] = []
        for spec in self.specs:
            if spec.function == "exact_match":
                fn = exact_match(spec.column)
            elif spec.function == "numeric_match":
                fn = numeric_match(spec.column)
            elif spec.function == "regex":
                fn = regex(spec.pattern)
            elif spec.function == "length":
                fn = length(spec.limit)
            else:
                user = load_function(spec.function)
                fn = (lambda f, kw: lambda *a, **k: f(*a, **k, **kw))(user, spec.kwargs)
            label = spec.label
            while label in self.labels:
                label += "_"
            self.functions.append(fn)
            self.labels.append(label)
        self.weights = np.array([s.weight for s in self.specs], dtype=np.float64)

    def score(self, prompts: list, completions: list, columns: dict) -> np.ndarray:
        """(completions, functions) rewards; NaN where a function returned None."""
        n = len(completions)
        out = np.zeros((n, len(self.functions)), dtype=np.float64)
        for j, (fn, spec) in enumerate(zip(self.functions, self.specs, strict=True)):
            try:
                values = fn(prompts, completions, **columns)
            except TrainingError:
                raise
            except Exception as err:  # noqa: BLE001 - the user's function: name it
                raise TrainingError(
                    f"reward {spec.function} raised {type(err).__name__}: {err}; fix the "
                    "function (it is called as f(prompts, completions, **columns))"
                ) from None
            try:
                values = list(values)
            except TypeError:
                values = None
            if values is None or len(values) != n:
                got = "a non-list" if values is None else f"{len(values)} values"
                raise TrainingError(
                    f"reward {spec.function} returned {got} for {n} completions; it must "
                    "return one float (or None) per completion"
                )
            for i, v in enumerate(values):
                try:
                    out[i, j] = math.nan if v is None else float(v)
                except (TypeError, ValueError):
                    raise TrainingError(
                        f"reward {spec.function} returned {v!r} for completion {i}; it must "
                        "return floats (or None)"
                    ) from None
        return out

    def total(self, scores: np.ndarray) -> np.ndarray:
        """The weighted sum per completion (None counts as 0)."""
        return np.nansum(scores * self.weights[None, :], axis=1)
