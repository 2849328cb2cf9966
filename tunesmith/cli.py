"""The `tunesmith` command. Thin: it parses arguments and calls the library. Verbs: `config
schema`, `config check`, `preprocess`; training, merging and export arrive with later
capabilities."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith import __version__
from tunesmith.config import ConfigError
from tunesmith.errors import TunesmithError

app = typer.Typer(
    name="tunesmith",
    help="Fine-tune large language models on the hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tunesmith {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Fine-tune large language models on the hardware you have: LoRA, rsLoRA and DoRA adapters
    in PEFT's format. The Python API (tunesmith.add_lora, save_adapter, load_adapter, merge…)
    is documented in the README."""


config_app = typer.Typer(
    help="Inspect and validate run configs.", no_args_is_help=True, add_completion=False
)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[Path, typer.Argument(help="The run config (YAML).")]
OverridesArg = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4 method.r=8."),
]


@config_app.command("schema")
def config_schema() -> None:
    """Print every config section and field with its type, default and documentation."""
    from tunesmith.config import schema_text

    typer.echo(schema_text(), nl=False)


@config_app.command("check")
def config_check(
    config: ConfigArg,
    overrides: OverridesArg = None,
    show: bool = typer.Option(False, "--show", help="Print the resolved config."),
) -> None:
    """Validate a run config without loading a model: schema, values, and that local data
    files exist."""
    from tunesmith.config import config_yaml, load_config
    from tunesmith.data.sources import local_source_problems

    cfg = load_config(config, overrides or [])
    problems = local_source_problems(cfg.data.datasets, "data.datasets")
    problems += local_source_problems(cfg.data.validation, "data.validation")
    if problems:
        raise ConfigError([f"{config}: {problem}" for problem in problems])
    if show:
        typer.echo(config_yaml(cfg), nl=False)
    method = cfg.method.name + (f" r={cfg.method.r}" if cfg.method.name == "lora" else "")
    typer.echo(
        f"{config}: ok (model {cfg.model.path}, method {method}, "
        f"{len(cfg.data.datasets)} training source(s), lr {cfg.train.lr:g})"
    )


@app.command("preprocess")
def preprocess(
    config: ConfigArg,
    overrides: OverridesArg = None,
    show: int = typer.Option(3, "--show", help="Decoded samples to print."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Tokenize again; ignore the cache."),
) -> None:
    """Tokenize the run's data (filling the cache) and print samples with the masked, not
    trained, spans inside ⟦ ⟧, plus counts: samples, tokens, trained tokens, truncated and
    dropped samples, packing efficiency."""
    import warnings

    from tunesmith.config import load_config
    from tunesmith.data import IGNORE_INDEX, prepare_data, show_sample, summary_lines
    from tunesmith.models import load_tokenizer

    cfg = load_config(config, overrides or [])
    tokenizer = load_tokenizer(cfg.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use_cache=not no_cache)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    for i in range(min(show, len(prepared.train))):
        ids, labels = prepared.train[i]
        trained = int((labels != IGNORE_INDEX).sum())
        typer.echo(f"--- sample {i} ({len(ids)} tokens, {trained} trained; ⟦masked⟧) ---")
        typer.echo(show_sample(ids, labels, tokenizer))
    typer.echo("---")
    for line in summary_lines(prepared):
        typer.echo(line)


def main() -> None:
    """Console entry point: user errors print one line, no traceback."""
    try:
        app()
    except TunesmithError as err:
        for line in str(err).splitlines():
            typer.echo(f"error: {line}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
