"""Commands that judge data and results: `data report`, `report`, `review` and `bench`. Each
imports what it needs inside (start-up time: `tunesmith --help` loads no torch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.app import ConfigArg, OverridesArg, app, examples
from tunesmith.errors import TunesmithError

data_app = typer.Typer(
    help="Look at a run's data before training.", no_args_is_help=True, add_completion=False
)
app.add_typer(data_app, name="data")

DATA_REPORT_FILE = "data_report.json"


@data_app.command(
    "report",
    epilog=examples(
        "tunesmith data report examples/quickstart.yaml --html outputs/quickstart/data_report.html"
    ),
)
def data_report_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    html: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--html", help="Also write the report as one HTML page.", show_default=False
    ),
    png: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--png", help="Also write the length histograms as a PNG.", show_default=False
    ),
    json_path: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--json", help="Where the JSON report goes (default: output_dir/data_report.json).",
        show_default=False,
    ),  # fmt: skip
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
    target = json_path or Path(cfg.output_dir) / DATA_REPORT_FILE
    typer.echo(f"wrote {atomic_write_json(report.to_json(), target)}")
    if html is not None:
        typer.echo(f"wrote {atomic_write_text(render_html(report), html)}")
    if png is not None:
        write_png(report, png)
        typer.echo(f"wrote {png}")
