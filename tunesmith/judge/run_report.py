"""`tunesmith report OUTPUT_DIR`: one self-contained HTML page about a run: its config, the
loss / learning-rate / validation curves, the evaluation table, the data report and review
summary when present, and every generated sample with each model's answer side by side,
searchable and filterable by right or wrong."""

from __future__ import annotations

import base64
import csv
import warnings
from collections import Counter
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.judge.data_report import DataReport, report_body
from tunesmith.judge.evaluate import METRICS, SAMPLES_FILE
from tunesmith.judge.files import (
    Warn,
    all_finite,
    needs,
    once,
    read_json_file,
    read_json_lines,
)
from tunesmith.judge.html import esc, json_script, page, svg_lines, table
from tunesmith.judge.review import REVIEW_FILE, SAMPLE_SHAPE, Review, summary_lines

DATA_REPORT_FILE = "data_report.json"
REPORT_FILE = "report.html"
METRIC_SHAPE = needs(step=int)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _metric_shape(entry: dict) -> str | None:
    problem = METRIC_SHAPE(entry) or all_finite(entry)
    for key in ("loss", "val_loss", "lr"):
        value = entry.get(key)
        if problem is None and value is not None and not isinstance(value, int | float):
            problem = f"{key!r} is not a number"
    return problem


def _eval_shape(data: dict) -> str | None:
    columns = data.get("columns")
    if not isinstance(columns, dict) or not all(isinstance(c, dict) for c in columns.values()):
        return "no 'columns' of scores (is it a tunesmith eval.json?)"
    return None


DATA_REPORT_SHAPE = needs(sources=list, findings=list)


def _data_report(data: dict, path: Path, warn: Warn) -> DataReport | None:
    problem = DATA_REPORT_SHAPE(data)
    if problem is None:
        try:
            return DataReport.from_json(data)
        except (KeyError, TypeError, ValueError) as err:
            problem = f"a source or finding of another shape ({err})"
    warn(f"{path}: not a tunesmith data report: {problem}; left out of the report")
    return None


def _curves(metrics: list[dict]) -> str:
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    lr = [(m["step"], m["lr"]) for m in metrics if "lr" in m]
    if not train and not val:
        return '<p class="muted">metrics.jsonl holds no losses</p>'
    out = svg_lines({"train loss": train, "validation loss": val}, "step", "loss")
    return out + _preference_curves(metrics) + svg_lines({"learning rate": lr}, "step", "lr")


PREFERENCE_CURVES = (
    ("reward_accuracy", "reward accuracy"),
    ("reward_margin", "reward margin"),
    ("kl", "KL (KTO's estimate; GRPO's to the reference; distillation's to the teacher)"),
    ("agreement", "agreement with the teacher's top token"),
    ("reward", "reward (GRPO: sampled in training, greedy in validation)"),
    ("completion_length", "completion length (tokens)"),
    ("clip_ratio", "clipped ratio (share of tokens)"),
)
"""An objective's curves: (metrics.jsonl key, label); each drawn for training steps and for
validation (the `val_` key) when the run logged it. GRPO's reward functions add one curve
each (`reward_<function>`)."""
GRPO_SAMPLES = "completions.jsonl"


def _reward_functions(metrics: list[dict]) -> list[tuple[str, str]]:
    """GRPO's per-function reward curves: the `reward_<function>` keys of a run that logged
    completion lengths."""
    if not any("completion_length" in m for m in metrics):
        return []
    names = sorted(
        {k for m in metrics for k in m if k.startswith("reward_") and not k.endswith("_std")}
    )
    return [(k, f"reward {k.removeprefix('reward_')}") for k in names]


def _prompt_text(prompt) -> str:
    """A prompt as text: itself, or a message list's last message."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def _completions_section(path: Path, warn: Warn) -> str:
    """GRPO's sampled validation completions (`completions.jsonl`), newest step first."""
    rows = [r for _, r in read_json_lines(path, warn, needs(step=int, completion=str))]
    rows.sort(key=lambda r: -r["step"])
    body = [
        [str(r["step"]), _prompt_text(r.get("prompt")), r["completion"], _fmt(r.get("reward"))]
        for r in rows
    ]
    return table(["step", "prompt", "completion", "reward"], body)


def _preference_curves(metrics: list[dict]) -> str:
    parts = []
    for key, label in (*PREFERENCE_CURVES, *_reward_functions(metrics)):
        lines = {
            f"train {label}": [(m["step"], m[key]) for m in metrics if key in m],
            f"validation {label}": [
                (m["step"], m[f"val_{key}"]) for m in metrics if f"val_{key}" in m
            ],
        }
        lines = {name: points for name, points in lines.items() if points}
        if lines:
            parts.append(svg_lines(lines, "step", label))
    return "".join(parts)


def _eval_table(evaluation: dict) -> str:
    columns = evaluation.get("columns", {})
    names = list(columns)
    n = evaluation.get("samples")
    rows = [["perplexity"] + [_fmt(columns[c].get("perplexity"), ppl=True) for c in names]]
    pairs = next((columns[c]["pairs"] for c in names if "pairs" in columns[c]), None)
    if pairs is not None:  # preference data: which answer each model finds more likely
        rows.append(
            [f"prefers chosen (n={pairs} pairs)"]
            + [_fmt(columns[c].get("prefers_chosen")) for c in names]
        )
    for key, label in METRICS.items():
        values = [columns[c].get(key) for c in names]
        if all(v is None for v in values):
            continue
        rows.append([f"{label} (n={n})"] + [_fmt(v) for v in values])
    return table([""] + names, rows, attrs='id="eval-table"')


def _plain(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _fmt(value, ppl: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if ppl else f"{100 * value:.1f}%"


def _samples_section(samples: list[dict]) -> str:
    if not samples:
        return '<p class="muted">no samples.jsonl (train with eval.generate_samples &gt; 0)</p>'
    columns = list(samples[0]["answers"])
    options = "".join(
        f'<option value="{esc(c)}:right">{esc(c)} right</option>'
        f'<option value="{esc(c)}:wrong">{esc(c)} wrong</option>'
        for c in columns
    )
    if len(columns) >= 2:
        options += '<option value="differ">answers differ</option>'
    header = "".join(f"<th>{esc(c)}</th>" for c in columns)
    return (
        '<p><input id="search" type="search" placeholder="search prompts and answers" size="40"> '
        f'<select id="filter"><option value="all">all samples</option>{options}</select> '
        '<span id="count" class="muted"></span></p>'
        '<div style="max-height:40em;overflow:auto"><table id="samples" style="width:100%">'
        "<thead><tr><th>#</th><th>prompt</th>"
        f"<th>reference</th>{header}</tr></thead><tbody></tbody></table></div>"
        + json_script("samples-data", samples)
    )


SAMPLES_SCRIPT = r"""
const samples = JSON.parse(document.getElementById("samples-data")?.textContent || "[]");
const body = document.querySelector("#samples tbody");
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text; td.style.whiteSpace = "pre-wrap";
  if (cls) td.className = cls;
  return td;
}
function render() {
  if (!body) return;
  const q = document.getElementById("search").value.toLowerCase();
  const f = document.getElementById("filter").value;
  body.innerHTML = "";
  let shown = 0;
  for (const s of samples) {
    const prompt = s.messages.map((m) => `${m.role}: ${m.content}`).join("\n");
    const answers = Object.values(s.answers);
    const hay = [prompt, s.reference, ...answers].join("\n").toLowerCase();
    if (q && !hay.includes(q)) continue;
    if (f === "differ" && new Set(answers).size < 2) continue;
    if (f.includes(":")) {
      const [name, want] = f.split(":");
      if (s.exact[name] !== (want === "right")) continue;
    }
    const tr = document.createElement("tr");
    tr.dataset.index = s.index;
    tr.appendChild(cell(String(s.index)));
    tr.appendChild(cell(prompt));
    tr.appendChild(cell(s.reference));
    for (const [name, text] of Object.entries(s.answers))
      tr.appendChild(cell(text, s.exact[name] ? "ok" : "bad"));
    body.appendChild(tr);
    shown += 1;
  }
  document.getElementById("count").textContent = `${shown} of ${samples.length} samples`;
}
if (body) {
  document.getElementById("search").addEventListener("input", render);
  document.getElementById("filter").addEventListener("change", render);
  render();
}
"""


def read_samples(output_dir: Path, warn: Warn = _warn) -> list[dict]:
    """The records of output_dir/samples.jsonl that have its shape; each damaged line gives one
    warning through `warn`."""
    return [r for _, r in read_json_lines(output_dir / SAMPLES_FILE, warn, SAMPLE_SHAPE)]


SWEEP_TRIALS = "sweep/trials.csv"
SWEEP_PLOTS = {
    "history": "Optimisation history",
    "importances": "Parameter importances",
    "parallel": "Parallel coordinates",
}
"""The images `tunesmith sweep` draws beside trials.csv (sweep/<name>.png)."""


def _sweep_section(path: Path, warn: Warn) -> str:
    """`tunesmith sweep`'s trial table (sweep/trials.csv) and its plots, inline."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        warn(f"{path}: not readable ({err}); left out")
        return '<p class="muted">trials.csv is damaged</p>'
    if not rows:
        return '<p class="muted">no trial yet</p>'
    header = list(rows[0])
    states = Counter(r.get("state", "") for r in rows)
    parts = [
        "<p>"
        + esc(", ".join(f"{n} {state}" for state, n in states.items()))
        + f" ({len(rows)} trials; the best config: {esc(path.parent / 'best.yaml')})</p>",
        table(header, [[_plain_cell(r.get(k, "")) for k in header] for r in rows], numeric_from=2),
    ]
    for name, label in SWEEP_PLOTS.items():
        image = path.parent / f"{name}.png"
        if image.is_file():
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            parts.append(
                f'<h3>{esc(label)}</h3><img alt="{esc(label)}" style="max-width:100%" '
                f'src="data:image/png;base64,{data}">'
            )
    return "\n".join(parts)


def _plain_cell(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    return text if value.is_integer() and "." not in text else f"{value:.4g}"


def render_report(output_dir: str | Path, warn: Warn = _warn) -> str:
    """The page for the run in `output_dir` (at least its config.yaml or metrics.jsonl).
    Damaged files are left out, each with one warning through `warn` naming file and line."""
    warn = once(warn)
    out = Path(output_dir)
    if not out.is_dir():
        raise TunesmithError(f"{out}: no such folder (give a run's output_dir)")
    config = out / "config.yaml"
    names = ("config.yaml", "metrics.jsonl", "eval.json", SWEEP_TRIALS)
    if not any((out / n).is_file() for n in names):
        raise TunesmithError(
            f"{out}: holds no run (no config.yaml, metrics.jsonl, eval.json or "
            f"{SWEEP_TRIALS}); give a run's output_dir or a `tunesmith eval --save` folder"
        )
    title = f"tunesmith report: {out}"
    parts = [f"<h1>{esc(title)}</h1>"]
    summary = read_json_file(out / "summary.json", warn)
    if summary:
        keys = [
            "method",
            "steps",
            "epochs",
            "tokens",
            "tokens_per_s",
            "seconds",
            "final_train_loss",
            "final_val_loss",
            "final_val_ppl",
            "objective",
            "final_val_reward_accuracy",
            "final_val_reward_margin",
            "final_val_logps_accuracy",
            "final_val_kl",
            "final_val_agreement",
            "final_val_reward",
            "final_val_completion_length",
            "trainable_parameters",
            "total_parameters",
            "device",
            "dtype",
        ]
        rows = [[k, _plain(summary[k])] for k in keys if k in summary]
        parts += ['<h2 id="summary">Summary</h2>', table(["", "value"], rows)]
    if (out / SWEEP_TRIALS).is_file():
        parts += ['<h2 id="sweep">Sweep</h2>', _sweep_section(out / SWEEP_TRIALS, warn)]
        if not (out / "metrics.jsonl").is_file() and not config.is_file():
            return page(title, "\n".join(parts), SAMPLES_SCRIPT)  # a sweep's folder alone
    metrics = out / "metrics.jsonl"
    parts.append('<h2 id="curves">Curves</h2>')
    if metrics.is_file():
        parts.append(_curves([r for _, r in read_json_lines(metrics, warn, _metric_shape)]))
    else:
        parts.append('<p class="muted">no metrics.jsonl</p>')
    evaluation = read_json_file(out / "eval.json", warn, _eval_shape)
    parts.append('<h2 id="evaluation">Evaluation</h2>')
    parts.append(
        _eval_table(evaluation)
        if evaluation
        else '<p class="muted">no eval.json (train with eval.generate_samples &gt; 0)</p>'
    )
    bench = read_json_file(out / "bench" / "table.json", warn, needs(header=list, rows=list))
    if bench:
        parts.append('<h2 id="bench">Benchmarks (lm-evaluation-harness)</h2>')
        parts.append(table(bench["header"], bench["rows"]))
    data = read_json_file(out / DATA_REPORT_FILE, warn)
    report = data and _data_report(data, out / DATA_REPORT_FILE, warn)
    if report:
        parts += ['<h2 id="data">Data report</h2>', report_body(report)]
    if (out / GRPO_SAMPLES).is_file():
        parts += [
            '<h2 id="completions">Completions (GRPO validation)</h2>',
            _completions_section(out / GRPO_SAMPLES, warn),
        ]
    samples = read_samples(out, warn)
    if (out / REVIEW_FILE).is_file() and samples and len(samples[0]["answers"]) >= 2:
        a, b = list(samples[0]["answers"])[:2]
        try:
            review = Review(out, a, b, warn)
            lines = summary_lines(review.summary(), a, b)
            parts += ['<h2 id="review">Blind review</h2>', f"<pre>{esc(chr(10).join(lines))}</pre>"]
        except TunesmithError:
            pass  # nothing to review: the two answered alike everywhere
    parts += [f'<h2 id="samples-title">Samples ({len(samples)})</h2>', _samples_section(samples)]
    if config.is_file():
        parts += ['<h2 id="config">Config</h2>', f"<pre>{esc(config.read_text())}</pre>"]
    return page(title, "\n".join(parts), SAMPLES_SCRIPT)


__all__ = ["DATA_REPORT_FILE", "REPORT_FILE", "SWEEP_TRIALS", "read_samples", "render_report"]
