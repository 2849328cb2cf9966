"""GRPO's data: prompt-only records, `{"prompt": text or messages, ...other columns}`. A text
prompt is one user turn (with `data.system_prompt`, if set); the prompt is encoded as
generation encodes it (the chat template's generation prompt, `generation.prompt_ids`). The
other columns go to the reward functions. Validation prompts come from `data.validation` or
`data.val_fraction`; `weight` repeats or subsamples a source as in supervised runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.preference import message_list
from tunesmith.data.prepare import encode_settings
from tunesmith.data.sources import DataError, Record, read_records
from tunesmith.generation import prompt_ids


@dataclass
class Prompt:
    ids: list[int]
    prompt: Any
    """The record's prompt as given (text or messages): what reward functions receive."""
    columns: dict[str, Any]


@dataclass
class PromptSource:
    path: str
    split: str
    format: str
    records: int
    prompts: int
    dropped_too_long: int


@dataclass
class PromptData:
    train: list[Prompt]
    validation: list[Prompt] | None
    template_name: str
    sources: list[PromptSource] = field(default_factory=list)
    group: int = 1
    train_rows: None = None

    def summary_lines(self, generations: int) -> list[str]:
        lines = [f"chat template: {self.template_name}"]
        for s in self.sources:
            lines.append(
                f"{s.split} source {s.path} (prompt): {s.records:,} records -> {s.prompts:,} "
                f"prompts; dropped {s.dropped_too_long:,} too long for max_seq_len"
            )
        lines.append(
            f"train: {len(self.train):,} prompts, {generations} completions each per round"
        )
        if self.validation:
            lines.append(f"validation: {len(self.validation):,} prompts (one greedy completion)")
        return lines


def read_prompts(data, tokenizer, seed: int, max_completion_tokens: int) -> PromptData:
    """Every source's prompts, encoded; validation split off and weights applied."""
    settings, template_name = encode_settings(data, tokenizer, {"prompt"})
    room = data.max_seq_len - max_completion_tokens
    if room < 1:
        raise DataError(
            f"data.max_seq_len ({data.max_seq_len}) leaves no room for a prompt beside "
            f"objective.max_completion_tokens ({max_completion_tokens}); raise max_seq_len"
        )
    rng = np.random.default_rng(seed)
    sources: list[PromptSource] = []

    def read(at: str, src) -> list[Prompt]:
        if src.format not in ("auto", "prompt"):
            raise DataError(f"{at}.format is {src.format}; objective grpo reads prompt data")
        prompts, records, dropped = [], 0, 0
        prompt_field = src.fields.get("prompt", "prompt")
        for record in read_records(src.path, src.split, src.subset, src.revision, src.max_samples):
            records += 1
            data_ = dict(record.data)
            if prompt_field not in data_:
                raise DataError(
                    f'{record.where}: missing field "{prompt_field}" (prompt format); add it, or '
                    f"map another field with {at}.fields.prompt"
                )
            if prompt_field != "prompt":
                data_["prompt"] = data_.pop(prompt_field)
            messages = message_list(Record(data_, record.where), "prompt", "user")
            system = data_.get(src.fields.get("system", "system")) or data.system_prompt
            if system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
            ids = prompt_ids(
                messages,
                settings.template,
                tokenizer,
                settings.add_bos,
                settings.template_kwargs,
            )
            if len(ids) > room:
                dropped += 1
                continue
            columns = {k: v for k, v in data_.items() if k != "prompt"}
            prompts.append(Prompt(ids, data_["prompt"], columns))
        if records == 0:
            raise DataError(f"{src.path}: no records (empty dataset; {at}.path)")
        if not prompts:
            raise DataError(
                f"{src.path}: every prompt is longer than data.max_seq_len − "
                f"objective.max_completion_tokens ({room} tokens); raise data.max_seq_len"
            )
        sources.append(PromptSource(src.path, src.split, "prompt", records, len(prompts), dropped))
        return prompts

    train, validation = [], []
    for i, src in enumerate(data.datasets):
        prompts = read(f"data.datasets.{i}", src)
        if data.val_fraction:
            n = len(prompts)
            held = set(rng.choice(n, size=max(1, round(n * data.val_fraction)), replace=False))
            validation += [p for j, p in enumerate(prompts) if j in held]
            prompts = [p for j, p in enumerate(prompts) if j not in held]
        if src.weight != 1:
            count = max(1, round(len(prompts) * src.weight))
            whole, rest = divmod(count, len(prompts))
            picked = list(range(len(prompts))) * whole
            picked += sorted(rng.choice(len(prompts), size=rest, replace=False).tolist())
            prompts = [prompts[j] for j in picked]
        train += prompts
    for i, src in enumerate(data.validation):
        found = read(f"data.validation.{i}", src)
        sources[-1].split = "validation"
        validation += found
    return PromptData(train, validation or None, template_name, sources)
