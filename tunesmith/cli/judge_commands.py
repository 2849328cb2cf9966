"""Commands that judge data and results: `data report`, `report`, `review` and `bench`. Each
imports what it needs inside (start-up time: `tunesmith --help` loads no torch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.app import (
    AdapterOpt,
    AllowedHostOpt,
    ConfigArg,
    OverridesArg,
    RequestTimeoutOpt,
    app,
    examples,
)
from tunesmith.errors import TunesmithError

IncludeOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--include", help="A folder of task YAML files (repeatable).", show_default=False),
]

data_app = typer.Typer(
    help="Look at a run's data before training.", no_args_is_help=True, add_completion=False
)
app.add_typer(data_app, name="data")


@data_app.command(
    "report",
    epilog=examples(
        "tunesmith data report examples/quickstart.yaml --html outputs/quickstart/data_report.html"
    ),
)
def data_report_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    html: Optional[str] = typer.Option(  # noqa: UP045
        None, "--html", help="Also write the report as one HTML page.", show_default=False
    ),
    png: Optional[str] = typer.Option(  # noqa: UP045
        None, "--png", help="Also write the length histograms as a PNG.", show_default=False
    ),
    json_path: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--json",
        help="Where the JSON report goes (default: output_dir/data_report.json).",
        show_default=False,
    ),
    threshold: float = typer.Option(
        0.8, "--threshold", help="Near duplicates: word 3-gram Jaccard similarity at least this."
    ),
    top: int = typer.Option(5, "--top", help="Findings listed in the terminal summary."),
) -> None:
    """Counts, lengths against max_seq_len, exact and near duplicates, training-validation
    leakage, degenerate answers and label balance of the run's data, after the preparation
    `train` does; the few things worth fixing first. The JSON report (in output_dir, where
    `tunesmith report` finds it) lists every affected record."""
    from tunesmith.config import load_config
    from tunesmith.io import atomic_write_json, atomic_write_text
    from tunesmith.judge.data_report import data_report, render_html, summary_lines, write_png
    from tunesmith.judge.run_report import DATA_REPORT_FILE
    from tunesmith.models import load_tokenizer

    if not 0 < threshold <= 1:
        raise TunesmithError(f"--threshold must lie in (0, 1], got {threshold:g}")
    cfg = load_config(config, overrides or [])
    tokenizer = load_tokenizer(cfg.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report counts what preparation warns about
        report = data_report(cfg, tokenizer, threshold, config_path=str(config))
    for line in summary_lines(report, top):
        typer.echo(line)
    target = Path(json_path) if json_path else Path(cfg.output_dir) / DATA_REPORT_FILE
    typer.echo(f"wrote {atomic_write_json(report.to_json(), target)}")
    if html is not None:
        typer.echo(f"wrote {atomic_write_text(render_html(report), html)}")
    if png is not None:
        write_png(report, png)
        typer.echo(f"wrote {png}")


@app.command(
    "report",
    epilog=examples(
        "tunesmith report outputs/quickstart", "tunesmith report outputs/a --out a.html"
    ),
)
def report_cmd(
    output_dir: str = typer.Argument(..., help="A run's output_dir."),
    out: Optional[str] = typer.Option(  # noqa: UP045
        None, "--out", help="The HTML file (default: OUTPUT_DIR/report.html).", show_default=False
    ),
) -> None:
    """One self-contained HTML page about a run (it opens without network): config, loss /
    learning-rate / validation curves, the evaluation table, the data report and the blind
    review's summary when present, and every generated sample with base and tuned answers
    side by side, searchable and filterable by right or wrong."""
    from tunesmith.io import atomic_write_text
    from tunesmith.judge.run_report import REPORT_FILE, render_report

    target = Path(out) if out else Path(output_dir) / REPORT_FILE
    text = render_report(output_dir, warn=_warn_line)
    typer.echo(f"wrote {atomic_write_text(text, target)}")


def _warn_line(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@app.command(
    "review",
    epilog=examples(
        "tunesmith review outputs/quickstart",
        "tunesmith review outputs/quickstart --a base --b tuned --port 8100",
        "tunesmith review outputs/quickstart --summary",
    ),
)
def review_cmd(
    output_dir: str = typer.Argument(..., help="A run's output_dir (with samples.jsonl)."),
    a: str = typer.Option("base", "--a", help="Model A: a column of samples.jsonl."),
    b: Optional[str] = typer.Option(  # noqa: UP045
        None, "--b", help="Model B (default: the other column, e.g. tuned).", show_default=False
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8100, "--port", help="Port to bind."),
    api_key: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--api-key",
        envvar="TUNESMITH_API_KEY",
        show_default=False,
        help="Required to bind another address than 127.0.0.1; the page takes it as ?key=.",
    ),
    summary: bool = typer.Option(False, "--summary", help="Print the votes' summary and exit."),
    allowed_host: AllowedHostOpt = None,
    request_timeout: RequestTimeoutOpt = 30.0,
) -> None:
    """A local page for blind A/B review of two models' answers to the run's held-out
    prompts: random left/right order, votes by click or key (1 left better, 2 right better,
    3 tie, 4 both bad), saved as cast to OUTPUT_DIR/review.jsonl; a reload resumes. Open
    http://127.0.0.1:PORT/?reviewer=NAME; each reviewer's votes are kept apart. The summary
    is model B's win rate over A among decisive votes, with a 95% interval."""
    from tunesmith.judge.files import once
    from tunesmith.judge.review import Review, summary_lines
    from tunesmith.judge.review_app import build_review_app
    from tunesmith.judge.run_report import read_samples
    from tunesmith.serve.guard import LOOPBACK, allowed_hosts, check_bind, check_settings
    from tunesmith.serve.runner import bind, serve_forever

    warn = once(_warn_line)
    samples = read_samples(Path(output_dir), warn)
    if b is None:
        others = [c for c in (samples[0]["answers"] if samples else {}) if c != a]
        b = others[0] if others else "tuned"
    review = Review(Path(output_dir), a, b, warn)
    if summary:
        for line in summary_lines(review.summary(), a, b):
            typer.echo(line)
        return
    check_bind(host, api_key, "the review page")
    check_settings({}, {"--request-timeout": request_timeout})
    sock = bind(host, port)
    typer.echo(
        f"{len(review.items)} prompts to review ({a} vs {b}; {review.identical} with identical "
        f"answers left out); votes go to {review.log.path}"
    )
    shown = "127.0.0.1" if host in LOOPBACK else host
    key = f"&key={api_key}" if api_key else ""
    typer.echo(f"open http://{shown}:{port}/?reviewer=YOUR_NAME{key}   (Ctrl-C stops)")
    hosts = allowed_hosts(host, allowed_host or [])
    serve_forever(build_review_app(review, api_key, hosts, request_timeout), sock, request_timeout)


@app.command(
    "bench",
    epilog=examples(
        "tunesmith bench examples/quickstart.yaml --tasks tunesmith_words",
        "tunesmith bench run.yaml --tasks arc_easy,mmlu --limit 200 --adapter outputs/a/adapter",
    ),
)
def bench_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    tasks: str = typer.Option(
        ..., "--tasks", help="Comma-separated harness tasks (bundled: tunesmith_words)."
    ),
    adapter: AdapterOpt = None,
    limit: Optional[int] = typer.Option(  # noqa: UP045
        None, "--limit", min=1, help="At most this many examples per task.", show_default=False
    ),
    num_fewshot: Optional[int] = typer.Option(  # noqa: UP045
        None,
        "--num-fewshot",
        min=0,
        help="Few-shot examples (default: the task's).",
        show_default=False,
    ),
    include: IncludeOpt = None,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Harness batch size."),
    chat_template: Optional[bool] = typer.Option(  # noqa: UP045
        None,
        "--chat-template/--no-chat-template",
        show_default=False,
        help="Wrap prompts in the run's chat template (default: when it has one).",
    ),
    no_base: bool = typer.Option(False, "--no-base", help="Leave out the base model column."),
    out: Optional[str] = typer.Option(  # noqa: UP045
        None, "--out", help="Results folder (default: output_dir/bench).", show_default=False
    ),
) -> None:
    """Benchmark tasks through lm-evaluation-harness (the bench extra) on the base
    model and each adapter side by side, the adapter attached in memory. Writes the harness's
    results JSON per model and a table to output_dir/bench. Without --adapter, the run's own
    output_dir/adapter (or output_dir/model) is measured."""
    from tunesmith.config import load_config
    from tunesmith.judge.harness import bench_table, format_bench_table, run_bench, write_bench

    cfg = load_config(config, overrides or [])
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise TunesmithError("--tasks: name at least one task, e.g. --tasks tunesmith_words")
    adapters = list(adapter or [])
    if not adapters:
        for name in ("adapter", "model"):
            if (Path(cfg.output_dir) / name).is_dir():
                adapters.append(str(Path(cfg.output_dir) / name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        columns = run_bench(
            cfg,
            names,
            adapters,
            include=include,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            chat_template=chat_template,
            include_base=not no_base,
        )
    typer.echo(format_bench_table(bench_table(columns)))
    target = Path(out) if out else Path(cfg.output_dir) / "bench"
    for path in write_bench(columns, target):
        typer.echo(f"wrote {path}")
