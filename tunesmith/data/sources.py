"""Reading records from local files, folders and hub datasets. Every record comes with the
place it was read from (`file, line N` or `file, record index N`), so an error about it can
say where to look."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError, first_line
from tunesmith.paths import looks_local

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(TunesmithError):
    """A problem with training data: a file, a record, a field, or a template."""


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    where: str
    """Human-readable location: "data/train.jsonl, line 12"."""


def is_local(path: str) -> bool:
    """A source is local when it has a data file's suffix or looks like a local path
    (`paths.looks_local`: exists, starts with ./, ../, / or ~, or `dir/name` under a folder
    that exists here); otherwise it is a hub dataset id."""
    return Path(path).suffix in LOCAL_SUFFIXES or looks_local(path)


def local_files(path: str) -> list[Path]:
    """The data files a local source names: the file itself, or the supported files in a
    folder (recursively, in sorted order)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(
                f"{path}: folder has no {', '.join(LOCAL_SUFFIXES)} files; point data.datasets "
                "at a data file or a folder of them"
            )
        return files
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {p.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}"
        )
    return [p]


def local_source_problems(sources, config_key: str) -> list[str]:
    """One line per local source in `sources` (DatasetSource list under `config_key`, e.g.
    "data.datasets") whose files are missing or unreadable; hub ids are not checked."""
    problems = []
    for i, source in enumerate(sources):
        if is_local(source.path):
            try:
                local_files(source.path)
            except DataError as err:
                problems.append(f"{config_key}.{i}.path: {err}")
    return problems


def read_records(
    path: str,
    split: str = "train",
    subset: str | None = None,
    revision: str | None = None,
    max_samples: int | None = None,
) -> Iterator[Record]:
    """The records of one source, lazily, in file order (folders: files in sorted order)."""
    if is_local(path):
        records = itertools.chain.from_iterable(_read_file(f) for f in local_files(path))
    else:
        records = _read_hub(path, split, subset, revision)
    return itertools.islice(records, max_samples)


def _read_file(path: Path) -> Iterator[Record]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _check_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: expected a JSON object (a record with fields), got {type(value).__name__}"
        )
    return value


def _not_utf8(where: str, err: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{where}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the file as "
        "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _decode(path: Path) -> str:
    """A whole file as UTF-8 text; an error names the line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise _not_utf8(f"{path}, line {line}", err) from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(where, err) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON Lines ({err.msg}, column {err.colno}); each line "
                    "must be one JSON object"
                ) from None
            yield Record(_check_mapping(value, where), where)


def _read_json(path: Path) -> Iterator[Record]:
    text = _decode(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        ) from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of records (or an object holding exactly one list)"
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    for index, item in enumerate(value):
        where = f"{path}, record index {index}"
        yield Record(_check_mapping(item, where), where)


def _read_csv(path: Path) -> Iterator[Record]:
    text = _decode(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            return
        for index, row in enumerate(reader):
            yield Record(dict(row), f"{path}, row {index + 1}")
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: not a readable Parquet file ({first_line(err)}); it is damaged, "
            "incomplete or in another format"
        ) from None
    for index, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}, record index {index}")


def _read_hub(path: str, split: str, subset: str | None, revision: str | None) -> Iterator[Record]:
    dataset = _load_hub(path, split, subset, revision)
    for index, row in enumerate(dataset):
        yield Record(dict(row), f"{path}[{split}], record index {index}")


@functools.lru_cache(maxsize=8)
def _load_hub(path: str, split: str, subset: str | None, revision: str | None) -> Any:
    """The split as a `datasets.Dataset`, loaded once per process (format detection, the cache
    fingerprint and reading all ask for it)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{path}: reading hub datasets needs the `datasets` package") from None
    try:
        dataset = datasets.load_dataset(path, subset, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - network, auth, missing split: one line for the user
        raise DataError(
            f"{path}: could not load hub dataset (split {split!r}): {first_line(err)}. For a "
            "local file, "
            "give a path with its suffix (.jsonl, .json, .csv, .parquet)"
        ) from None
    return dataset


def source_fingerprint(path: str, split: str, subset: str | None, revision: str | None) -> str:
    """A hash that changes when the source's content changes: file contents for local
    sources; for hub datasets, the fingerprint `datasets` gives the loaded split."""
    digest = hashlib.sha256()
    if is_local(path):
        for f in local_files(path):
            digest.update(str(f.name).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    else:
        digest.update(json.dumps([path, split, subset, revision]).encode())
        digest.update(
            str(getattr(_load_hub(path, split, subset, revision), "_fingerprint", "")).encode()
        )
    return digest.hexdigest()
