"""Record formats. Each record becomes one of three examples: a `Conversation` (alpaca and
chat records; rendered later by a chat template), a `Completion` (raw text, every token
trains) or `Tokens` (ids given, with optional labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from tunesmith.config import FIELD_ROLES
from tunesmith.data.sources import DataError, Record

ROLES = ("system", "user", "assistant", "tool")
BUILTIN_ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}
DEFAULT_FIELDS = {fmt: {name: name for name in names} for fmt, names in FIELD_ROLES.items()}
"""Each format's fields under their own names; `data.datasets[i].fields` maps them elsewhere."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    """[{"role": system|user|assistant|tool, "content": text}, ...]"""


@dataclass
class Completion:
    text: str


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int] | None


Example = Union[Conversation, Completion, Tokens]  # noqa: UP007


@dataclass(frozen=True)
class FormatSpec:
    """How to read one source's records: its format, field mapping and role names, and where
    in the config it is (`data.datasets.0`) for error hints."""

    format: str
    fields: dict[str, str]
    roles: dict[str, str]
    system_prompt: str | None = None
    config_path: str = "data.datasets.0"

    def field(self, name: str) -> str:
        return self.fields.get(name, DEFAULT_FIELDS[self.format][name])


def detect_format(record: Record, fields: dict[str, str], config_path: str) -> str:
    """Choose a format from the first record's fields (for `format: auto`)."""
    keys = set(record.data)
    mapped = {v: k for k, v in fields.items()}
    named = {mapped.get(k, k) for k in keys}
    if "input_ids" in named:
        return "tokenized"
    if "messages" in named or "conversations" in keys:
        return "chat"
    if {"instruction", "output"} <= named:
        return "alpaca"
    if "text" in named:
        return "completion"
    if {"chosen", "rejected"} <= named:
        return "preference"
    if {"prompt", "completion", "label"} <= named:
        return "unpaired"
    if "prompt" in named:
        return "prompt"
    raise DataError(
        f"{record.where}: cannot tell the format from fields {sorted(keys)}; set "
        f"{config_path}.format to alpaca, chat, completion, tokenized, preference, "
        f"unpaired or prompt (and map fields with "
        f"{config_path}.fields)"
    )


def parse_record(record: Record, spec: FormatSpec) -> Example:
    """Turn one record into an example, or raise `DataError` naming the record and field."""
    if spec.format == "alpaca":
        return _alpaca(record, spec)
    if spec.format == "chat":
        return _chat(record, spec)
    if spec.format == "completion":
        return Completion(_text(record, spec, "text"))
    return _tokenized(record, spec)


def _get(record: Record, spec: FormatSpec, name: str, required: bool = True) -> Any:
    key = spec.field(name)
    if key not in record.data or (required and record.data[key] is None):
        if not required:
            return None
        raise DataError(
            f'{record.where}: missing field "{key}" ({spec.format} format); add it, or map '
            f"another field with {spec.config_path}.fields.{name}"
        )
    return record.data[key]


def _text(record: Record, spec: FormatSpec, name: str, required: bool = True) -> str | None:
    value = _get(record, spec, name, required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f'{record.where}: field "{spec.field(name)}" must be text, got {type(value).__name__}'
        )
    return value


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _alpaca(record: Record, spec: FormatSpec) -> Conversation:
    instruction = _text(record, spec, "instruction")
    extra = _text(record, spec, "input", required=False)
    output = _text(record, spec, "output")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = _text(record, spec, "system", required=False) or spec.system_prompt
    return Conversation(_with_system(messages, system))


def _chat(record: Record, spec: FormatSpec) -> Conversation:
    key = spec.field("messages")
    if key not in record.data and "messages" not in spec.fields and "conversations" in record.data:
        key = "conversations"  # ShareGPT
    if key not in record.data:
        raise DataError(
            f'{record.where}: missing field "{key}" (chat format); add it, or map another field '
            f"with {spec.config_path}.fields.messages"
        )
    raw = record.data[key]
    if not isinstance(raw, list):
        raise DataError(
            f'{record.where}: field "{key}" must be a list of messages, got {type(raw).__name__}'
        )
    if not raw:
        raise DataError(f'{record.where}: field "{key}" is an empty message list')
    names = {**BUILTIN_ROLE_NAMES, **spec.roles}
    messages = []
    for index, message in enumerate(raw):
        at = f"{record.where}: {key}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected a message object, got {type(message).__name__}")
        role_key = spec.field("role") if spec.field("role") in message else "from"
        content_key = spec.field("content") if spec.field("content") in message else "value"
        if role_key not in message:
            raise DataError(f'{at}: missing "{spec.field("role")}" (or ShareGPT "from")')
        if content_key not in message:
            raise DataError(f'{at}: missing "{spec.field("content")}" (or ShareGPT "value")')
        role = names.get(str(message[role_key]))
        if role is None:
            raise DataError(
                f'{at}: unknown role "{message[role_key]}"; map it to system, user, assistant or '
                f"tool with {spec.config_path}.roles"
            )
        content = message[content_key]
        if isinstance(content, list):  # OpenAI content parts
            parts = [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"
            ]
            if len(parts) != len(content):
                raise DataError(f"{at}: only text content parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise DataError(f'{at}: "{content_key}" must be text, got {type(content).__name__}')
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{record.where}: conversation has no assistant turn, so nothing would train; "
            "fix the roles or map them with " + f"{spec.config_path}.roles"
        )
    system = _text(record, spec, "system", required=False)
    return Conversation(_with_system(messages, system or spec.system_prompt))


def turns_out_of_order(messages: list[dict]) -> bool:
    """Whether a conversation's roles break the expected order: optional system messages
    first, then user and assistant turns alternating from a user turn (tool results may stand
    between turns)."""
    roles = [m["role"] for m in messages]
    start = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    turns = [r for r in roles[start:] if r in ("user", "assistant")]
    return (
        "system" in roles[start:]
        or turns[:1] == ["assistant"]
        or any(a == b for a, b in zip(turns, turns[1:], strict=False))
    )


def _int_list(record: Record, spec: FormatSpec, name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise DataError(f'{record.where}: field "{spec.field(name)}" must be a list of integers')
    return value


def _tokenized(record: Record, spec: FormatSpec) -> Tokens:
    ids = _int_list(record, spec, "input_ids", _get(record, spec, "input_ids"))
    if not ids:
        raise DataError(f'{record.where}: field "{spec.field("input_ids")}" is empty')
    labels = _get(record, spec, "labels", required=False)
    if labels is not None:
        labels = _int_list(record, spec, "labels", labels)
        if len(labels) != len(ids):
            raise DataError(
                f'{record.where}: "{spec.field("labels")}" has {len(labels)} entries but '
                f'"{spec.field("input_ids")}" has {len(ids)}; they must be the same length'
            )
    return Tokens(ids, labels)
