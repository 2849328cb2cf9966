"""Examples to token ids and labels. Labels are -100 where the loss must not count: prompts
(unless `train_on_inputs`), padding, and the first token of every sample (nothing precedes it,
so no position predicts it; this also makes packing exact)."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Union

import numpy as np

from tunesmith.data.formats import Completion, Conversation, Example, turns_out_of_order
from tunesmith.data.sources import DataError
from tunesmith.data.templates import Rendered, end_of_turn_markers, render_conversation

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeSettings:
    max_seq_len: int
    truncation: str = "truncate"
    train_on_inputs: bool = False
    add_eos: bool = True
    template: str | None = None
    add_bos: bool = False
    """Prepend the tokenizer's BOS to rendered conversations (built-in templates; a
    tokenizer's own template writes its BOS itself)."""
    template_kwargs: dict | None = None
    """More arguments for the chat template (`data.chat_template_kwargs`, e.g.
    `enable_thinking: false` for Qwen3)."""


class SampleSet:
    """Samples stored flat: `input_ids` and `labels` (int32) concatenated, and `offsets` (n+1)
    so sample i is `[offsets[i]:offsets[i+1]]`."""

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        flags: np.ndarray | None = None,
    ):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets
        self.flags = flags
        """One int8 per sample, or None: what an objective marks per sample (KTO: 1 on a
        desirable example)."""

    @classmethod
    def from_lists(cls, pairs: list[tuple[list[int], list[int]]]) -> SampleSet:
        lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
        offsets = np.zeros(len(pairs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda k: np.fromiter(  # noqa: E731
            (t for pair in pairs for t in pair[k]), dtype=np.int32, count=int(offsets[-1])
        )
        return cls(flat(0), flat(1), offsets)

    @classmethod
    def concat(cls, parts: list[SampleSet]) -> SampleSet:
        parts = [p for p in parts if len(p)] or [cls.from_lists([])]
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate(
            [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]
        )
        flags = None
        if any(p.flags is not None for p in parts):
            flags = np.concatenate(
                [p.flags if p.flags is not None else np.zeros(len(p), np.int8) for p in parts]
            )
        return cls(
            np.concatenate([p.input_ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            offsets,
            flags,
        )

    def select(self, indices) -> SampleSet:
        """The samples at `indices` (repeats allowed), in that order; vectorised gather."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # token j of the result comes from offsets_in_self[sample] + (j - offsets[sample])
        take = np.arange(offsets[-1]) + np.repeat(self.offsets[idx] - offsets[:-1], lengths)
        flags = self.flags[idx] if self.flags is not None else None
        return SampleSet(self.input_ids[take], self.labels[take], offsets, flags)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.labels[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text on a plain encode (usually [BOS] or [])."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


@dataclass
class Trace:
    """What encoding did to one example (`encode_examples(..., trace=[])`)."""

    prompt_tokens: int = 0
    """Tokens of the parts that are not responses (before max_seq_len)."""
    answer_tokens: int = 0
    """Tokens of the responses (before max_seq_len)."""
    events: Counter = field(default_factory=Counter)
    """The `stats` keys this example added to (samples, truncated, dropped_too_long, …)."""


def encode_examples(
    examples: list[tuple[Example, str]],
    tokenizer,
    settings: EncodeSettings,
    stats: Counter,
    trace: list[Trace] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Examples (with their locations) to samples, in order; an example gives zero samples
    (dropped), one, or several (`truncation: split`). Counts what happened in `stats`
    (samples, truncated, dropped_too_long, dropped_untrained, split). Texts are tokenized in
    batches, one tokenizer call per batch. With `trace`, appends one `Trace` per example."""
    bos = bos_prefix(tokenizer)
    markers = end_of_turn_markers(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(examples), 256):
        batch = []
        for example, where in examples[start : start + 256]:
            record = Trace() if trace is not None else None
            if record is not None:
                trace.append(record)
            if isinstance(example, Conversation):
                if turns_out_of_order(example.messages):
                    _count(stats, record, "out_of_order")
                responses = [m for m in example.messages if m["role"] == "assistant"]
                if all(not m["content"].strip() for m in responses):
                    _count(stats, record, "dropped_empty_response")
                    continue
            batch.append((example, where, record))
        plans = []
        for example, where, record in batch:
            plan, rendered = _plan(example, where, tokenizer, settings, bos, markers)
            if rendered is not None and rendered.inexact:
                turn = rendered.inexact[0]
                _note(stats, record, "inexact_template", f"{where}, assistant turn {turn}")
            if rendered is not None and rendered.dropped:
                at = rendered.dropped[0]
                role = example.messages[at]["role"]
                _note(stats, record, "dropped_message", f"{where}, message {at} ({role})")
            plans.append(plan)
        texts = [part for plan in plans for part, _ in plan if isinstance(part, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for plan, (_, _, record) in zip(plans, batch, strict=True):
            ids: list[int] = []
            labels: list[int] = []
            for part, trained in plan:
                part_ids = list(next(encoded)) if isinstance(part, str) else part
                ids += part_ids
                if isinstance(trained, list):
                    labels += trained
                elif trained or settings.train_on_inputs:
                    labels += part_ids
                else:
                    labels += [IGNORE_INDEX] * len(part_ids)
                if record is not None:
                    answer = (
                        sum(t != IGNORE_INDEX for t in trained)
                        if isinstance(trained, list)
                        else len(part_ids) * bool(trained)
                    )
                    record.answer_tokens += answer
                    record.prompt_tokens += len(part_ids) - answer
            if record is None:
                out += _fit(ids, labels, settings, stats)
            else:
                counts: Counter = Counter()
                out += _fit(ids, labels, settings, counts)
                stats.update(counts)
                record.events.update(counts)
    return out


def _count(stats: Counter, record: Trace | None, key: str) -> None:
    stats[key] += 1
    if record is not None:
        record.events[key] += 1


FIRST = "first "
"""`stats` keys `first <key>:<where>` name the first example counted under <key> (for the
warning that counts them)."""


def _note(stats: Counter, record: Trace | None, key: str, example: str) -> None:
    if not stats[key]:
        stats[f"{FIRST}{key}:{example}"] = 1
    _count(stats, record, key)


def first_example(counts: Counter, key: str) -> str:
    """The example `_note` kept for `key` (the first in sorted order after chunks merged)."""
    prefix = f"{FIRST}{key}:"
    return next((k[len(prefix) :] for k in sorted(counts) if k.startswith(prefix)), "")


Part = tuple[Union[str, list[int]], Union[bool, list[int]]]  # noqa: UP007


def conversation_parts(
    messages: list[dict],
    template: str,
    tokenizer,
    add_bos: bool,
    bos: list[int],
    where: str,
    template_kwargs: dict | None = None,
    markers: tuple[str, ...] | None = None,
) -> tuple[list[Part], Rendered]:
    """A conversation as the template renders it, segment by segment, (text, is_response),
    preceded by the BOS ids (masked) when `add_bos` and the template did not write BOS; and
    the rendering (`templates.render_conversation`: inexact turns, dropped messages).

    Each segment is tokenized on its own, as generation tokenizes the prompt it sends: the
    tokens before a response are those of its prompt alone, whatever the tokenizer would
    merge across the boundary (a byte-level BPE makes "\n\n" one token at the end of a
    prompt and two before a word)."""
    rendered = render_conversation(messages, template, tokenizer, where, template_kwargs, markers)
    segments = rendered.segments()
    wrote_bos = rendered.text.startswith(tokenizer.bos_token or "\0")
    prefix: list[Part] = (
        [(bos, [IGNORE_INDEX] * len(bos))] if add_bos and bos and not wrote_bos else []
    )
    return prefix + list(segments), rendered


def _plan(
    example: Example,
    where: str,
    tokenizer,
    settings: EncodeSettings,
    bos: list[int],
    markers: tuple[str, ...],
) -> tuple[list[Part], Rendered | None]:
    """What a sample is made of: texts still to tokenize with whether they train, or ids with
    their labels; and a conversation's rendering."""
    if isinstance(example, Conversation):
        return conversation_parts(
            example.messages,
            settings.template,
            tokenizer,
            settings.add_bos,
            bos,
            where,
            settings.template_kwargs,
            markers,
        )
    if isinstance(example, Completion):
        eos = tokenizer.eos_token_id
        suffix = [eos] if settings.add_eos and eos is not None else []
        return [(bos, list(bos)), (example.text, True), (suffix, list(suffix))], None
    ids = list(example.input_ids)
    labels = ids if example.labels is None or settings.train_on_inputs else list(example.labels)
    _check_ids(ids, labels, len(tokenizer), where)
    return [(ids, list(labels))], None


def _check_ids(ids: list[int], labels: list[int], vocab: int, where: str) -> None:
    """Token ids must index the vocabulary; labels too, or be IGNORE_INDEX (masked)."""
    for what, values, allowed in (("input_ids", ids, ()), ("labels", labels, (IGNORE_INDEX,))):
        bad = next(
            (i for i, v in enumerate(values) if not 0 <= v < vocab and v not in allowed), None
        )
        if bad is not None:
            masked = f" or {IGNORE_INDEX} (masked)" if allowed else ""
            raise DataError(
                f"{where}: {what}[{bad}] is {values[bad]}, outside the tokenizer's vocabulary "
                f"(0 … {vocab - 1}{masked}); was the data tokenized with another tokenizer?"
            )


def _fit(ids: list[int], labels: list[int], settings: EncodeSettings, stats: Counter):
    """Apply max_seq_len and the truncation policy; mask each piece's first label; drop pieces
    with nothing to train."""
    limit = settings.max_seq_len
    if len(ids) <= limit:
        pieces = [(ids, labels)]
    elif settings.truncation == "drop":
        stats["dropped_too_long"] += 1
        return []
    elif settings.truncation == "split":
        stats["split"] += 1
        pieces = [(ids[i : i + limit], labels[i : i + limit]) for i in range(0, len(ids), limit)]
    else:
        stats["truncated"] += 1
        pieces = [(ids[:limit], labels[:limit])]
    out = []
    for piece_ids, piece_labels in pieces:
        piece_labels = [IGNORE_INDEX, *piece_labels[1:]]
        if all(label == IGNORE_INDEX for label in piece_labels):
            stats["dropped_untrained"] += 1
            continue
        out.append((piece_ids, piece_labels))
    stats["samples"] += len(out)
    return out


def encode_all(
    examples: list[tuple[Example, str]], tokenizer, settings: EncodeSettings, num_proc: int = 1
) -> tuple[SampleSet, Counter]:
    """Encode examples (with their locations) in order, in `num_proc` processes when > 1."""
    if num_proc <= 1 or len(examples) < 2 * num_proc:
        return _encode_chunk(examples, tokenizer, settings)
    size = -(-len(examples) // (num_proc * 4))
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    # spawn, not fork: the parent may hold torch and tokenizer threads.
    with ProcessPoolExecutor(
        num_proc,
        mp_context=get_context("spawn"),
        initializer=_worker_init,
        initargs=(tokenizer, settings),
    ) as pool:
        results = list(pool.map(_worker_encode, chunks))
    stats: Counter = Counter()
    for _, chunk_stats in results:
        stats.update(chunk_stats)
    return SampleSet.concat([samples for samples, _ in results]), stats


def _encode_chunk(examples, tokenizer, settings) -> tuple[SampleSet, Counter]:
    stats: Counter = Counter()
    return SampleSet.from_lists(encode_examples(examples, tokenizer, settings, stats)), stats


_WORKER: dict = {}


def _worker_init(tokenizer, settings) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"], _WORKER["settings"] = tokenizer, settings


def _worker_encode(chunk):
    return _encode_chunk(chunk, _WORKER["tokenizer"], _WORKER["settings"])
