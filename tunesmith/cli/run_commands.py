"""Commands on a run config: `config schema`, `config check`, `preprocess`, `train`, `sweep`,
`plot`, `eval` and `plan`. Each imports what it needs inside (start-up time: `tunesmith --help`
loads no torch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.app import (
    AdapterOpt,
    ConfigArg,
    OverridesArg,
    ThreadsOpt,
    app,
    config_app,
    examples,
)
from tunesmith.errors import TunesmithError


@config_app.command("schema", epilog=examples("tunesmith config schema > schema.yaml"))
def config_schema() -> None:
    """Print every config section and field with its type, default and documentation."""
    from tunesmith.config import schema_text

    typer.echo(schema_text(), nl=False)


@config_app.command(
    "check",
    epilog=examples(
        "tunesmith config check examples/quickstart.yaml",
        "tunesmith config check run.yaml method.r=8 --show",
    ),
)
def config_check(
    config: ConfigArg,
    overrides: OverridesArg = None,
    show: bool = typer.Option(False, "--show", help="Print the resolved config."),
) -> None:
    """Validate a run config without loading a model: schema, values, and that local data
    files exist."""
    from tunesmith.config import ConfigError, config_yaml, load_config
    from tunesmith.data.sources import local_source_problems
    from tunesmith.paths import model_source

    cfg = load_config(config, overrides or [])
    problems = []
    for key, source in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        try:
            if source:
                model_source(source, key)
        except TunesmithError as err:
            problems.append(str(err))
    problems += local_source_problems(cfg.data.datasets, "data.datasets")
    problems += local_source_problems(cfg.data.validation, "data.validation")
    if problems:
        raise ConfigError([f"{config}: {problem}" for problem in problems])
    if show:
        typer.echo(config_yaml(cfg), nl=False)
    method = cfg.method.name + (f" r={cfg.method.r}" if hasattr(cfg.method, "r") else "")
    typer.echo(
        f"{config}: ok (model {cfg.model.path}, method {method}, "
        f"{len(cfg.data.datasets)} training source(s), lr {cfg.train.lr:g})"
    )


@app.command(
    "preprocess", epilog=examples("tunesmith preprocess examples/quickstart.yaml --show 2")
)
def preprocess(
    config: ConfigArg,
    overrides: OverridesArg = None,
    show: int = typer.Option(3, "--show", help="Decoded samples to print."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Tokenize again; ignore the cache."),
) -> None:
    """Tokenize the run's data (filling the cache) and print samples with the masked, not
    trained, spans inside ⟦ ⟧, plus counts: samples, tokens, trained tokens, truncated and
    dropped samples, packing efficiency."""

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


@app.command(
    "train",
    epilog=examples(
        "tunesmith train examples/quickstart.yaml",
        "tunesmith train run.yaml method=qlora train.lr=1e-4 --resume",
    ),
)
def train_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    resume: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--resume",
        help="Continue a run: --resume alone (or --resume latest) takes the newest checkpoint "
        "in output_dir; --resume PATH a given checkpoint folder.",
        show_default=False,
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete an earlier run's files in output_dir first."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Tokenize again; ignore the cache."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Processes on this machine (GPUs, or CPU processes with gloo): runs torchrun "
        "--standalone --nproc_per_node N -m tunesmith train ... for you.",
    ),
    threads: ThreadsOpt = None,
) -> None:
    """Train: load the model and data, attach the method (lora, qlora, full, prompt, prefix,
    bottleneck or ia3; the LoRA family includes rsLoRA, DoRA and PiSSA init), run the loop with
    checkpoints, validation and metrics, and write the adapter (or model) to output_dir."""
    from tunesmith.config import load_config
    from tunesmith.jobs import train_job
    from tunesmith.threads import apply_threads, process_threads

    if nproc == 1:  # else each torchrun process sets its own share
        apply_threads(process_threads(threads))
    train_job(
        load_config(config, overrides or []),
        resume=resume,
        overwrite=overwrite,
        use_cache=not no_cache,
        nproc=nproc,
        threads=threads,
        echo=typer.echo,
        command=["tunesmith", "train", str(config), *(overrides or [])],
    )


@app.command(
    "sweep",
    epilog=examples(
        "tunesmith sweep examples/sweep.yaml",
        "tunesmith sweep run.yaml sweep.trials=40   # another worker: the same command",
    ),
)
def sweep_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Processes per trial (torchrun), as tunesmith train --nproc."
    ),
    threads: ThreadsOpt = None,
) -> None:
    """Search the config's sweep.space with Optuna: each trial one training run in
    OUTPUT_DIR/sweep/trials/NNN, trials that the planner says will not fit skipped, the study
    in sweep.storage shared by every worker started on it; writes sweep/trials.csv and
    sweep/best.yaml."""
    from tunesmith.config.load import config_from_dict, read_config_file
    from tunesmith.threads import apply_threads, process_threads

    try:
        from tunesmith.sweep import sweep_job
    except ImportError as err:
        raise TunesmithError(
            f"tunesmith sweep needs Optuna ({err.name} is missing); pip install -e '.[sweep]'"
        ) from None
    if nproc == 1:
        apply_threads(process_threads(threads))
    raw, lines = read_config_file(config)
    run = config_from_dict(raw, overrides or [], source=str(config), lines=lines)
    sweep_job(
        run,
        raw,
        source=str(config),
        lines=lines,
        overrides=overrides or [],
        nproc=nproc,
        threads=threads,
        echo=typer.echo,
    )


@app.command("plot", epilog=examples("tunesmith plot outputs/quickstart"))
def plot_cmd(
    output_dir: Annotated[Path, typer.Argument(help="A run's output_dir.")],
    out: Optional[Path] = typer.Option(  # noqa: UP045, B008
        None, "--out", help="Image path (default: loss.png in output_dir)."
    ),
) -> None:
    """Render the loss and learning-rate curves of a run to a PNG."""
    from tunesmith.train.plot import plot_metrics

    typer.echo(f"wrote {plot_metrics(output_dir, out)}")


@app.command(
    "eval",
    epilog=examples(
        "tunesmith eval examples/quickstart.yaml --adapter outputs/quickstart/adapter --samples 20"
    ),
)
def eval_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    adapter: AdapterOpt = None,
    data: Optional[str] = typer.Option(  # noqa: UP045
        None, "--data", help="Evaluate on this file instead of data.validation."
    ),
    samples: int = typer.Option(100, "--samples", help="Prompt/answer pairs to generate for."),
    max_new_tokens: Optional[int] = typer.Option(  # noqa: UP045
        None, "--max-new-tokens", help="Default: eval.max_new_tokens."
    ),
    no_base: bool = typer.Option(False, "--no-base", help="Leave out the base model column."),
    save: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--save",
        show_default=False,
        help="Write eval.json and samples.jsonl (every answer) to this folder, for "
        "`tunesmith report` and `tunesmith review`.",
    ),
) -> None:
    """Perplexity and generation metrics (exact match, contains, accuracy, BLEU, chrF,
    ROUGE-1/2/L) on the validation data, for the base model and each adapter side by side.
    Without --adapter, the run's own output_dir/adapter (or output_dir/model) is evaluated."""
    from tunesmith.config import load_config
    from tunesmith.judge.evaluate import evaluate_models, format_table

    cfg = load_config(config, overrides or [])
    adapters = list(adapter or [])
    if not adapters:
        for name in ("adapter", "model"):
            if (Path(cfg.output_dir) / name).is_dir():
                adapters.append(str(Path(cfg.output_dir) / name))
    columns, n = evaluate_models(
        cfg,
        adapters,
        data_path=data,
        samples=samples,
        max_new_tokens=max_new_tokens,
        include_base=not no_base,
        save_dir=save,
    )
    typer.echo(format_table(columns, n))
    if save:
        typer.echo(f"wrote {Path(save) / 'eval.json'} and {Path(save) / 'samples.jsonl'}")


@app.command(
    "plan",
    epilog=examples(
        "tunesmith plan examples/quickstart.yaml --gpu 4090",
        "tunesmith plan run.yaml method=qlora --gpu-mem 16GiB --json",
    ),
)
def plan_cmd(
    config: ConfigArg,
    overrides: OverridesArg = None,
    gpu: Optional[str] = typer.Option(  # noqa: UP045
        None, "--gpu", help="h100, h200, a100, a100-40gb, l40s, a10g, 4090, 3090 or t4."
    ),
    gpu_mem: Optional[str] = typer.Option(  # noqa: UP045
        None, "--gpu-mem", help="GPU memory to fit in, e.g. 24GiB (default: the --gpu's)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs per machine (DDP and FSDP per GPU)."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Machines, each with --gpus GPUs."),
) -> None:
    """Peak memory of one training step of the run (traced on fake tensors: no GPU and no
    weights needed), its breakdown, whether it fits the GPU, the time for the run's dataset,
    and which methods fit with which switches, micro-batch and sequence length."""
    import json

    from tunesmith.config import load_config
    from tunesmith.plan.planner import plan_run

    cfg = load_config(config, overrides or [])
    result = plan_run(cfg, gpu, gpu_mem, gpus=gpus, nodes=nodes)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if result.fits_nothing:
        raise TunesmithError(result.notes[-1])
