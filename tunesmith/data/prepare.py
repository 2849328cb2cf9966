"""The data pipeline for a run: read each source, parse records, render and tokenize them,
cache the result, split off validation, mix by weight and (optionally) pack.

    prepared = prepare_data(config.data, tokenizer, seed=config.train.seed)
    prepared.train[i]        -> (input_ids, labels) numpy arrays
    prepared.train_rows      -> packed rows of sample indices, when data.packing is on
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tunesmith.config import DataSection, DatasetSource
from tunesmith.data.encode import EncodeSettings, SampleSet, encode_all, first_example
from tunesmith.data.formats import FormatSpec, detect_format, parse_record
from tunesmith.data.pack import pack_groups, packing_efficiency
from tunesmith.data.preference import (
    PREFERENCE_FORMATS,
    encode_preference,
    mapped_record,
)
from tunesmith.data.sources import DataError, read_records, source_fingerprint
from tunesmith.data.templates import resolve_chat_template
from tunesmith.io import atomic_write

CACHE_VERSION = 4  # 4: preference pairs and unpaired examples (flags)
"""Bump when the encoding changes, so old cache entries are not reused."""
PARALLEL_MIN_RECORDS = 5000


@dataclass
class SourceStats:
    path: str
    split: str
    """"train" or "validation"."""
    format: str
    records: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_untrained: int = 0
    dropped_empty_response: int = 0
    """Conversations whose every assistant turn is empty (only end-of-turn text would train)."""
    out_of_order: int = 0
    """Conversations whose roles are out of order (see `formats.turns_out_of_order`)."""
    inexact_template: int = 0
    """Conversations with an assistant turn trained behind a prompt that is not the chat
    template's generation prompt (`templates.render_conversation`)."""
    inexact_example: str = ""
    """The first of them: its location and turn."""
    dropped_message: int = 0
    """Conversations of which the chat template leaves out a system or user message."""
    dropped_example: str = ""
    """The first of them: its location and the message."""
    split_long: int = 0
    from_cache: bool = False


@dataclass
class PreparedData:
    train: SampleSet
    validation: SampleSet | None
    template: str | None
    """The chat template text used (None when no source needed one)."""
    template_name: str
    sources: list[SourceStats]
    train_rows: list[list[int]] | None = None
    """Packed rows (lists of indices into `train`), when packing is on."""
    max_seq_len: int = 0
    group: int = 1
    """Consecutive samples per training unit: 2 for preference pairs (chosen, rejected) and
    for unpaired examples with their mismatched KL sample; see `tunesmith.objectives`."""

    @property
    def packing_efficiency(self) -> float | None:
        if self.train_rows is None:
            return None
        return packing_efficiency(self.train.lengths, self.train_rows, self.max_seq_len)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", "~/.cache/tunesmith/data")).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the tokenizer would encode differently: its full serialisation (fast
    tokenizers) or vocabulary, class and special tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [type(tokenizer).__name__, str(tokenizer.special_tokens_map)]
    special.append(str(getattr(tokenizer, "add_bos_token", None)))
    digest.update(json.dumps(special).encode())
    return digest.hexdigest()


def prepare_data(
    data: DataSection, tokenizer, seed: int = 42, use_cache: bool = True, allow_empty: bool = False
) -> PreparedData:
    """Tokenize every source (or read it from the cache), split validation, mix by weight and
    pack. Raises `DataError` for bad files or records, naming the file and record, and for a
    source of which no sample is left (unless `allow_empty`: the data report's finding)."""
    train_specs = [(f"data.datasets.{i}", s) for i, s in enumerate(data.datasets)]
    val_specs = [(f"data.validation.{i}", s) for i, s in enumerate(data.validation)]
    formats = {at: peek_format(src, at) for at, src in train_specs + val_specs}
    group = _group_of(formats)
    settings, template_name = encode_settings(data, tokenizer, set(formats.values()))
    template = settings.template
    cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    fingerprint = tokenizer_fingerprint(tokenizer)
    rng = np.random.default_rng(seed)
    stats: list[SourceStats] = []

    def prepare(at: str, src: DatasetSource) -> tuple[SampleSet, SourceStats]:
        common = (data, tokenizer, settings, fingerprint, cache_dir, use_cache, allow_empty)
        return _prepare_source(src, at, formats[at], *common)

    train_parts, val_parts = [], []
    for at, src in train_specs:
        samples, st = prepare(at, src)
        stats.append(st)
        if data.val_fraction:
            samples, held_out = _split(samples, data.val_fraction, rng, group)
            val_parts.append(held_out)
        train_parts.append(_weighted(samples, src.weight, rng, group))
    for at, src in val_specs:
        samples, st = prepare(at, src)
        st.split = "validation"
        stats.append(st)
        val_parts.append(samples)

    train = SampleSet.concat(train_parts)
    validation = SampleSet.concat(val_parts) if val_parts else None
    prepared = PreparedData(
        train,
        validation,
        template,
        template_name,
        stats,
        max_seq_len=data.max_seq_len,
        group=group,
    )
    if data.packing:
        prepared.train_rows = pack_groups(train.lengths, data.max_seq_len)
    return prepared


def _group_of(formats: dict[str, str]) -> int:
    """Samples per unit of these sources' formats; mixing preference data with other
    formats is refused, naming the first source of each kind."""
    kinds = {at: fmt in PREFERENCE_FORMATS for at, fmt in formats.items()}
    if len(set(kinds.values())) > 1:
        pref = next(at for at, k in kinds.items() if k)
        other = next(at for at, k in kinds.items() if not k)
        raise DataError(
            f"{pref} is {formats[pref]} data and {other} is {formats[other]} data; a run trains "
            "on one kind: preference objectives on preference or unpaired data, sft on the rest"
        )
    return 2 if any(kinds.values()) else 1


def encode_settings(data: DataSection, tokenizer, formats: set[str]) -> tuple[EncodeSettings, str]:
    """How the sources' `formats` are encoded, and the chat template's name."""
    template, template_name = resolve_chat_template(data.chat_template, tokenizer, formats)
    settings = EncodeSettings(
        max_seq_len=data.max_seq_len,
        truncation=data.truncation,
        train_on_inputs=data.train_on_inputs,
        add_eos=data.add_eos,
        template=template,
        add_bos=template_name != "tokenizer",
        template_kwargs=dict(data.chat_template_kwargs) or None,
    )
    return settings, template_name


def peek_format(src: DatasetSource, at: str) -> str:
    """A source's format: the configured one, or detected from its first record."""
    if src.format != "auto":
        return src.format
    first = next(read_records(src.path, src.split, src.subset, src.revision, max_samples=1), None)
    if first is None:
        raise DataError(f"{src.path}: no records (empty dataset; {at}.path)")
    return detect_format(first, src.fields, at)


def _prepare_source(
    src: DatasetSource,
    at: str,
    fmt: str,
    data: DataSection,
    tokenizer,
    settings: EncodeSettings,
    fingerprint: str,
    cache_dir: Path,
    use_cache: bool,
    allow_empty: bool = False,
) -> tuple[SampleSet, SourceStats]:
    key_parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(src.path, src.split, src.subset, src.revision),
        "format": fmt,
        "fields": src.fields,
        "roles": src.roles,
        "max_samples": src.max_samples,
        "system_prompt": data.system_prompt,
        "tokenizer": fingerprint,
        "settings": settings.__dict__,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = cache_dir / f"{key}.safetensors"
    if use_cache and cache_file.is_file():
        samples, stats = _read_cache(cache_file)
        stats.from_cache, stats.path = True, src.path
        _warn_degenerate(stats)  # a cached source says what it dropped every time
        return samples, stats

    records = list(read_records(src.path, src.split, src.subset, src.revision, src.max_samples))
    if not records:
        raise DataError(f"{src.path}: no records (empty dataset; {at}.path)")
    if fmt in PREFERENCE_FORMATS:
        records = [mapped_record(r, src.fields) for r in records]
        samples, counts = encode_preference(
            records, fmt, tokenizer, settings, data.system_prompt, data.truncation
        )
        stats = _stats(src.path, fmt, len(records), samples, counts)
        stats.truncated = counts["truncated_pairs"]
        if not len(samples) and not allow_empty:
            raise DataError(
                f"{src.path}: no samples left: {_drop_summary(stats)}; check {at} and "
                "data.max_seq_len"
            )
        if use_cache:
            _write_cache(cache_file, samples, stats)
        return samples, stats
    spec = FormatSpec(fmt, src.fields, src.roles, data.system_prompt, at)
    examples = [(parse_record(r, spec), r.where) for r in records]
    # Chat templates render in Python, one core per process (bench/data_prep.py: 2 processes
    # are about 15% faster than 1 on a 2-core machine; spawning costs about a second).
    num_proc = data.num_proc or (
        min(8, os.cpu_count() or 1) if len(records) >= PARALLEL_MIN_RECORDS else 1
    )
    samples, counts = encode_all(examples, tokenizer, settings, num_proc)
    stats = _stats(src.path, fmt, len(records), samples, counts)
    if not len(samples) and not allow_empty:
        raise DataError(
            f"{src.path}: no samples left: {_drop_summary(stats)}; check {at} and data.max_seq_len"
        )
    if use_cache:
        _write_cache(cache_file, samples, stats)
    _warn_degenerate(stats)
    return samples, stats


def _warn_degenerate(stats: SourceStats) -> None:
    """Warn about samples dropped or kept against the rules (counts in `stats`)."""
    path, records = stats.path, stats.records
    if stats.dropped_untrained:
        warnings.warn(
            f"{path}: dropped {stats.dropped_untrained} of {records} samples whose every "
            "label is masked (nothing to train, e.g. the response was truncated away); raise "
            "data.max_seq_len or check the data",
            stacklevel=3,
        )
    if stats.dropped_empty_response:
        warnings.warn(
            f"{path}: dropped {stats.dropped_empty_response} of {records} conversations "
            "whose every assistant turn is empty (only end-of-turn tokens would train); fill in "
            "the responses or remove those records",
            stacklevel=3,
        )
    if stats.inexact_template:
        warnings.warn(
            f"{path}: in {stats.inexact_template} of {records} conversations the chat template "
            "renders an assistant turn behind another prompt than its generation prompt (it "
            "rewrites earlier turns once later ones follow, or renders the turn otherwise than "
            f"its generation prompt begins it; first: {stats.inexact_example}); each such turn "
            "trains as the whole conversation renders it",
            stacklevel=3,
        )
    if stats.dropped_message:
        warnings.warn(
            f"{path}: in {stats.dropped_message} of {records} conversations the chat template "
            f"leaves out a system or user message (first: {stats.dropped_example}), so the "
            "model trains without it (Mistral v0.3 writes the system prompt only into a last "
            "user turn); check the template, or fold the message into a user turn",
            stacklevel=3,
        )
    if stats.out_of_order:
        warnings.warn(
            f"{path}: {stats.out_of_order} of {records} conversations have roles out of "
            "order (an assistant turn before any user turn, two user or two assistant turns in a "
            "row, or a system message after the start); they are kept, and an assistant turn "
            "before any user turn is masked as context, not trained",
            stacklevel=3,
        )


def _stats(path: str, fmt: str, records: int, samples: SampleSet, counts: Counter) -> SourceStats:
    return SourceStats(
        path=path,
        split="train",
        format=fmt,
        records=records,
        samples=len(samples),
        tokens=samples.num_tokens,
        trained_tokens=samples.num_trained_tokens,
        truncated=counts["truncated"],
        dropped_too_long=counts["dropped_too_long"],
        dropped_untrained=counts["dropped_untrained"],
        dropped_empty_response=counts["dropped_empty_response"],
        out_of_order=counts["out_of_order"],
        split_long=counts["split"],
        inexact_template=counts["inexact_template"],
        inexact_example=first_example(counts, "inexact_template"),
        dropped_message=counts["dropped_message"],
        dropped_example=first_example(counts, "dropped_message"),
    )


def _drop_summary(stats: SourceStats) -> str:
    return (
        f"{stats.records} records, {stats.dropped_too_long} dropped as too long, "
        f"{stats.dropped_untrained} dropped with no trained token"
    )


def _samples_of(units: list[int], group: int) -> list[int]:
    return [u * group + k for u in units for k in range(group)]


def _split(samples: SampleSet, fraction: float, rng, group: int = 1) -> tuple[SampleSet, SampleSet]:
    """Hold out `fraction` of the units (samples, or pairs: never half a pair)."""
    n = len(samples) // group
    n_val = max(1, round(n * fraction)) if n > 1 else 0
    order = rng.permutation(n)
    held_out = set(order[:n_val].tolist())
    keep = [i for i in range(n) if i not in held_out]
    return (
        samples.select(_samples_of(keep, group)),
        samples.select(_samples_of(sorted(held_out), group)),
    )


def _weighted(samples: SampleSet, weight: float, rng, group: int = 1) -> SampleSet:
    if weight == 1.0:
        return samples
    n = len(samples) // group
    whole, part = int(weight), weight - int(weight)
    indices = list(range(n)) * whole
    indices += sorted(rng.choice(n, size=round(part * n), replace=False).tolist())
    return samples.select(_samples_of(indices, group))


def _write_cache(path: Path, samples: SampleSet, stats: SourceStats) -> None:
    arrays = {"input_ids": samples.input_ids, "labels": samples.labels, "offsets": samples.offsets}
    if samples.flags is not None:
        arrays["flags"] = samples.flags
    meta = {"stats": json.dumps(stats.__dict__)}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))


def _read_cache(path: Path) -> tuple[SampleSet, SourceStats]:
    with safe_open(str(path), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        stats = SourceStats(**json.loads(f.metadata()["stats"]))
    samples = SampleSet(
        arrays["input_ids"], arrays["labels"], arrays["offsets"], arrays.get("flags")
    )
    return samples, stats


__all__ = ["PreparedData", "SourceStats", "encode_settings", "peek_format", "prepare_data"]
