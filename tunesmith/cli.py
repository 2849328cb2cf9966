"""The `tunesmith` command. Thin: it parses arguments and calls the library. Verbs (train,
merge, export…) arrive with later capabilities."""

from __future__ import annotations

import sys

import typer

from tunesmith import __version__
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


def main() -> None:
    """Console entry point: user errors print one line, no traceback."""
    try:
        app()
    except TunesmithError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
