"""Evaluation: perplexity on a dataset, and generation metrics on prompt/answer pairs (exact
match, contains, accuracy on classification-like answers, BLEU and chrF from sacrebleu,
ROUGE-1/2/L from rouge-score), for the base model and adapters side by side.

    pairs = prompt_answer_pairs(config.data.validation, config.data, limit=100)
    scores = generation_scores(predictions, [p.answer for p in pairs])
"""

from __future__ import annotations

import functools
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.adapters import delete_adapter, disabled, load_adapter
from tunesmith.builder import build_model, run_dtypes
from tunesmith.config import DataSection, DatasetSource, RunConfig
from tunesmith.data import prepare_data
from tunesmith.data.formats import Conversation, FormatSpec, detect_format, parse_record
from tunesmith.data.preference import mapped_record, parse_pair
from tunesmith.data.sources import read_records
from tunesmith.data.templates import resolve_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.generation import Sampling, prompt_ids
from tunesmith.io import atomic_write_json, atomic_write_text
from tunesmith.models import load_model, load_tokenizer, resolve_device
from tunesmith.objectives.answers import normalize
from tunesmith.provenance import resolve_base
from tunesmith.serve.offline import generate_texts
from tunesmith.train.logps import sequence_logps
from tunesmith.train.loss import autocast_for, evaluate_loss
from tunesmith.train.objective import unit_batches

# --- metrics ---------------------------------------------------------------------------------

MAX_LABELS = 20
"""At most this many distinct reference answers (each of at most `MAX_LABEL_WORDS` words, and
each repeated on average) make the answers classification-like, scored by accuracy."""
MAX_LABEL_WORDS = 3

METRICS = {
    "exact_match": "exact match",
    "contains": "contains",
    "accuracy": "accuracy",
    "bleu": "BLEU",
    "chrf": "chrF",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rouge_l": "ROUGE-L",
}
"""Score keys (eval.json, `generation_scores`) and their row labels, in table order."""


def label_set(references: list[str]) -> list[str] | None:
    """The distinct normalized answers when the references are classification-like (a few
    short labels, each used more than once on average), longest first; else None."""
    labels = sorted({normalize(r) for r in references}, key=lambda x: (-len(x), x))
    if (
        not labels
        or len(labels) > MAX_LABELS
        or 2 * len(labels) > len(references)
        or any(len(label.split()) > MAX_LABEL_WORDS for label in labels)
    ):
        return None
    return labels


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label a free-form answer gives: the longest label the normalized answer starts
    with as whole words ("Positive. The review..." gives "positive"), or None."""
    text = normalize(prediction)
    for label in labels:  # longest first
        if text.startswith(label) and not text[len(label) : len(label) + 1].isalnum():
            return label
    return None


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Scores in [0, 1]: mean exact match and contains (the reference appears in the
    prediction) after `normalize`; accuracy (the `predicted_label` is the reference's) when the
    references are classification-like, else None; corpus BLEU and chrF (sacrebleu, default
    settings, divided by 100); mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score, no
    stemming)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return dict.fromkeys(METRICS, 0.0) | {"accuracy": None}
    n = len(references)
    pairs = list(zip(predictions, references, strict=True))
    exact = sum(normalize(p) == normalize(r) for p, r in pairs)
    contains = sum(normalize(r) in normalize(p) for p, r in pairs)
    labels = label_set(references)
    accuracy = None
    if labels is not None:
        accuracy = sum(predicted_label(p, labels) == normalize(r) for p, r in pairs) / n
    import sacrebleu

    rouge = [_rouge().score(r, p) for p, r in pairs]  # score(target, prediction)
    return {
        "exact_match": exact / n,
        "contains": contains / n,
        "accuracy": accuracy,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100,
        "rouge1": sum(s["rouge1"].fmeasure for s in rouge) / n,
        "rouge2": sum(s["rouge2"].fmeasure for s in rouge) / n,
        "rouge_l": sum(s["rougeL"].fmeasure for s in rouge) / n,
    }


# --- data ------------------------------------------------------------------------------------


@dataclass
class PromptAnswer:
    messages: list[dict]
    """The conversation up to (not including) the last assistant turn."""
    answer: str
    where: str


def prompt_answer_pairs(
    sources: list[DatasetSource], data: DataSection, limit: int | None = None, key: str = ""
) -> list[PromptAnswer]:
    """The last assistant turn of each chat/alpaca record as the answer, the turns before as
    the prompt; for preference pairs, the prompt and the chosen answer. Completion, tokenized
    and unpaired sources have no reference answers and are skipped."""
    pairs: list[PromptAnswer] = []
    for i, src in enumerate(sources):
        at = f"{key}.{i}" if key else src.path
        records = read_records(src.path, src.split, src.subset, src.revision, src.max_samples)
        fmt = src.format
        spec = None
        for record in records:
            if spec is None:
                if fmt == "auto":
                    fmt = detect_format(record, src.fields, at)
                if fmt not in ("chat", "alpaca", "preference"):
                    break
                spec = FormatSpec(fmt, src.fields, src.roles, data.system_prompt, at)
            if fmt == "preference":
                pair = parse_pair(mapped_record(record, src.fields))
                chosen = [m["content"] for m in pair.chosen if m["role"] == "assistant"]
                pairs.append(PromptAnswer(pair.prompt, chosen[-1], record.where))
                if limit is not None and len(pairs) >= limit:
                    return pairs
                continue
            example = parse_record(record, spec)
            if not isinstance(example, Conversation):
                continue
            last = max(
                (j for j, m in enumerate(example.messages) if m["role"] == "assistant"),
                default=None,
            )
            if last is None or last == 0:
                continue
            pairs.append(
                PromptAnswer(
                    example.messages[:last], example.messages[last]["content"], record.where
                )
            )
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


# --- side-by-side comparison -----------------------------------------------------------------


@dataclass
class Column:
    name: str
    perplexity: float | None = None
    scores: dict | None = None
    predictions: list[str] | None = None
    preference: dict | None = None
    """Preference data: `prefers_chosen` (the share of pairs whose chosen answer has the higher
    log-probability) and `logps_margin` (the mean of chosen minus rejected), no reference
    needed, so base and tuned models compare directly."""


def format_table(columns: list[Column], samples: int) -> str:
    rows = [("perplexity", lambda c: f"{c.perplexity:.2f}" if c.perplexity is not None else "-")]

    def score(c: Column, key: str) -> str:
        value = (c.scores or {}).get(key)
        return "-" if value is None else f"{100 * value:.1f}%"

    if any(c.preference for c in columns):
        n = next(c.preference["pairs"] for c in columns if c.preference)

        def pref(c: Column, key: str, percent: bool) -> str:
            value = (c.preference or {}).get(key)
            return "-" if value is None else f"{100 * value:.1f}%" if percent else f"{value:.3f}"

        rows.append((f"prefers chosen (n={n} pairs)", lambda c: pref(c, "prefers_chosen", True)))
        rows.append(
            ("log-prob margin (chosen - rejected)", lambda c: pref(c, "logps_margin", False))
        )
    for key, label in METRICS.items():
        if key == "accuracy" and all((c.scores or {}).get(key) is None for c in columns):
            continue  # the answers are not classification-like
        rows.append((f"{label} (n={samples})", lambda c, key=key: score(c, key)))
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(c.name), 8) for c in columns]
    lines = [
        "  ".join([" " * width0] + [c.name.rjust(w) for c, w in zip(columns, widths, strict=True)])
    ]
    for label, cell in rows:
        lines.append(
            "  ".join(
                [label.ljust(width0)]
                + [cell(c).rjust(w) for c, w in zip(columns, widths, strict=True)]
            )
        )
    return "\n".join(lines)


def _template_and_bos(data: DataSection, tokenizer) -> tuple[str, bool]:

    template, name = resolve_chat_template(data.chat_template, tokenizer, {"chat"})
    return template, name != "tokenizer"


def score_model(model, tokenizer, pairs, data: DataSection, max_new_tokens: int, batch_size=16):

    template, add_bos = _template_and_bos(data, tokenizer)
    kwargs = data.chat_template_kwargs
    prompts = [prompt_ids(p.messages, template, tokenizer, add_bos, kwargs) for p in pairs]
    predictions = generate_texts(
        model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens), batch_size
    )
    return generation_scores(predictions, [p.answer for p in pairs]), predictions


def measure(name: str, model, samples, pairs, data, tokenizer, settings: dict) -> Column:
    """One table column: perplexity on `samples` and generation scores on `pairs` (if any).
    `settings`: batch_size, pad_id, device, dtype, max_new_tokens."""

    preference = None
    if settings.get("group", 1) > 1:  # preference pairs: perplexity of the chosen answers
        preference = pair_preference(model, samples, settings)
        samples = samples.select(range(0, len(samples), 2))
    ppl = evaluate_loss(
        model,
        samples,
        settings["batch_size"],
        settings["pad_id"],
        settings["device"],
        settings["dtype"],
    )["val_ppl"]
    scores = predictions = None
    if pairs:
        scores, predictions = score_model(model, tokenizer, pairs, data, settings["max_new_tokens"])
    return Column(name, ppl, scores, predictions, preference)


@torch.no_grad()
def pair_preference(model, samples, settings: dict) -> dict:
    """How often `model` gives the chosen answer of each pair the higher log-probability."""
    chosen, rejected = [], []
    for batch in unit_batches(samples, 2, settings["batch_size"], settings["pad_id"]):
        batch = {k: v.to(settings["device"]) for k, v in batch.items()}
        with autocast_for(str(settings["device"]).split(":")[0], settings["dtype"]):
            rows = sequence_logps(model, batch)
        c, r = rows.pairs()
        chosen += c.tolist()
        rejected += r.tolist()
    n = len(chosen)
    return {
        "pairs": n,
        "prefers_chosen": sum(a > b for a, b in zip(chosen, rejected, strict=True)) / max(n, 1),
        "logps_margin": sum(a - b for a, b in zip(chosen, rejected, strict=True)) / max(n, 1),
    }


def compare_after_training(run, echo) -> list[Column]:
    """The end of `tunesmith train` with eval.generate_samples: base vs tuned on the held-out
    prompts (perplexity and generation metrics), a table, and sample generations."""
    cfg: RunConfig = run.config
    if not cfg.data.validation:
        echo("eval.generate_samples: skipped, data.validation names no held-out file")
        return []
    pairs = prompt_answer_pairs(cfg.data.validation, cfg.data, cfg.eval.generate_samples)
    if not pairs:
        echo("eval.generate_samples: skipped, the validation data has no prompt/answer pairs")
        return []
    settings = {
        "batch_size": cfg.eval.batch_size or cfg.train.micro_batch_size,
        "pad_id": run.pad_id,
        "device": run.device,
        "dtype": run.dtype,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "group": run.prepared.group if run.prepared.train.flags is None else 1,
    }
    val = run.prepared.validation
    if run.method.trains_adapter:  # the same model with its adapter switched off
        base_model, base_only = run.model, disabled(run.model)
    else:
        base_model, base_only = load_model(cfg.model, run.device, run.dtype).eval(), nullcontext()
    with base_only:
        base = measure("base", base_model, val, pairs, cfg.data, run.tokenizer, settings)
    tuned = measure("tuned", run.model, val, pairs, cfg.data, run.tokenizer, settings)
    columns = [base, tuned]
    echo(format_table(columns, len(pairs)))
    for i in range(min(cfg.eval.show_samples, len(pairs))):
        echo(f"--- sample {i}: {pairs[i].messages[-1]['content']}")
        echo(f"    reference: {pairs[i].answer}")
        for column in columns:
            echo(f"    {column.name}: {column.predictions[i]}")
    run.trackers.log_eval(save_evaluation(run.out, pairs, columns))
    return columns


SAMPLES_FILE = "samples.jsonl"
"""Every generated answer of the end-of-training comparison, one prompt per line: what
`tunesmith report` and `tunesmith review` show."""


def save_evaluation(folder: Path, pairs: list[PromptAnswer], columns: list[Column]) -> dict:
    """The table as folder/eval.json and every answer as folder/samples.jsonl; returns the
    table (what trackers get)."""
    evaluation = {
        "samples": len(pairs),
        "columns": {
            c.name: {"perplexity": c.perplexity, **(c.scores or {}), **(c.preference or {})}
            for c in columns
        },
    }
    atomic_write_json(evaluation, folder / "eval.json")
    write_samples(folder / SAMPLES_FILE, pairs, columns)
    return evaluation


def write_samples(path: Path, pairs: list[PromptAnswer], columns: list[Column]) -> Path:
    """One JSON line per pair: index, where (file and line), messages (the prompt), reference,
    answers {column: text} and exact {column: exact match}; written atomically."""
    lines = []
    for i, pair in enumerate(pairs):
        answers = {c.name: c.predictions[i] for c in columns if c.predictions is not None}
        lines.append(
            json.dumps(
                {
                    "index": i,
                    "where": pair.where,
                    "messages": pair.messages,
                    "reference": pair.answer,
                    "answers": answers,
                    "exact": {
                        k: normalize(v) == normalize(pair.answer) for k, v in answers.items()
                    },
                },
                ensure_ascii=False,
            )
        )
    return atomic_write_text("".join(line + "\n" for line in lines), path)


def evaluate_models(
    config: RunConfig,
    adapters: list[str],
    *,
    data_path: str | None = None,
    samples: int = 100,
    max_new_tokens: int | None = None,
    include_base: bool = True,
    save_dir: str | Path | None = None,
) -> tuple[list[Column], int]:
    """`tunesmith eval`: perplexity and generation metrics on the run's validation data (or
    `data_path`) for the base model and each adapter (or fully fine-tuned model folder). With
    `save_dir`, the table goes to save_dir/eval.json and every answer to samples.jsonl (what
    `tunesmith report` and `tunesmith review` read)."""
    sources = config.data.validation
    if data_path is not None:
        sources = [DatasetSource(path=data_path)]
    if not sources:
        raise TunesmithError(
            "no evaluation data: set data.validation in the run config or pass --data FILE"
        )
    data = config.data.model_copy(
        update={"datasets": sources, "validation": [], "val_fraction": 0.0, "packing": False}
    )
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_data(data, tokenizer, config.train.seed)
    pairs = prompt_answer_pairs(sources, data, samples)
    device = resolve_device(config.model.device)
    dtype = run_dtypes(config, device).compute
    model = build_model(
        config.method,
        model=config.model,
        train=config.train,
        device=device,
        compute_dtype=dtype,
        attach=False,
        training=False,
    )
    settings = {
        "batch_size": config.eval.batch_size or config.train.micro_batch_size,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "device": device,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens or config.eval.max_new_tokens,
        "group": prepared.group,
    }
    if prepared.group > 1 and prepared.train.flags is not None:
        raise TunesmithError(
            "tunesmith eval: unpaired (KTO) data has no pairs to compare; evaluate on preference "
            "pairs (--data FILE) or chat data"
        )

    def column(name: str, m) -> Column:
        return measure(name, m, prepared.train, pairs, data, tokenizer, settings)

    columns = [column("base", model)] if include_base else []
    for i, folder in enumerate(adapters):
        label = adapter_label(folder)
        columns.append(
            measure_folder(
                config, model, folder, f"a{i}", (device, dtype), lambda m, lb=label: column(lb, m)
            )
        )
    if save_dir is not None:
        names = [c.name for c in columns]
        if len(set(names)) != len(names):
            raise TunesmithError(
                f"--save: two columns are both called {max(names, key=names.count)!r} (named "
                "after their folders); give the folders different names"
            )
        save_evaluation(Path(save_dir), pairs, columns)
    return columns, len(pairs)


def adapter_label(folder: str) -> str:
    """A column's name: the folder's, or its parent's for a run's adapter/ or model/."""
    path = Path(folder)
    return path.name if path.name not in ("adapter", "model") else path.parent.name


def measure_folder(config: RunConfig, model, folder: str, name: str, placement, measure_model):
    """`measure_model` of the base with the adapter in `folder` (loaded as `name`, then
    removed: each adapter alone on the base, since LoRA and IA3 may target the same modules),
    or of the fully fine-tuned model in `folder` (loaded with `placement`: device, dtype)."""
    path = Path(folder)
    if not path.is_dir():
        raise TunesmithError(f"--adapter: {folder}: no such folder")
    if (path / "adapter_config.json").is_file():
        resolve_base(config.model.path, [folder], "")  # warns if trained on another base
        load_adapter(model, path, name=name)
        try:
            return measure_model(model)
        finally:
            delete_adapter(model, name)
    if (path / "config.json").is_file():  # a fully fine-tuned model
        section = config.model.model_copy(update={"path": str(path)})
        return measure_model(load_model(section, *placement).eval())
    raise TunesmithError(
        f"--adapter: {folder} holds neither an adapter (adapter_config.json) nor a model "
        "(config.json)"
    )


__all__ = [
    "METRICS",
    "Column",
    "adapter_label",
    "PromptAnswer",
    "compare_after_training",
    "evaluate_models",
    "format_table",
    "generation_scores",
    "label_set",
    "measure_folder",
    "normalize",
    "predicted_label",
    "prompt_answer_pairs",
    "save_evaluation",
    "write_samples",
]
