"""The `tunesmith` command. Thin: it parses arguments and calls the library. Verbs: `config
schema`, `config check`, `preprocess`, `train`, `plot`, `eval`, `generate`, `chat`, `merge`,
`combine`, `merge-models`, `quantize`, `export`, `plan`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith import __version__
from tunesmith.config import ConfigError
from tunesmith.errors import TunesmithError


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
    save_adapter, load_adapter, merge…) is documented in the README."""


config_app = typer.Typer(
    help="Inspect and validate run configs.", no_args_is_help=True, add_completion=False
)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[Path, typer.Argument(help="The run config (YAML).")]
OverridesArg = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4 method.r=8."),
]


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
    from tunesmith.config import config_yaml, load_config
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
) -> None:
    """Train: load the model and data, attach the method (lora, qlora, full, prompt, prefix,
    bottleneck or ia3; the LoRA family includes rsLoRA, DoRA and PiSSA init), run the loop with
    checkpoints, validation and metrics, and write the adapter (or model) to output_dir."""
    import warnings

    from tunesmith.config import load_config
    from tunesmith.train.loop import Run, TrainingInterrupted

    cfg = load_config(config, overrides or [])
    run = Run(cfg, resume=resume, overwrite=overwrite, use_cache=not no_cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.setup()
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            typer.echo(f"warning: {warning.message}", err=True)
    _print_run_header(run)
    try:
        summary = run.run()
    except TrainingInterrupted as err:
        again = " ".join(["tunesmith train", str(config), *(overrides or []), "--resume"])
        if run.last_checkpoint is None:
            again = "nothing to resume from; start again with --overwrite"
        raise TrainingInterrupted(f"{err}. Continue with: {again}") from None
    _print_summary(summary, run)
    if cfg.eval.generate_samples:
        from tunesmith.evaluate import compare_after_training

        compare_after_training(run, echo=typer.echo)


def _print_run_header(run) -> None:
    from tunesmith.adapters import trainable_parameters
    from tunesmith.data import summary_lines

    for line in summary_lines(run.prepared):
        typer.echo(line)
    counts = trainable_parameters(run.model)
    typer.echo(
        f"model {run.config.model.path} on {run.device} ({str(run.dtype).removeprefix('torch.')}),"
        f" method {run.config.method.name}: {counts.trainable:,} of {counts.total:,} parameters "
        f"train ({counts.percent:.2f}%); {run.total_steps} steps of "
        f"{run.config.train.micro_batch_size}x{run.config.train.grad_accum_steps} "
        f"{'packed rows' if run.plan.rows is not None else 'samples'}"
    )


def _print_summary(summary: dict, run) -> None:
    parts = [f"{summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.1f}s"]
    if summary["final_train_loss"] is not None:
        parts.append(f"train loss {summary['final_train_loss']:.4f}")
    if summary["final_val_loss"] is not None:
        val, ppl = summary["final_val_loss"], summary["final_val_ppl"]
        parts.append(f"validation loss {val:.4f} (perplexity {ppl:.2f})")
    typer.echo("done: " + "; ".join(parts))
    typer.echo(f"saved {summary['output']} (metrics, loss.png, summary.json in {run.out})")


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


AdapterOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--adapter", help="Adapter folder (repeat for several).", show_default=False),
]


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
) -> None:
    """Perplexity and generation metrics (exact match, contains, ROUGE-L) on the validation
    data, for the base model and each adapter side by side. Without --adapter, the run's own
    output_dir/adapter (or output_dir/model) is evaluated."""
    from tunesmith.config import load_config
    from tunesmith.evaluate import evaluate_models, format_table

    cfg = load_config(config, overrides or [])
    adapters = list(adapter or [])
    if not adapters:
        for name in ("adapter", "model"):
            if (Path(cfg.output_dir) / name).is_dir():
                adapters.append(str(Path(cfg.output_dir) / name))
    columns, n = evaluate_models(
        cfg, adapters, data_path=data, samples=samples, max_new_tokens=max_new_tokens,
        include_base=not no_base,
    )  # fmt: skip
    typer.echo(format_table(columns, n))


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):
    from tunesmith.generation import Sampling

    if temperature < 0:
        raise TunesmithError("--temperature: must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise TunesmithError("--top-p: must be in (0, 1]")
    return Sampling(max_new_tokens, temperature, top_p, seed)


ModelOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--model", help="Base model folder or hub id (default: the adapter's base).",
        show_default=False,
    ),
]  # fmt: skip
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest reply.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")]  # noqa: UP045
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the checkpoint (only for a source you trust).",
    ),
]


@app.command(
    "generate",
    epilog=examples(
        'tunesmith generate --adapter outputs/quickstart/adapter "Are these all from nature: '
        'leaf stone river"',
        'tunesmith generate --model examples/tiny-llama --raw "def fibonacci(n):"',
    ),
)
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message, or text with --raw).")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    raw: bool = typer.Option(False, "--raw", help="Complete the text; no chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),  # noqa: UP045
    max_new_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Generate a reply to one prompt, streamed as it is produced."""
    from tunesmith.builder import load_for_inference
    from tunesmith.data.encode import bos_prefix
    from tunesmith.generation import chat_template_of, prompt_ids, stream_reply

    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    lm, tokenizer, _ = load_for_inference(
        model, list(adapter or []), device=device, trust_remote_code=trust_remote_code
    )
    if raw:
        ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = prompt_ids(messages, chat_template_of(tokenizer), tokenizer, add_bos=False)
    stream_reply(lm, tokenizer, ids, sampling, lambda text: typer.echo(text, nl=False))
    typer.echo()


@app.command(
    "chat",
    epilog=examples(
        'tunesmith chat --adapter outputs/quickstart/adapter --system "Answer briefly."'
    ),
)
def chat_cmd(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),  # noqa: UP045
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Chat in the terminal with the model (and adapter), using its chat template and
    streaming replies. /reset clears the history, /exit (or end of input) quits."""
    from tunesmith.builder import load_for_inference
    from tunesmith.generation import chat_template_of, prompt_ids, stream_reply

    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    lm, tokenizer, _ = load_for_inference(
        model, list(adapter or []), device=device, trust_remote_code=trust_remote_code
    )
    template = chat_template_of(tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            typer.echo("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        ids = prompt_ids(history, template, tokenizer, add_bos=False)
        typer.echo("assistant> ", nl=False)
        reply = stream_reply(lm, tokenizer, ids, sampling, lambda t: typer.echo(t, nl=False))
        typer.echo()
        history.append({"role": "assistant", "content": reply})


OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (must not exist).")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out if it exists (atomically, at the end).")
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


def _weights(text: str | None, count: int, default: float) -> list[float]:
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


def _progress(label: str, unit: str = "tensors"):
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            typer.echo(f"\r{label}: {done}/{total} {unit}", nl=done == total, err=True)

    return report


@app.command(
    "merge",
    epilog=examples(
        "tunesmith merge --adapter outputs/quickstart/adapter --out outputs/merged",
        "tunesmith merge --adapter A --base meta-llama/Llama-3.1-8B --out merged --dtype bf16 "
        "--verify",
    ),
)
def merge_cmd(
    out: OutOpt,
    adapter: AdapterOpt = None,
    base: Optional[str] = typer.Option(  # noqa: UP045
        None, "--base", help="Base model folder or hub id (default: the adapter's base)."
    ),
    dtype: DtypeOpt = "auto",
    max_shard_size: ShardOpt = "5GB",
    quantized_base: str = typer.Option(
        "auto",
        "--quantized-base",
        help="QLoRA adapters: merge onto the dequantized 4-bit base they were trained on. "
        "auto (read the QLoRA run's config.yaml next to the adapter), none, nf4, fp4, int8.",
    ),  # fmt: skip
    dry_run: DryRunOpt = False,
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Load base + adapter and the merged model afterwards and print the largest "
        "logit difference (needs memory for both models).",
    ),  # fmt: skip
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge adapter(s) into the base model and write a Hugging Face checkpoint (sharded
    safetensors, config, tokenizer, chat template) that AutoModelForCausalLM loads. Streams
    tensor by tensor: memory stays near one tensor plus the adapter. LoRA, rsLoRA, DoRA and
    IA3; several --adapter flags merge their stack."""
    from tunesmith.combine import merge_checkpoint

    report = merge_checkpoint(
        base, list(adapter or []), out, dtype=dtype, max_shard_size=max_shard_size,
        quantized_base=quantized_base, dry_run=dry_run, overwrite=overwrite, verify=verify,
        progress=None if dry_run else _progress("merging"),
    )  # fmt: skip
    for line in report.lines():
        typer.echo(line)


@app.command(
    "combine",
    epilog=examples(
        "tunesmith combine --adapter a1 --adapter a2 --weights 0.7,0.3 --method ties --out combined"
    ),
)
def combine_cmd(
    out: OutOpt,
    adapter: AdapterOpt = None,
    weights: Optional[str] = typer.Option(  # noqa: UP045
        None, "--weights", help="Comma-separated, one per adapter (default: 1 each)."
    ),
    method: str = typer.Option(
        "svd",
        "--method",
        help="linear, cat (exact), svd, ties, dare_linear, dare_ties or magnitude_prune.",
    ),  # fmt: skip
    rank: Optional[int] = typer.Option(  # noqa: UP045
        None, "--rank", help="svd and pruning methods: the result's rank (default: largest input)."
    ),
    density: DensityOpt = 0.5,
    seed: CombineSeedOpt = 0,
    majority_sign: MajorityOpt = "total",
    base: Optional[str] = typer.Option(  # noqa: UP045
        None, "--base", help="Base model (default: the first adapter's base)."
    ),
    overwrite: OverwriteOpt = False,
) -> None:
    """Combine LoRA adapters (different ranks, alphas, rsLoRA and DoRA included) into one
    adapter in PEFT format."""
    from tunesmith.combine.adapter_arithmetic import combine_adapter_folders

    adapters = list(adapter or [])
    result = combine_adapter_folders(
        adapters, _weights(weights, len(adapters), 1.0), out, method=method, base=base,
        rank=rank, density=density, seed=seed, majority_sign=majority_sign, overwrite=overwrite,
    )  # fmt: skip
    config = result.config
    ranks = sorted({config.r, *config.rank_pattern.values()})
    typer.echo(
        f"wrote {out}: {method} of {len(adapters)} adapter(s), rank "
        f"{'/'.join(map(str, ranks))}; {result.summary()}"
    )


@app.command(
    "merge-models",
    epilog=examples(
        "tunesmith merge-models --base B --model X --model Y --method ties --density 0.5 "
        "--out merged"
    ),
)
def merge_models_cmd(
    out: OutOpt,
    base: str = typer.Option(..., "--base", help="The base model all the others were tuned from."),
    model: Optional[list[str]] = typer.Option(  # noqa: UP045, B008
        None, "--model", help="A fine-tuned model folder (repeat for several)."
    ),
    method: str = typer.Option(
        "task_arithmetic",
        "--method",
        help="task_arithmetic, ties, dare_ties, dare_linear or magnitude_prune.",
    ),  # fmt: skip
    weights: Optional[str] = typer.Option(  # noqa: UP045
        None, "--weights", help="Comma-separated, one per model (default: 1 each)."
    ),
    density: DensityOpt = 0.5,
    seed: CombineSeedOpt = 0,
    majority_sign: MajorityOpt = "total",
    dtype: DtypeOpt = "auto",
    max_shard_size: ShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge whole fine-tuned checkpoints of one base (task vectors τ = model − base) into one
    checkpoint, streaming tensor by tensor (memory near one tensor per model)."""
    from tunesmith.combine import merge_models

    models = list(model or [])
    report = merge_models(
        base, models, out, method=method, weights=_weights(weights, len(models), 1.0),
        density=density, seed=seed, majority_sign=majority_sign, dtype=dtype,
        max_shard_size=max_shard_size, dry_run=dry_run, overwrite=overwrite,
        progress=None if dry_run else _progress("merging"),
    )  # fmt: skip
    for line in report.lines():
        typer.echo(line)


@app.command(
    "quantize",
    epilog=examples(
        "tunesmith quantize --model examples/tiny-llama --method gptq "
        "--calib examples/data/pydoc_heldout.jsonl --out outputs/q4",
        "tunesmith quantize --adapter outputs/quickstart/adapter --method nf4 --out outputs/nf4",
    ),
)
def quantize_cmd(
    out: OutOpt,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    method: str = typer.Option(
        "gptq", "--method", help="rtn (round-to-nearest), gptq, awq, int8 or nf4 (bitsandbytes)."
    ),
    bits: Optional[int] = typer.Option(  # noqa: UP045
        None, "--bits", help="rtn/gptq/awq: 2, 3, 4 (default) or 8."
    ),
    group_size: Optional[int] = typer.Option(  # noqa: UP045
        None, "--group-size", help="rtn/gptq/awq: input columns per scale, or -1 (default 128)."
    ),
    calib: Optional[str] = typer.Option(  # noqa: UP045
        None, "--calib", help="Data file: calibration windows, then held-out windows."
    ),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    eval_data: Optional[str] = typer.Option(  # noqa: UP045
        None, "--eval-data", help="Held-out text for the perplexity report (default: --calib's)."
    ),
    eval_samples: int = typer.Option(32, "--eval-samples", help="Held-out windows."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    act_order: bool = typer.Option(
        False, "--act-order", help="gptq: quantize the most active input columns first."
    ),
    damp: float = typer.Option(
        0.01, "--damp", help="gptq: Hessian dampening (of its mean diagonal)."
    ),
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    eval_config: Optional[Path] = typer.Option(  # noqa: UP045, B008
        None, "--eval-config", help="Also run `tunesmith eval` of this run config on both models."
    ),
    samples: int = typer.Option(100, "--samples", help="--eval-config: prompts to answer."),
) -> None:
    """Quantize a checkpoint (or base + adapter, merged first) and report perplexity and size
    against the original. rtn/gptq/awq write GPTQ's format; int8/nf4 write bitsandbytes'
    (transformers loads both); `tunesmith generate` and `eval` load either."""
    from tunesmith.quantize.pipeline import quantize_checkpoint

    adapters = list(adapter or [])
    report = quantize_checkpoint(
        model, out, method=method, adapters=adapters, bits=bits, group_size=group_size,
        calib=calib, calib_samples=calib_samples, eval_data=eval_data, eval_samples=eval_samples,
        seq_len=seq_len, act_order=act_order, damp=damp, device=device, overwrite=overwrite,
        max_shard_size=max_shard_size, progress=_progress("quantizing", "layers"),
    )  # fmt: skip
    for line in report.lines():
        typer.echo(line)
    if eval_config is not None:
        from tunesmith.config import load_config
        from tunesmith.evaluate import evaluate_models, format_table

        original = adapters[0] if adapters else model
        cfg = load_config(eval_config, [])
        columns, n = evaluate_models(cfg, [original, str(out)], samples=samples, include_base=False)
        typer.echo(format_table(columns, n))


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
) -> None:
    """Peak memory of one training step of the run (traced on fake tensors: no GPU and no
    weights needed), its breakdown, whether it fits the GPU, the time for the run's dataset,
    and which methods fit with which switches, micro-batch and sequence length."""
    import json

    from tunesmith.config import load_config
    from tunesmith.plan.planner import plan_run

    cfg = load_config(config, overrides or [])
    result = plan_run(cfg, gpu, gpu_mem)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if result.fits_nothing:
        raise TunesmithError(result.notes[-1])


@app.command(
    "export",
    epilog=examples(
        "tunesmith export --model examples/tiny-llama --outtype q8_0 --out tiny.gguf",
        "tunesmith export --adapter outputs/quickstart/adapter --lora-only --out lora.gguf",
    ),
)
def export_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output file (.gguf; must not exist).")],
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio)."),
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    outtype: str = typer.Option(
        "f16",
        "--outtype",
        help="Weights: f32, f16, bf16, q8_0 or q4_0 (--lora-only: f32/f16/bf16).",
    ),
    lora_only: bool = typer.Option(
        False, "--lora-only", help="Write the LoRA adapter alone as a GGUF LoRA file."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="general.name in the file."),  # noqa: UP045
    overwrite: OverwriteOpt = False,
) -> None:
    """Export for local inference. A checkpoint (or base + adapter, merged first) becomes one
    GGUF file with the tokenizer and chat template; --lora-only writes a GGUF LoRA adapter that
    llama.cpp applies at run time (`--lora`)."""
    from tunesmith.export.gguf import export_gguf, export_lora_gguf

    if fmt != "gguf":
        raise TunesmithError(f"--format: {fmt!r} is not supported; use gguf")
    adapters = list(adapter or [])
    if lora_only:
        if len(adapters) != 1:
            raise TunesmithError("--lora-only: give exactly one --adapter")
        report = export_lora_gguf(
            adapters[0], out, model=model, outtype=outtype, overwrite=overwrite
        )
    else:
        report = export_gguf(
            model, out, adapters=adapters, outtype=outtype, overwrite=overwrite, name=name
        )
    for line in report.lines():
        typer.echo(line)


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


def main() -> None:
    """Console entry point: user errors print one line, no traceback."""
    warnings.formatwarning = _format_warning
    try:
        app(args=_resume_default(sys.argv[1:]))
    except TunesmithError as err:
        from tunesmith.train.loop import TrainingInterrupted

        interrupted = isinstance(err, TrainingInterrupted)
        for line in str(err).splitlines():
            typer.echo(line if interrupted else f"error: {line}", err=True)
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
