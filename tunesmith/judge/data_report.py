"""`tunesmith data report`: what a run's data holds, after the same preparation `train` does:
counts, lengths against max_seq_len, exact and near duplicates (MinHash/LSH, datasketch),
leakage from training into validation, degenerate answers and label balance, with the few
things worth fixing first.

    report = data_report(config, tokenizer)
    print("\\n".join(summary_lines(report)))
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from datasketch import MinHash, MinHashLSH

from tunesmith.config import DatasetSource, RunConfig
from tunesmith.data import prepare_data
from tunesmith.data.encode import IGNORE_INDEX, Trace, encode_examples
from tunesmith.data.formats import (
    Completion,
    Conversation,
    FormatSpec,
    parse_record,
)
from tunesmith.data.preference import (
    PREFERENCE_FORMATS,
    Pair,
    encode_answer,
    encode_pair,
    mapped_record,
    parse_pair,
    parse_unpaired,
)
from tunesmith.data.prepare import encode_settings, peek_format
from tunesmith.data.sources import read_records
from tunesmith.data.templates import end_of_turn_markers
from tunesmith.io import atomic_write
from tunesmith.judge.evaluate import MAX_LABEL_WORDS, normalize
from tunesmith.judge.html import esc, page, svg_histogram, table

NUM_PERM = 128
"""MinHash permutations: the estimate of a Jaccard similarity J has a standard error of
sqrt(J(1-J)/128), at most 0.044."""
SHINGLE = 3
"""Near duplicates compare sets of word 3-grams (the words themselves in shorter texts)."""
SHORT_ANSWER_WORDS = MAX_LABEL_WORDS
"""Answers of at most this many words count as short: labels in classification-like data."""
HTML_LIMIT = 200
"""Record locations the HTML page lists per finding (the JSON report has all)."""


@dataclass
class Item:
    """One record as the report sees it."""

    source: int
    """Index into `DataReport.sources`."""
    number: int
    """1-based record number in its source."""
    where: str
    text: str
    """The whole record, normalized (for duplicates)."""
    prompt: str
    answer: str | None
    trace: Trace
    rejected: str | None = None
    """Preference data: the rejected answer (`answer` is the chosen one)."""
    lengths: tuple[int, int] | None = None
    """Preference data: the chosen and rejected answers' tokens."""
    desirable: bool | None = None
    """Unpaired (KTO) data: the label."""


@dataclass
class Finding:
    key: str
    severity: int
    """0 (worst) to 3: the summary lists findings worst first."""
    count: int
    message: str
    where: list[str] = field(default_factory=list)
    """Locations of all the affected records; for duplicates one line per
    group: "file, line 3 = file, line 9"."""


@dataclass
class SourceReport:
    path: str
    split: str
    format: str
    records: int
    samples: int
    tokens: int
    trained_tokens: int
    truncated: int
    split_long: int
    dropped_too_long: int
    dropped_untrained: int
    dropped_empty_response: int
    out_of_order: int
    prompt_lengths: list[int]
    answer_lengths: list[int]
    answers: dict[str, float] | None = None
    """Share of each distinct short answer when most answers are short, largest first."""
    chosen_longer: float | None = None
    """Preference data: the share of pairs (of those whose answers differ in length) whose
    chosen answer is the longer: far from 0.5, a model can learn length instead of quality."""
    desirable: float | None = None
    """Unpaired (KTO) data: the share of desirable examples."""
    length_pairs: int = 0
    """Preference data: the pairs whose answers differ in length."""


@dataclass
class DataReport:
    config: str
    max_seq_len: int
    truncation: str
    threshold: float
    sources: list[SourceReport]
    findings: list[Finding]
    train_samples: int = 0
    train_trained_tokens: int = 0
    validation_samples: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DataReport:
        fields = {**data}
        fields["sources"] = [SourceReport(**s) for s in data["sources"]]
        fields["findings"] = [Finding(**f) for f in data["findings"]]
        return cls(**fields)


# --- text and similarity ---------------------------------------------------------------------


def _record_text(example) -> tuple[str, str, str | None]:
    """(whole text, prompt, answer) of an example; the answer is the last assistant turn."""
    if isinstance(example, Conversation):
        messages = example.messages
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        whole = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last])
        return normalize_text(whole), normalize_text(prompt), messages[last]["content"]
    if isinstance(example, Completion):
        return normalize_text(example.text), "", None
    text = " ".join(map(str, example.input_ids))
    return text, "", None


def normalize_text(text: str) -> str:
    """Lower case and whitespace collapsed: what counts as the same text."""
    return " ".join(text.lower().split())


def shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < SHINGLE:
        return set(words) or {text}
    return {" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(tokens: set[str]) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([t.encode() for t in tokens])
    return m


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class _Groups:
    """Union-find over item indices."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, i: int) -> int:
        self.parent.setdefault(i, i)
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i in self.parent:
            out[self.find(i)].append(i)
        return sorted((sorted(g) for g in out.values() if len(g) > 1), key=lambda g: g[0])


# --- the report ------------------------------------------------------------------------------


def data_report(
    config: RunConfig, tokenizer, threshold: float = 0.8, config_path: str = ""
) -> DataReport:
    """Prepare the run's data as `train` does (the counts), then look at every record."""
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold must lie in (0, 1], got {threshold}")
    data = config.data
    prepared = prepare_data(data, tokenizer, config.train.seed, allow_empty=True)
    train_sources = [(f"data.datasets.{i}", s, "train") for i, s in enumerate(data.datasets)]
    val_sources = [(f"data.validation.{i}", s, "validation") for i, s in enumerate(data.validation)]
    formats = {peek_format(s, at) for at, s, _ in train_sources + val_sources}
    settings, _ = encode_settings(data, tokenizer, formats)
    items: list[Item] = []
    sources: list[SourceReport] = []
    for index, ((at, src, split), stats) in enumerate(
        zip(train_sources + val_sources, prepared.sources, strict=True)
    ):
        source_items = _read_items(
            index, src, at, data.system_prompt, tokenizer, settings, data.truncation
        )
        items += source_items
        sources.append(_source_report(stats, split, source_items))
    report = DataReport(
        config=config_path,
        max_seq_len=data.max_seq_len,
        truncation=data.truncation,
        threshold=threshold,
        sources=sources,
        findings=[],
        train_samples=len(prepared.train),
        train_trained_tokens=prepared.train.num_trained_tokens,
        validation_samples=len(prepared.validation) if prepared.validation is not None else 0,
    )
    report.findings = _findings(report, items)
    return report


def _read_items(
    index, src: DatasetSource, at, system_prompt, tokenizer, settings, truncation
) -> list[Item]:
    fmt = peek_format(src, at)
    records = list(read_records(src.path, src.split, src.subset, src.revision, src.max_samples))
    if fmt in PREFERENCE_FORMATS:
        records = [mapped_record(r, src.fields) for r in records]
        return _preference_items(index, fmt, records, tokenizer, settings, truncation)
    spec = FormatSpec(fmt, src.fields, src.roles, system_prompt, at)
    examples = [(parse_record(r, spec), r.where) for r in records]
    traces: list[Trace] = []
    encode_examples(examples, tokenizer, settings, Counter(), trace=traces)
    items = []
    for number, ((example, where), trace) in enumerate(zip(examples, traces, strict=True), 1):
        text, prompt, answer = _record_text(example)
        items.append(Item(index, number, where, text, prompt, answer, trace))
    return items


def _text(messages) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _content(messages) -> str:
    return "\n".join(m["content"] for m in messages)


def _preference_items(index, fmt, records, tokenizer, settings, truncation) -> list[Item]:
    """Items of preference pairs (answer: the chosen, rejected: the rejected) or of unpaired
    examples, with what preparation does to each (cut or dropped whole)."""
    items = []
    markers = end_of_turn_markers(tokenizer)
    for number, record in enumerate(records, 1):
        if fmt == "preference":
            pair = parse_pair(record)
            prompt, chosen, rejected, desirable = pair.prompt, pair.chosen, pair.rejected, None
        else:
            one = parse_unpaired(record)
            prompt, chosen, rejected, desirable = one.prompt, one.completion, None, one.desirable
        events: Counter = Counter()
        encoded = encode_pair(
            Pair(prompt, chosen, rejected or chosen), tokenizer, settings, record.where, events,
            truncation, markers,
        )  # fmt: skip
        c_ids, c_labels = encode_answer(prompt, chosen, tokenizer, settings, record.where, markers)
        answer_tokens = sum(t != IGNORE_INDEX for t in c_labels)
        lengths = None
        if rejected is not None:
            _, r_labels = encode_answer(
                prompt, rejected, tokenizer, settings, record.where, markers
            )
            lengths = (answer_tokens, sum(t != IGNORE_INDEX for t in r_labels))
        if encoded is not None and events["truncated_pairs"]:
            events["truncated"] += 1
        trace = Trace(len(c_ids) - answer_tokens, answer_tokens, events)
        whole = _text([*prompt, *chosen, *(rejected or [])])
        items.append(
            Item(
                index,
                number,
                record.where,
                normalize_text(whole),
                normalize_text(_text(prompt)),
                _content(chosen),
                trace,
                rejected=_content(rejected) if rejected is not None else None,
                lengths=lengths,
                desirable=desirable,
            )
        )
    return items


def _source_report(stats, split: str, items: list[Item]) -> SourceReport:
    if stats.format in PREFERENCE_FORMATS:
        longer = [
            it.lengths[0] > it.lengths[1]
            for it in items
            if it.lengths and it.lengths[0] != it.lengths[1]
        ]
        labels = [it.desirable for it in items if it.desirable is not None]
        return SourceReport(
            **_counts(stats, split, items),
            chosen_longer=sum(longer) / len(longer) if longer else None,
            length_pairs=len(longer),
            desirable=sum(labels) / len(labels) if labels else None,
        )
    answers = [normalize(it.answer) for it in items if it.answer is not None]
    short = [a for a in answers if a and len(a.split()) <= SHORT_ANSWER_WORDS]
    shares = None
    if answers and 2 * len(short) >= len(answers):
        counts = Counter(short)
        shares = {a: c / len(short) for a, c in counts.most_common()}
    return SourceReport(**_counts(stats, split, items), answers=shares)


def _counts(stats, split: str, items: list[Item]) -> dict:
    return dict(
        path=stats.path,
        split=split,
        format=stats.format,
        records=stats.records,
        samples=stats.samples,
        tokens=stats.tokens,
        trained_tokens=stats.trained_tokens,
        truncated=stats.truncated,
        split_long=stats.split_long,
        dropped_too_long=stats.dropped_too_long,
        dropped_untrained=stats.dropped_untrained,
        dropped_empty_response=stats.dropped_empty_response,
        out_of_order=stats.out_of_order,
        prompt_lengths=[it.trace.prompt_tokens for it in items],
        answer_lengths=[it.trace.answer_tokens for it in items],
    )


class _Found(list):
    """The findings so far; `add` keeps a finding only when it has records."""

    def add(self, key, severity, where, message, count=None) -> None:
        if where:
            count = len(where) if count is None else count
            self.append(Finding(key, severity, count, message, list(where)))


def _findings(report: DataReport, items: list[Item]) -> list[Finding]:
    split_of = {i: s.split for i, s in enumerate(report.sources)}
    train = [i for i, it in enumerate(items) if split_of[it.source] == "train"]
    val = [i for i, it in enumerate(items) if split_of[it.source] == "validation"]
    found = _Found()
    by_text: dict[str, list[int]] = defaultdict(list)  # training records by their text
    for i in train:
        by_text[_digest(items[i].text)].append(i)
    _leakage(found, items, by_text, val)
    _duplicates(found, items, by_text, val, report.threshold)
    _preparation(found, items, report.max_seq_len)
    _nothing_left(found, report)
    _answers(found, items, report.sources)
    _preferences(found, items, report.sources)
    return sorted(found, key=lambda f: f.severity)


def _leakage(found: _Found, items: list[Item], by_text: dict, val: list[int]) -> None:
    """Validation records that are training records, or ask a training prompt."""
    prompts = {}
    for group in by_text.values():
        for i in group:
            if items[i].prompt:
                prompts.setdefault(_digest(items[i].prompt), i)
    exact = [
        f"{items[i].where} = {items[by_text[_digest(items[i].text)][0]].where}"
        for i in val
        if _digest(items[i].text) in by_text
    ]
    found.add(
        "leakage_exact",
        0,
        exact,
        "validation records identical to a training record (the validation score is "
        "inflated); remove them from one side",
    )
    same_prompt = [
        f"{items[i].where} = {items[prompts[_digest(items[i].prompt)]].where}"
        for i in val
        if items[i].prompt
        and _digest(items[i].prompt) in prompts
        and _digest(items[i].text) not in by_text
    ]
    found.add(
        "leakage_prompt",
        1,
        same_prompt,
        "validation prompts also asked in training (with another answer)",
    )


def _duplicates(found: _Found, items, by_text: dict, val: list[int], threshold: float) -> None:
    """Exact duplicates within training; near duplicates within training and from validation
    into training: one representative per distinct text, LSH candidates checked exactly."""
    exact = [g for g in by_text.values() if len(g) > 1]
    found.add(
        "duplicates_exact",
        1,
        [" = ".join(items[i].where for i in g) for g in exact],
        "groups of identical training records (each repeat trains the same text again); "
        "keep one of each",
        count=sum(len(g) - 1 for g in exact),
    )
    representatives = [g[0] for g in by_text.values()]
    sets = {i: shingles(items[i].text) for i in representatives}
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    hashes = {i: _minhash(sets[i]) for i in representatives}
    for i in representatives:
        lsh.insert(str(i), hashes[i])

    def near(tokens: set[str], minhash: MinHash) -> list[int]:
        return sorted(
            int(k) for k in lsh.query(minhash) if jaccard(tokens, sets[int(k)]) >= threshold
        )

    groups = _Groups()
    for i in representatives:
        for j in near(sets[i], hashes[i]):
            if j != i:
                groups.union(i, j)
    clusters = groups.groups()
    found.add(
        "duplicates_near",
        2,
        [" ~ ".join(items[i].where for i in g) for g in clusters],
        f"groups of near-duplicate training records (word 3-gram Jaccard >= {threshold:g}, "
        "MinHash/LSH); check that they differ on purpose",
        count=sum(len(g) - 1 for g in clusters),
    )
    leaks = []
    for i in val:
        if _digest(items[i].text) in by_text:
            continue  # an exact leak, listed already
        tokens = shingles(items[i].text)
        matches = near(tokens, _minhash(tokens))
        if matches:
            leaks.append(f"{items[i].where} ~ {items[matches[0]].where}")
    found.add(
        "leakage_near",
        1,
        leaks,
        f"validation records nearly identical to a training record (Jaccard >= {threshold:g})",
    )


def _preparation(found: _Found, items: list[Item], max_seq_len: int) -> None:
    """What preparation did to records: dropped, cut, roles out of order, empty answers."""

    def fate(key: str) -> list[str]:
        return [it.where for it in items if it.trace.events[key]]

    found.add(
        "truncated_away",
        0,
        fate("dropped_untrained"),
        f"records whose answer lies past max_seq_len={max_seq_len} (dropped: nothing left "
        "to train); raise data.max_seq_len or shorten the prompts",
    )
    found.add(
        "too_long",
        1,
        fate("dropped_too_long"),
        f"records longer than max_seq_len={max_seq_len}, dropped (truncation: drop)",
    )
    found.add(
        "truncated",
        2,
        fate("truncated"),
        f"records cut at max_seq_len={max_seq_len} (the end of their answer is not trained)",
    )
    found.add(
        "out_of_order",
        1,
        fate("out_of_order"),
        "conversations with roles out of order (system after the start, an assistant "
        "turn first, or two turns of one role in a row)",
    )
    found.add(
        "empty_answer",
        0,
        fate("dropped_empty_response"),
        "conversations whose answers are all empty (dropped)",
    )
    short = [
        it.where
        for it in items
        if it.answer is not None and it.answer.strip() and len(normalize(it.answer)) <= 1
    ]
    found.add("short_answer", 2, short, "answers of one character or less")


def _nothing_left(found: _Found, report: DataReport) -> None:
    """Sources of which preparation keeps no sample (`train` refuses them)."""
    empty = [
        f"{s.path} ({s.split}): {s.records} records, {s.dropped_untrained} with the answer cut "
        f"away, {s.dropped_too_long} too long, {s.dropped_empty_response} with empty answers"
        for s in report.sources
        if s.samples == 0
    ]
    found.add(
        "nothing_left",
        0,
        empty,
        f"sources of which no sample survives preparation (max_seq_len="
        f"{report.max_seq_len}, truncation: {report.truncation}); `tunesmith train` "
        "refuses them: raise data.max_seq_len or fix the records",
    )


def _answers(found: _Found, items: list[Item], sources: list[SourceReport]) -> None:
    """Answers given to many prompts (free-form data; labels repeat by design), and
    imbalanced labels (classification-like data)."""
    for s_index, source in enumerate(sources):
        if source.format in PREFERENCE_FORMATS:  # answers repeat across pairs by design
            continue
        shares = source.answers
        if shares is not None:
            top, low = max(shares.values(), default=0), min(shares.values(), default=0)
            if len(shares) > 1 and top >= 3 * low:
                found.add(
                    "imbalance",
                    2,
                    [source.path],
                    f"{source.path}: labels are imbalanced: {next(iter(shares))!r} "
                    f"{100 * top:.0f}% vs {100 * low:.0f}% for the rarest; a model can "
                    f"score {100 * top:.0f}% by always answering it",
                )
            continue
        answers = [
            normalize(it.answer) for it in items if it.source == s_index and it.answer is not None
        ]
        first = {}
        for it in items:
            if it.source == s_index and it.answer is not None:
                first.setdefault(normalize(it.answer), it.where)
        many = max(5, source.records // 20)
        common = [(a, c) for a, c in Counter(answers).most_common() if c >= many and a]
        found.add(
            "same_answer",
            3,
            [f"{a!r} x{c} (first: {first[a]})" for a, c in common],
            f"records of {source.path} share {len(common)} answers, each given to {many} "
            f"or more of its {source.records} prompts; check that they fit each prompt",
            count=sum(c for _, c in common),
        )


LENGTH_BIAS = 0.15
"""A length-bias finding when the share of pairs whose chosen answer is longer lies this far
or further from one half (in a source with at least `LENGTH_BIAS_PAIRS` such pairs)."""
LENGTH_BIAS_PAIRS = 10


def _preferences(found: _Found, items: list[Item], sources: list[SourceReport]) -> None:
    """Preference data: pairs with nothing to learn, length bias, label balance (KTO)."""
    same = [
        it.where
        for it in items
        if it.rejected is not None and normalize_text(it.answer) == normalize_text(it.rejected)
    ]
    found.add(
        "identical_pair",
        0,
        same,
        "pairs whose chosen and rejected answers are the same (nothing to learn: their loss "
        "is constant); fix or remove them",
    )
    for source in sources:
        share = source.chosen_longer
        pairs = source.length_pairs
        if share is not None and pairs >= LENGTH_BIAS_PAIRS and abs(share - 0.5) >= LENGTH_BIAS:
            which = "longer" if share > 0.5 else "shorter"
            found.add(
                "length_bias",
                2,
                [source.path],
                f"{source.path}: in {100 * max(share, 1 - share):.0f}% of pairs the chosen "
                f"answer is the {which} one; a model can learn length instead of quality "
                "(balance the pairs, or compare with simpo, which normalises by length)",
            )
        if source.desirable is not None and not 0.3 <= source.desirable <= 0.7:
            found.add(
                "label_balance",
                2,
                [source.path],
                f"{source.path}: {100 * source.desirable:.0f}% of examples are desirable; set "
                "objective.desirable_weight and undesirable_weight so that weight x count is "
                "about equal on both sides (the KTO paper keeps it within 1 to 4/3)",
            )


# --- text output -----------------------------------------------------------------------------


def _quantiles(values: list[int]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return f"min {v[0]}, median {pick(0.5)}, p95 {pick(0.95)}, max {v[-1]}"


def summary_lines(report: DataReport, top: int = 5) -> list[str]:
    """The terminal view: one block per source, then the findings worth fixing first."""
    lines = []
    for s in report.sources:
        lines.append(
            f"{s.split} {s.path} ({s.format}): {s.records:,} records -> {s.samples:,} "
            f"samples, {s.trained_tokens:,} trained of {s.tokens:,} tokens"
        )
        lines.append(
            f"  dropped {s.dropped_too_long} too long, {s.dropped_untrained} with the answer "
            f"truncated away, {s.dropped_empty_response} with empty answers; truncated "
            f"{s.truncated}, split {s.split_long}; roles out of order {s.out_of_order}"
        )
        lines.append(f"  prompt tokens: {_quantiles(s.prompt_lengths)}")
        lines.append(f"  answer tokens: {_quantiles(s.answer_lengths)}")
        totals = [p + a for p, a in zip(s.prompt_lengths, s.answer_lengths, strict=True)]
        over = sum(t > report.max_seq_len for t in totals)
        lines.append(f"  records over max_seq_len={report.max_seq_len}: {over}")
        if s.chosen_longer is not None:
            lines.append(
                f"  chosen answer the longer: {100 * s.chosen_longer:.1f}% of the pairs whose "
                "answers differ in length"
            )
        elif s.format == "preference":
            lines.append("  chosen answer the longer: - (every pair's answers are equally long)")
        if s.desirable is not None:
            lines.append(f"  desirable examples: {100 * s.desirable:.1f}%")
        if s.answers:
            shares = ", ".join(f"{a!r} {100 * v:.1f}%" for a, v in list(s.answers.items())[:8])
            more = f" (+{len(s.answers) - 8} more)" if len(s.answers) > 8 else ""
            lines.append(f"  short answers: {shares}{more}")
    lines.append(
        f"near duplicates: word {SHINGLE}-gram Jaccard >= {report.threshold:g} "
        f"(MinHash, {NUM_PERM} permutations, LSH)"
    )
    if not report.findings:
        lines.append("nothing to fix: no duplicates, leakage, truncation or degenerate answers")
        return lines
    lines.append(f"worth fixing first ({len(report.findings)} finding(s)):")
    for f in report.findings[:top]:
        example = f"; e.g. {f.where[0]}" if f.where else ""
        lines.append(f"  - {f.count} {f.message}{example}")
    if len(report.findings) > top:
        lines.append(f"  … and {len(report.findings) - top} more in the HTML or JSON report")
    return lines


# --- HTML and PNG ----------------------------------------------------------------------------


def report_body(report: DataReport) -> str:
    """The report as an HTML fragment (also a section of `tunesmith report`)."""
    parts = [
        f"<p>max_seq_len {report.max_seq_len} (truncation: {esc(report.truncation)}); "
        f"{report.train_samples:,} training samples ({report.train_trained_tokens:,} trained "
        f"tokens), {report.validation_samples:,} validation samples. Near duplicates: word "
        f"{SHINGLE}-gram Jaccard &ge; {report.threshold:g} (MinHash, {NUM_PERM} permutations, "
        "LSH).</p>",
        "<h3>Worth fixing first</h3>",
    ]
    if not report.findings:
        parts.append(
            '<p class="ok">nothing to fix: no duplicates, leakage, truncation or '
            "degenerate answers</p>"
        )
    else:
        items = []
        for f in report.findings:
            where = "".join(f"<li>{esc(w)}</li>" for w in f.where[:HTML_LIMIT])
            hidden = len(f.where) - HTML_LIMIT
            more = (
                f'<li class="muted">… {hidden} more in the JSON report</li>' if hidden > 0 else ""
            )
            items.append(
                f'<li class="sev{f.severity}" data-finding="{esc(f.key)}"><b>{f.count}</b> '
                f"{esc(f.message)}<details><summary>records</summary><ul>{where}{more}</ul>"
                "</details></li>"
            )
        parts.append(f"<ol>{''.join(items)}</ol>")
    counts = [
        ("format", "format"),
        ("records", "records"),
        ("samples", "samples"),
        ("tokens", "tokens"),
        ("trained tokens", "trained_tokens"),
        ("truncated at max_seq_len", "truncated"),
        ("split (truncation: split)", "split_long"),
        ("dropped: too long", "dropped_too_long"),
        ("dropped: answer truncated away", "dropped_untrained"),
        ("dropped: empty answers", "dropped_empty_response"),
        ("roles out of order", "out_of_order"),
    ]
    header = [""] + [f"{s.split}: {s.path}" for s in report.sources]
    rows = [[label] + [getattr(s, key) for s in report.sources] for label, key in counts]
    parts += ["<h3>Counts</h3>", table(header, rows, attrs='id="data-counts"')]
    for s in report.sources:
        parts.append(f"<h3>Lengths: {esc(s.split)} {esc(s.path)}</h3>")
        parts.append(
            svg_histogram(
                {
                    "prompt tokens": s.prompt_lengths,
                    "answer tokens": s.answer_lengths,
                    "total": [
                        p + a for p, a in zip(s.prompt_lengths, s.answer_lengths, strict=True)
                    ],
                },
                limit=report.max_seq_len,
            )
        )
        if s.answers:
            rows = [[a, f"{100 * v:.1f}%"] for a, v in s.answers.items()]
            parts.append("<p>Short answers (share of each distinct answer):</p>")
            parts.append(table(["answer", "share"], rows))
    return "\n".join(parts)


def render_html(report: DataReport) -> str:
    title = f"tunesmith data report: {report.config}" if report.config else "tunesmith data report"
    return page(title, f"<h1>{esc(title)}</h1>\n{report_body(report)}")


def write_png(report: DataReport, path) -> None:
    """Length histograms, one panel per source, with max_seq_len marked (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.sources)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False)
    for ax, s in zip(axes[:, 0], report.sources, strict=True):
        totals = [p + a for p, a in zip(s.prompt_lengths, s.answer_lengths, strict=True)]
        top = max([*totals, report.max_seq_len, 1])
        bins = [top * i / 30 for i in range(31)]
        ax.hist(s.prompt_lengths, bins=bins, alpha=0.55, label="prompt tokens")
        ax.hist(s.answer_lengths, bins=bins, alpha=0.55, label="answer tokens")
        ax.hist(totals, bins=bins, alpha=0.4, label="total")
        ax.axvline(report.max_seq_len, color="#b00020", linestyle="--", label="max_seq_len")
        ax.set_title(f"{s.split}: {s.path}", fontsize=9)
        ax.set_ylabel("records")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("tokens")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


__all__ = [
    "DataReport",
    "Finding",
    "SourceReport",
    "data_report",
    "jaccard",
    "render_html",
    "report_body",
    "shingles",
    "summary_lines",
    "write_png",
]
