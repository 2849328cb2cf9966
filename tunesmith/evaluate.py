"""Evaluation: perplexity on a dataset, and generation metrics (exact match, contains,
ROUGE-L) on prompt/answer pairs, for the base model and adapters side by side.

    pairs = prompt_answer_pairs(config.data.validation, config.data, limit=100)
    scores = generation_scores(predictions, [p.answer for p in pairs])
"""

from __future__ import annotations

import re
import string
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tunesmith.adapters import delete_adapter, disabled, load_adapter
from tunesmith.builder import build_model, run_dtypes
from tunesmith.config import DataSection, DatasetSource, RunConfig
from tunesmith.data import prepare_data
from tunesmith.data.formats import Conversation, FormatSpec, detect_format, parse_record
from tunesmith.data.sources import read_records
from tunesmith.data.templates import resolve_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.generation import Sampling, generate_batch, prompt_ids
from tunesmith.io import atomic_write_json
from tunesmith.models import load_model, load_tokenizer, resolve_device
from tunesmith.provenance import resolve_base
from tunesmith.train.loop import evaluate_loss

# --- metrics ---------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation removed."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (longest common subsequence)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, contains (the reference appears in the prediction) and ROUGE-L F1,
    each in [0, 1], after `normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"exact_match": 0.0, "contains": 0.0, "rouge_l": 0.0}
    n = len(references)
    exact = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    contains = sum(
        normalize(r) in normalize(p) for p, r in zip(predictions, references, strict=True)
    )
    rouge = sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": exact / n, "contains": contains / n, "rouge_l": rouge / n}


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
    the prompt. Completion and tokenized sources have no answers and are skipped."""
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
                if fmt not in ("chat", "alpaca"):
                    break
                spec = FormatSpec(fmt, src.fields, src.roles, data.system_prompt, at)
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


def format_table(columns: list[Column], samples: int) -> str:
    rows = [("perplexity", lambda c: f"{c.perplexity:.2f}" if c.perplexity is not None else "-")]
    for key, label in (
        ("exact_match", "exact match"),
        ("contains", "contains"),
        ("rouge_l", "ROUGE-L"),
    ):
        rows.append(
            (
                f"{label} (n={samples})",
                lambda c, key=key: f"{100 * c.scores[key]:.1f}%" if c.scores else "-",
            )
        )
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
    prompts = [prompt_ids(p.messages, template, tokenizer, add_bos) for p in pairs]
    predictions = generate_batch(
        model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens), batch_size
    )
    return generation_scores(predictions, [p.answer for p in pairs]), predictions


def measure(name: str, model, samples, pairs, data, tokenizer, settings: dict) -> Column:
    """One table column: perplexity on `samples` and generation scores on `pairs` (if any).
    `settings`: batch_size, pad_id, device, dtype, max_new_tokens."""

    ppl = evaluate_loss(
        model, samples, settings["batch_size"], settings["pad_id"], settings["device"],
        settings["dtype"],
    )["val_ppl"]  # fmt: skip
    scores = predictions = None
    if pairs:
        scores, predictions = score_model(model, tokenizer, pairs, data, settings["max_new_tokens"])
    return Column(name, ppl, scores, predictions)


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
    atomic_write_json(
        {
            "samples": len(pairs),
            "columns": {c.name: {"perplexity": c.perplexity, **(c.scores or {})} for c in columns},
        },
        run.out / "eval.json",
    )
    return columns


def evaluate_models(
    config: RunConfig,
    adapters: list[str],
    *,
    data_path: str | None = None,
    samples: int = 100,
    max_new_tokens: int | None = None,
    include_base: bool = True,
) -> tuple[list[Column], int]:
    """`tunesmith eval`: perplexity and generation metrics on the run's validation data (or
    `data_path`) for the base model and each adapter (or fully fine-tuned model folder)."""
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
        config.method, model=config.model, train=config.train, device=device,
        compute_dtype=dtype, attach=False, training=False,
    )  # fmt: skip
    settings = {
        "batch_size": config.eval.batch_size or config.train.micro_batch_size,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "device": device,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens or config.eval.max_new_tokens,
    }

    def column(name: str, m) -> Column:
        return measure(name, m, prepared.train, pairs, data, tokenizer, settings)

    columns = [column("base", model)] if include_base else []
    for i, folder in enumerate(adapters):
        path = Path(folder)
        label = path.name if path.name not in ("adapter", "model") else path.parent.name
        columns.append(
            _measure_folder(
                config, model, folder, f"a{i}", (device, dtype), lambda m, lb=label: column(lb, m)
            )
        )
    return columns, len(pairs)


def _measure_folder(config: RunConfig, model, folder: str, name: str, placement, measure_model):
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
    "Column",
    "PromptAnswer",
    "compare_after_training",
    "evaluate_models",
    "format_table",
    "generation_scores",
    "normalize",
    "prompt_answer_pairs",
    "rouge_l",
]
