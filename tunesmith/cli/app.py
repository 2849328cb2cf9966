"""The `tunesmith` Typer app: its root, the options commands share, and `main`, the console
entry point (user errors print one line, no traceback). The commands are in
`run_commands.py` and `model_commands.py`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith import __version__
from tunesmith.errors import ProcessesFailed, TrainingInterrupted, TunesmithError


def examples(*commands: str) -> str:
    """A command's help epilog: its examples, one paragraph each."""
    return "\n\n".join(f"Example: {command}" for command in commands)


def _flags_without_type() -> None:
    """typer 0.2x shows a `<bool>` type beside on/off flags (--overwrite <bool>), which reads as
    if the flag took a value; show flags bare, as click does."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_tunesmith", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._tunesmith = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()

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
    """Fine-tune large language models on the hardware you have: plan, prepare data, train
    (LoRA, rsLoRA, DoRA, QLoRA, prompt, prefix, bottleneck, IA3 or full), evaluate, merge and
    combine, quantize and export; adapters in PEFT's format. The Python API (tunesmith.add_lora,
    save_adapter, load_adapter, merge…) is documented in docs/api.md."""


config_app = typer.Typer(
    help="Inspect and validate run configs.", no_args_is_help=True, add_completion=False
)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[Path, typer.Argument(help="The run config (YAML).")]
OverridesArg = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4 method.r=8."),
]


AdapterOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--adapter", help="Adapter folder (repeat for several).", show_default=False),
]


ModelOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--model",
        help="Base model folder or hub id (default: the adapter's base).",
        show_default=False,
    ),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest reply.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")]  # noqa: UP045
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
ThreadsOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--threads",
        show_default=False,
        help="CPU threads for the model, pinned one per physical core (default: the physical "
        "cores, less one for HTTP in serve; OMP_NUM_THREADS if set).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the checkpoint (only for a source you trust).",
    ),
]


OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (must not exist).")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out if it exists (atomically, at the end).")
]
AllowedHostOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--allowed-host",
        show_default=False,
        help="A name clients use for this server in the Host header, besides 127.0.0.1, "
        "localhost and the --host address (a DNS name, behind a proxy; '*': any); repeat.",
    ),
]
RequestTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--request-timeout",
        help="Seconds a client may take to send a request's headers, and again its body.",
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (the base's dtype), bf16, fp16 or fp32.")
]
ShardOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest shard file, e.g. 5GB, 500MB, 2GiB.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print what would be written; write nothing.")
]
DensityOpt = Annotated[
    float, typer.Option("--density", help="Pruning methods: the fraction of entries kept.")
]
CombineSeedOpt = Annotated[int, typer.Option("--seed", help="Seed for DARE's random drop.")]
MajorityOpt = Annotated[
    str,
    typer.Option("--majority-sign", help="TIES sign election: total (Σ wτ) or frequency."),
]


def parse_weights(text: str | None, count: int, default: float) -> list[float]:
    if text is None:
        return [default] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise TunesmithError(
            f"--weights: {text!r} is not a comma-separated list of numbers"
        ) from None
    if len(weights) != count:
        raise TunesmithError(f"--weights: {len(weights)} weights for {count} inputs; give one each")
    return weights


def progress_bar(label: str, unit: str = "tensors"):
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            typer.echo(f"\r{label}: {done}/{total} {unit}", nl=done == total, err=True)

    return report


def _resume_default(args: list[str]) -> list[str]:
    """`--resume` with no value means `--resume latest`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--resume":
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.startswith("-") or "=" in following:
                out.insert(i + 1, "latest")
            break
    return out


def _rank_prefix() -> str:
    """ "rank N: " in a torchrun launch of several processes (whose error it is), else ""."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


def main() -> None:
    """Console entry point: user errors print one line, no traceback."""
    warnings.formatwarning = _format_warning
    try:
        app(args=_resume_default(sys.argv[1:]))
    except ProcessesFailed as err:  # the processes printed their own errors
        sys.exit(err.returncode)
    except TunesmithError as err:
        interrupted = isinstance(err, TrainingInterrupted)
        where = _rank_prefix()
        for line in str(err).splitlines():
            typer.echo(line if interrupted else f"error: {where}{line}", err=True)
        sys.exit(130 if interrupted else 2)
    except KeyboardInterrupt:
        typer.echo("stopped (Ctrl-C)", err=True)
        sys.exit(130)
    except Exception as err:
        from tunesmith.io import is_disk_full

        if not is_disk_full(err):
            raise
        where = getattr(err, "filename", None) or "an output file"
        typer.echo(
            f"error: {where}: no space left on the disk while writing it; free up space or "
            "write elsewhere, then run again",
            err=True,
        )
        sys.exit(2)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line, `warning: …`, like errors (library warnings keep their type)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"warning: {kind}{message}\n"


if __name__ == "__main__":
    main()
