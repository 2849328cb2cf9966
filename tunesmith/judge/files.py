"""Reading the files a run leaves for `tunesmith report` and `tunesmith review` (samples.jsonl,
review.jsonl, eval.json, summary.json, data_report.json, metrics.jsonl), which may be damaged:
a torn last line after a crash, a file overwritten with something else, a number that is
Infinity (Python reads it; JSON.parse does not). Whatever cannot be used is left out with one
warning naming the file and line, so one damaged file never hides the rest of a run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

Warn = Callable[[str], None]
Check = Callable[[dict], "str | None"]
"""What is wrong with a record (one short phrase), or None when it can be used."""


def read_json_lines(path: Path, warn: Warn, check: Check | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for every line of `path` that is a JSON object passing `check`;
    each other non-empty line gives one warning, `path, line N: what is wrong; left out`."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        problem = None
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except ValueError as err:
            torn = number == len(lines)  # no newline after it: the write was cut short
            problem = "a torn last line (cut short by a crash?)" if torn else f"not JSON ({err})"
        else:
            if not isinstance(record, dict):
                problem = "not a JSON object"
            elif check is not None:
                problem = check(record)
        if problem is None:
            out.append((number, record))
        else:
            warn(f"{path}, line {number}: {problem}; left out")
    return out


def read_json_file(path: Path, warn: Warn, check: Check | None = None) -> dict | None:
    """The JSON object in `path`, or None: when it is missing (silently), or damaged (one
    warning, `path: what is wrong; left out of the report`)."""
    if not path.is_file():
        return None
    problem = None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        problem = "not UTF-8 text (a binary file?)"
    except ValueError as err:
        problem = f"not valid JSON ({err})"
    else:
        if not isinstance(data, dict):
            problem = "not a JSON object"
        elif check is not None:
            problem = check(data)
    if problem is None:
        return data
    warn(f"{path}: {problem}; left out of the report")
    return None


def needs(**kinds) -> Check:
    """A check that each named key is present with the given type(s)."""

    def check(record: dict) -> str | None:
        for key, kind in kinds.items():
            if key not in record:
                return f"no {key!r}"
            value = record[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                return f"{key!r} is not {_kind_name(kind)}"
        return None

    return check


def _kind_name(kind) -> str:
    names = {
        str: "a string",
        int: "an integer",
        dict: "a JSON object",
        list: "a list",
        bool: "true or false",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, "a number") for k in kind)
    return names.get(kind, "a number")


def once(warn: Warn) -> Warn:
    """`warn` saying each distinct message once (files read again on every request)."""
    said: set[str] = set()

    def say(message: str) -> None:
        if message not in said:
            said.add(message)
            warn(message)

    return say


def all_finite(record: dict) -> str | None:
    """A check that no number in the record is Infinity or NaN (which Python's JSON reads)."""
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    return None


def finite_json(data):
    """`data` with Infinity and NaN as None, so that JSON.parse reads it."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(v) for v in data]
    return data


__all__ = [
    "all_finite",
    "finite_json",
    "needs",
    "once",
    "read_json_file",
    "read_json_lines",
]
