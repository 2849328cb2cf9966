"""Preference records, in the shapes TRL names (its "preference" and "unpaired preference"
dataset types), read into messages that a chat template renders:

    {"prompt": ..., "chosen": ..., "rejected": ...}    explicit prompt
    {"chosen": ..., "rejected": ...}                    implicit prompt: the shared beginning
    {"prompt": ..., "completion": ..., "label": true}   unpaired (KTO): a good or a bad answer

Each value is text (standard) or a message list (conversational). A text prompt is one user
turn and a text answer one assistant turn. With an implicit prompt, conversational records
share their leading messages, and text records their leading characters up to the last
whitespace before they differ (the whitespace starts the answers, as TRL splits them).
Any problem is a `DataError` naming the record and the field.

`encode_pair` tokenizes a pair as training sees it: prompt and answer through the chat
template (`encode.conversation_parts`, so the prompt is token for token what generation
sends), only the answer's tokens labelled, both sequences of a pair kept or dropped together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunesmith.data.encode import (
    IGNORE_INDEX,
    EncodeSettings,
    SampleSet,
    bos_prefix,
    conversation_parts,
)
from tunesmith.data.formats import BUILTIN_ROLE_NAMES
from tunesmith.data.sources import DataError, Record
from tunesmith.data.templates import end_of_turn_markers

PAIR_TRUNCATION = ("truncate", "drop")
"""How a pair longer than max_seq_len is kept: `truncate` cuts the answers' ends (both
sequences then fit; at least one answer token each stays), `drop` leaves the pair out."""

Messages = list[dict[str, str]]


@dataclass
class Pair:
    prompt: Messages
    chosen: Messages
    """The better answer's messages (assistant turns, and any tool results between them)."""
    rejected: Messages


@dataclass
class Unpaired:
    prompt: Messages
    completion: Messages
    desirable: bool


def parse_pair(record: Record) -> Pair:
    """A preference record, explicit or implicit prompt, text or messages."""
    data = record.data
    for name in ("chosen", "rejected"):
        if name not in data:
            raise DataError(
                f'{record.where}: missing field "{name}" (preference format: "prompt", '
                '"chosen" and "rejected", or "chosen" and "rejected" sharing the prompt)'
            )
    if "prompt" in data:
        prompt = message_list(record, "prompt", "user")
        return Pair(prompt, _answer(record, "chosen"), _answer(record, "rejected"))
    chosen, rejected = data["chosen"], data["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _shared_text(chosen, rejected)
        if not chosen[:cut].strip():
            raise DataError(
                f'{record.where}: "chosen" and "rejected" share no prompt; give it in a '
                '"prompt" field'
            )
        prompt = [{"role": "user", "content": chosen[:cut]}]
        return Pair(prompt, _assistant(chosen[cut:]), _assistant(rejected[cut:]))
    chosen_messages = message_list(record, "chosen", "assistant")
    rejected_messages = message_list(record, "rejected", "assistant")
    shared = 0
    while (
        shared < min(len(chosen_messages), len(rejected_messages))
        and chosen_messages[shared] == rejected_messages[shared]
    ):
        shared += 1
    while shared and chosen_messages[shared - 1]["role"] == "assistant":
        shared -= 1  # identical answers stay answers: the prompt ends before the last turn
    if shared == 0:
        raise DataError(
            f'{record.where}: "chosen" and "rejected" share no prompt messages; give the prompt '
            'in a "prompt" field'
        )
    prompt = chosen_messages[:shared]
    return Pair(
        prompt,
        _checked_answer(record, "chosen", chosen_messages[shared:]),
        _checked_answer(record, "rejected", rejected_messages[shared:]),
    )


def parse_unpaired(record: Record) -> Unpaired:
    """An unpaired record: a prompt, one answer, and whether the answer is desirable."""
    for name in ("prompt", "completion", "label"):
        if name not in record.data:
            raise DataError(
                f'{record.where}: missing field "{name}" (unpaired format: "prompt", '
                '"completion" and "label", true for a desirable answer)'
            )
    label = record.data["label"]
    if not isinstance(label, bool):
        raise DataError(
            f'{record.where}: field "label" must be true or false, got {json_type(label)}'
        )
    prompt = message_list(record, "prompt", "user")
    return Unpaired(prompt, _answer(record, "completion"), label)


def json_type(value: Any) -> str:
    names = {str: "text", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _shared_text(a: str, b: str) -> int:
    """Where the shared beginning of two texts ends: at the last whitespace before they
    differ, which then starts both answers (so an answer is never empty, nor cut mid-word)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and not a[n - 1].isspace():
        n -= 1
    while n and a[n - 1].isspace():
        n -= 1
    return n


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def _answer(record: Record, name: str) -> Messages:
    return _checked_answer(record, name, message_list(record, name, "assistant"))


def _checked_answer(record: Record, name: str, messages: Messages) -> Messages:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f'{record.where}: field "{name}" holds no assistant message, so nothing would train'
        )
    if messages[0]["role"] == "user":
        raise DataError(
            f'{record.where}: field "{name}" starts with a user message; the answer starts '
            'with the assistant (put the conversation so far in "prompt")'
        )
    return messages


def message_list(record: Record, name: str, text_role: str) -> Messages:
    value = record.data[name]
    if isinstance(value, str):
        return [{"role": text_role, "content": value}]
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else json_type(value)
        raise DataError(
            f'{record.where}: field "{name}" must be text or a list of messages, got {what}'
        )
    messages = []
    for index, message in enumerate(value):
        at = f"{record.where}: {name}[{index}]"
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f'{at}: expected a message with "role" and "content"')
        role = BUILTIN_ROLE_NAMES.get(str(message["role"]))
        if role is None:
            raise DataError(
                f'{at}: unknown role "{message["role"]}"; use system, user, assistant or tool'
            )
        if not isinstance(message["content"], str):
            raise DataError(f'{at}: "content" must be text, got {json_type(message["content"])}')
        messages.append({"role": role, "content": message["content"]})
    return messages


@dataclass
class PairSample:
    """A tokenized pair: ids and labels (IGNORE_INDEX outside the answer) of prompt + chosen
    and of prompt + rejected; the prompt's tokens are the same in both."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def encode_pair(
    pair: Pair,
    tokenizer,
    settings: EncodeSettings,
    where: str,
    stats: Counter,
    truncation: str = "truncate",
    markers: tuple[str, ...] | None = None,
) -> PairSample | None:
    """The pair's samples, or None when it is dropped. Counts in `stats`: pairs,
    truncated_pairs, dropped_too_long (its prompt alone fills max_seq_len, or `drop`).
    `markers`: `templates.end_of_turn_markers(tokenizer)`, when the caller has them."""
    if truncation not in PAIR_TRUNCATION:
        raise ValueError(f"truncation {truncation!r} is not one of {', '.join(PAIR_TRUNCATION)}")
    markers = markers if markers is not None else end_of_turn_markers(tokenizer)
    chosen = encode_answer(pair.prompt, pair.chosen, tokenizer, settings, where, markers)
    rejected = encode_answer(pair.prompt, pair.rejected, tokenizer, settings, where, markers)
    limit = settings.max_seq_len
    longest = max(len(chosen[0]), len(rejected[0]))
    if longest > limit:
        first_answer = min(_first_trained(chosen[1]), _first_trained(rejected[1]))
        if truncation == "drop" or first_answer >= limit:
            stats["dropped_too_long"] += 1
            return None
        stats["truncated_pairs"] += 1
        chosen, rejected = _cut(chosen, limit), _cut(rejected, limit)
    stats["pairs"] += 1
    return PairSample(chosen[0], chosen[1], rejected[0], rejected[1])


def _first_trained(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _cut(sample: tuple[list[int], list[int]], limit: int) -> tuple[list[int], list[int]]:
    return sample[0][:limit], sample[1][:limit]


def encode_answer(
    prompt: Messages,
    answer: Messages,
    tokenizer,
    settings: EncodeSettings,
    where: str,
    markers: tuple[str, ...] | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of the prompt followed by the answer; the prompt's own assistant turns
    are context, masked. `markers`: the tokenizer's end-of-turn texts (looked up when not
    given; finding them reads the whole vocabulary)."""
    parts, _ = conversation_parts(
        [*prompt, *answer],
        settings.template,
        tokenizer,
        settings.add_bos,
        bos_prefix(tokenizer),
        where,
        settings.template_kwargs,
        markers if markers is not None else end_of_turn_markers(tokenizer),
    )
    answer_turns = sum(m["role"] == "assistant" for m in answer)
    responses = sum(1 for _, trained in parts if trained is True)
    ids: list[int] = []
    labels: list[int] = []
    seen = 0
    for part, trained in parts:
        part_ids = (
            list(tokenizer(part, add_special_tokens=False)["input_ids"])
            if isinstance(part, str)
            else list(part)
        )
        if trained is True:
            seen += 1
            trained = seen > responses - answer_turns  # the answer's turns, not the prompt's
        ids += part_ids
        labels += part_ids if trained is True else [IGNORE_INDEX] * len(part_ids)
    return ids, labels


PREFERENCE_FORMATS = ("preference", "unpaired")


def mapped_record(record: Record, fields: dict[str, str]) -> Record:
    """The record with the user's field names (`fields`: {tunesmith's name: yours}) renamed
    to tunesmith's."""
    if not fields:
        return record
    renamed = {yours: ours for ours, yours in fields.items()}
    return Record({renamed.get(k, k): v for k, v in record.data.items()}, record.where)


def _with_system(prompt: Messages, system_prompt: str | None) -> Messages:
    if system_prompt is None or any(m["role"] == "system" for m in prompt):
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


def encode_preference(
    records: list[Record],
    fmt: str,
    tokenizer,
    settings: EncodeSettings,
    system_prompt: str | None = None,
    truncation: str = "truncate",
):
    """A source's records as a SampleSet of units of two consecutive samples, and counts.

    preference: (prompt + chosen, prompt + rejected) per pair. unpaired (KTO): (the example,
    its prompt with the next example's answer), the second a mismatched pair whose log-ratio
    estimates KTO's KL term; flags are 1 on a desirable example. Over-long units are cut at
    the answers' ends or dropped whole (`truncation`)."""
    stats: Counter = Counter()
    samples: list[tuple[list[int], list[int]]] = []
    flags: list[int] = []
    markers = end_of_turn_markers(tokenizer)
    if fmt == "preference":
        units = [(parse_pair(r), r, None) for r in records]
    else:  # each example beside its prompt with the next example's answer
        examples = [parse_unpaired(r) for r in records]
        units = [
            (Pair(e.prompt, e.completion, examples[(i + 1) % len(examples)].completion), r, e)
            for i, (r, e) in enumerate(zip(records, examples, strict=True))
        ]
    for pair, record, example in units:
        pair.prompt = _with_system(pair.prompt, system_prompt)
        encoded = encode_pair(pair, tokenizer, settings, record.where, stats, truncation, markers)
        if encoded is None:
            continue
        samples += [
            (encoded.chosen_ids, encoded.chosen_labels),
            (encoded.rejected_ids, encoded.rejected_labels),
        ]
        if example is not None:
            flags += [int(example.desirable), 0]
            stats["desirable" if example.desirable else "undesirable"] += 1
    result = SampleSet.from_lists(samples)
    if fmt != "preference":
        result.flags = np.asarray(flags, dtype=np.int8)
    return result, stats
