"""The model card of a trained adapter or model (`output_dir/adapter/README.md`, or
`output_dir/model/README.md`): what was trained, on what, how, and how well; rewritten with
the evaluation table when `eval.generate_samples` adds one."""

from __future__ import annotations

from tunesmith.cards import Card, base_license, table
from tunesmith.config import RunConfig
from tunesmith.methods.schema import settings
from tunesmith.objectives import objective_of
from tunesmith.registry import method_of

METRIC_ROWS = (
    ("final_train_loss", "training loss (last step)"),
    ("final_val_loss", "validation loss"),
    ("final_val_ppl", "validation perplexity"),
    ("final_val_reward_accuracy", "validation reward accuracy"),
    ("final_val_reward_margin", "validation reward margin"),
    ("final_val_logps_accuracy", "validation: prefers the chosen answer"),
    ("final_val_kl", "validation KL estimate (KTO)"),
)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_card(config: RunConfig, summary: dict, evaluation: dict | None = None) -> Card:
    """The card of a finished run from its config, its summary and (optionally) the
    base-vs-tuned evaluation table (`eval.json`'s content)."""
    method = method_of(config.method)
    objective = objective_of(config.objective)
    adapter = method.trains_adapter
    reward = objective.output == "score"
    base = config.model.path
    sources = [s.path for s in config.data.datasets]
    tags = [method.label_of(config.method), objective.name]
    if adapter:
        tags.append("peft")
    what = "A reward model (one score per sequence)" if reward else "A fine-tuned model"
    kind = "adapter" if adapter else "model"
    summary_text = (
        f"{what}: a {method.name} {kind} on `{base}`, trained with tunesmith "
        f"(objective {objective.name}, {summary.get('steps')} steps)."
    )
    method_settings = {k: v for k, v in settings(config.method).items() if v not in (None, {}, [])}
    training = [
        ["method", f"`{method.name}` " + ", ".join(f"{k}={v}" for k, v in method_settings.items())],
        ["objective", f"`{objective.name}` " + _objective_settings(config)],
        ["data", ", ".join(f"`{s}`" for s in sources)],
        ["max_seq_len", config.data.max_seq_len],
        ["steps (epochs)", f"{summary.get('steps')} ({summary.get('epochs')})"],
        [
            "batch",
            f"{config.train.micro_batch_size} x {config.train.grad_accum_steps} "
            f"{'units' if not objective.token_level else 'samples'}",
        ],
        ["learning rate", f"{config.train.lr:g}, {config.train.schedule}"],
        ["seed", config.train.seed],
        ["device, dtype", f"{summary.get('device')}, {summary.get('dtype')}"],
        ["time", f"{summary.get('seconds')} s"],
    ]
    results = [[label, _value(summary[key])] for key, label in METRIC_ROWS if key in summary]
    results = [row for row in results if row[1] != "-"]
    sections = [("Training", table(["", ""], training))]
    if results:
        sections.append(("Results", table(["", ""], results)))
    if evaluation:
        sections.append(("Evaluation", evaluation_table(evaluation)))
    sections.append(("Use", _usage(base, adapter, reward)))
    return Card(
        title=config.output_dir.rstrip("/").rsplit("/", 1)[-1] or "tunesmith run",
        base_model=base,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification" if reward else "text-generation",
        tags=tags,
        datasets=sources,
        license=base_license(base),
        summary=summary_text,
        sections=sections,
    )


def _objective_settings(config: RunConfig) -> str:
    values = config.objective.model_dump(exclude={"name"})
    return ", ".join(f"{k}={v}" for k, v in values.items())


def evaluation_table(evaluation: dict) -> str:
    """eval.json's columns as a Markdown table (scores as percentages)."""
    columns = evaluation.get("columns", {})
    names = list(columns)
    keys = [k for k in next(iter(columns.values()), {}) if k != "pairs"]
    rows = []
    for key in keys:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        shown = [
            "-"
            if v is None
            else f"{v:.2f}"
            if key in ("perplexity", "logps_margin")
            else f"{100 * v:.1f}%"
            for v in values
        ]
        rows.append([key, *shown])
    n = evaluation.get("samples")
    return f"On {n} held-out prompts (base and tuned, greedy):\n\n" + table(["", *names], rows)


def _usage(base: str, adapter: bool, reward: bool) -> str:
    if reward and adapter:
        return (
            "```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification\n\n"
            f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels=1)\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n```\n\n'
            "or `tunesmith score path/to/this/folder data.jsonl`."
        )
    if reward:
        return (
            "```python\nfrom transformers import AutoModelForSequenceClassification\n\n"
            'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")\n'
            "```"
        )
    if adapter:
        return (
            "```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n```\n\n'
            'or `tunesmith generate --adapter path/to/this/folder "your prompt"`.'
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```'
    )
