"""Showing prepared data to a person: samples decoded with the masked spans marked, and the
counts that catch template and masking mistakes before training."""

from __future__ import annotations

import numpy as np

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.prepare import PreparedData

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


def sample_spans(ids, labels, tokenizer) -> list[tuple[str, bool]]:
    """Decode a sample into (text, trained) spans: consecutive tokens with the same status."""
    ids, trained = np.asarray(ids), np.asarray(labels) != IGNORE_INDEX
    spans, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False)
            spans.append((text, bool(trained[start])))
            start = i
    return spans


def show_sample(ids, labels, tokenizer) -> str:
    """The sample's text with masked (not trained) spans inside ⟦ ⟧."""
    return "".join(
        text if trained else f"{MASK_OPEN}{text}{MASK_CLOSE}"
        for text, trained in sample_spans(ids, labels, tokenizer)
    )


def summary_lines(prepared: PreparedData) -> list[str]:
    """Counts per source and overall: records, samples, tokens, trained tokens, truncated and
    dropped samples, and packing efficiency."""
    lines = [f"chat template: {prepared.template_name}"]
    unit = {"preference": "pairs", "unpaired": "examples (each with its KL sequence)"}
    for s in prepared.sources:
        dropped = s.dropped_too_long + s.dropped_untrained + s.dropped_empty_response
        made = f"{s.samples:,} samples"
        if s.format in unit:  # units of two sequences, kept or dropped whole
            made = f"{s.samples // 2:,} {unit[s.format]}, {s.samples:,} sequences"
        lines.append(
            f"{s.split} source {s.path} ({s.format}): {s.records:,} records -> {made}, "
            f"{s.tokens:,} tokens, {s.trained_tokens:,} trained; truncated {s.truncated:,}, "
            f"split {s.split_long:,}, dropped {dropped:,} "
            f"({s.dropped_too_long:,} too long, {s.dropped_untrained:,} with no trained token, "
            f"{s.dropped_empty_response:,} with empty responses)"
            + (" [cached]" if s.from_cache else "")
        )
    for name, samples in (("train", prepared.train), ("validation", prepared.validation)):
        if samples is not None:
            count = f"{len(samples):,} samples"
            if prepared.group > 1:
                count = f"{len(samples) // prepared.group:,} units of {prepared.group} sequences"
            lines.append(
                f"{name}: {count}, {samples.num_tokens:,} tokens, "
                f"{samples.num_trained_tokens:,} trained tokens"
            )
    if prepared.train_rows is not None:
        lines.append(
            f"packing: {len(prepared.train):,} samples into {len(prepared.train_rows):,} rows of "
            f"{prepared.max_seq_len} tokens, efficiency {prepared.packing_efficiency:.1%}"
        )
    return lines
