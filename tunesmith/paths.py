"""Paths built from names a user gives (adapter names, files inside a run folder) and the checks
that keep them inside their folder; and telling local paths from hub ids."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunesmith.errors import TunesmithError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
NAME_RULE = (
    "1 to 64 characters: letters, digits, _ and -, not starting with - (no dots, slashes, "
    "spaces or ~)"
)


def check_name(name: object, what: str = "adapter name") -> str:
    """`name` if it is a plain name (`NAME_RULE`): one path component that cannot leave the
    folder it is joined to, and no dot (adapter names are module attribute names too)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise TunesmithError(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


def inside(folder: str | os.PathLike, *parts: str, what: str = "path") -> Path:
    """`folder/parts…`, checked after resolving links and `..`: it must lie inside `folder`."""
    root = Path(folder)
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise TunesmithError(f"{what} {path} leads outside {root} (to {resolved}); refusing")
    return path


def looks_local(source: str) -> bool:
    """Whether a model/adapter/tokenizer/dataset reference is meant as a local path rather than
    a hub id (`org/name` or `name`): it starts with `.`, `/` or `~`, has more than one `/`, uses
    a backslash, exists on disk, or is `dir/name` where `dir` is a folder here (as
    `examples/tiny-llama` is in this repository)."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    if Path(source).expanduser().exists():
        return True
    return "/" in source and Path(source.split("/", 1)[0]).is_dir()


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it, after resolving links and `..`."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def model_source(source: str, key: str, want: str = "folder") -> str:
    """A model/tokenizer reference made safe to load: an existing local path becomes absolute
    (so what is recorded from it means the same from any folder); a path that does not exist
    is refused here, never sent to the hub; a hub id passes, unless HF_HUB_OFFLINE is set.
    `key` names the setting in messages (model.path, --model, --base)."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_local(source) or not HUB_ID.fullmatch(source):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise TunesmithError(f"{key}: {source}: no such {want}{where}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise TunesmithError(
            f"{key}: {source} is not a local {want}, and HF_HUB_OFFLINE is set, so the hub is "
            "not asked; give a local checkpoint folder or unset HF_HUB_OFFLINE"
        )
    return source


def plain_name(text: str) -> str:
    """`text` made into a name that passes `check_name` (other characters become _); "" when
    nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64].lstrip("-")
    return name if NAME_PATTERN.fullmatch(name) else ""
