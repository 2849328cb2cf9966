"""Commands on models and adapters: `generate`, `chat`, `merge`, `combine`, `merge-models`,
`quantize` and `export`. Each imports what it needs inside (start-up time)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.app import (
    AdapterOpt,
    CombineSeedOpt,
    DensityOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    MajorityOpt,
    MaxTokensOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    ShardOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    TrustOpt,
    app,
    examples,
    parse_weights,
    progress_bar,
)
from tunesmith.errors import TunesmithError


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):
    from tunesmith.generation import Sampling

    if temperature < 0:
        raise TunesmithError("--temperature: must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise TunesmithError("--top-p: must be in (0, 1]")
    return Sampling(max_new_tokens, temperature, top_p, seed)


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
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Generate a reply to one prompt, streamed as it is produced."""
    from tunesmith.builder import load_for_inference
    from tunesmith.data.encode import bos_prefix
    from tunesmith.generation import chat_template_of, prompt_ids
    from tunesmith.serve.offline import stream_text
    from tunesmith.threads import apply_threads, plan_threads

    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    apply_threads(plan_threads(threads))
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
    stream_text(lm, tokenizer, ids, sampling, lambda text: typer.echo(text, nl=False))
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
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Chat in the terminal with the model (and adapter), using its chat template and
    streaming replies. /reset clears the history, /exit (or end of input) quits."""
    from tunesmith.builder import load_for_inference
    from tunesmith.generation import chat_template_of, prompt_ids
    from tunesmith.serve.offline import stream_text
    from tunesmith.threads import apply_threads, plan_threads

    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    apply_threads(plan_threads(threads))
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
        reply = stream_text(lm, tokenizer, ids, sampling, lambda t: typer.echo(t, nl=False))
        typer.echo()
        history.append({"role": "assistant", "content": reply})


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
    ),
    dry_run: DryRunOpt = False,
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Load base + adapter and the merged model afterwards and print the largest "
        "logit difference (needs memory for both models).",
    ),
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge adapter(s) into the base model and write a Hugging Face checkpoint (sharded
    safetensors, config, tokenizer, chat template) that AutoModelForCausalLM loads. Streams
    tensor by tensor: memory stays near one tensor plus the adapter. LoRA, rsLoRA, DoRA and
    IA3; several --adapter flags merge their stack."""
    from tunesmith.combine import merge_checkpoint

    report = merge_checkpoint(
        base,
        list(adapter or []),
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        quantized_base=quantized_base,
        dry_run=dry_run,
        overwrite=overwrite,
        verify=verify,
        progress=None if dry_run else progress_bar("merging"),
    )
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
    ),
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
        adapters,
        parse_weights(weights, len(adapters), 1.0),
        out,
        method=method,
        base=base,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign=majority_sign,
        overwrite=overwrite,
    )
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
    ),
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
        base,
        models,
        out,
        method=method,
        weights=parse_weights(weights, len(models), 1.0),
        density=density,
        seed=seed,
        majority_sign=majority_sign,
        dtype=dtype,
        max_shard_size=max_shard_size,
        dry_run=dry_run,
        overwrite=overwrite,
        progress=None if dry_run else progress_bar("merging"),
    )
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
    layout: str = typer.Option(
        "gptq",
        "--format",
        help="rtn/gptq/awq: gptq (GPTQ's format) or compressed-tensors (llm-compressor's "
        "pack-quantized: transformers with compressed-tensors, vLLM on CPU and GPU).",
    ),
    skip: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--skip",
        show_default=False,
        help="rtn/gptq/awq: a regular expression; linears whose name it matches stay unquantized "
        "(e.g. 'mlp\\.').",
    ),
) -> None:
    """Quantize a checkpoint (or base + adapter, merged first) and report perplexity and size
    against the original. rtn/gptq/awq write GPTQ's format or compressed-tensors'; int8/nf4
    write bitsandbytes' (transformers loads all three); `tunesmith generate`, `serve` and `eval`
    load any of them."""
    from tunesmith.quantize.pipeline import QuantizeSettings, quantize_checkpoint

    adapters = list(adapter or [])
    settings = QuantizeSettings(
        method,
        bits,
        group_size,
        calib,
        calib_samples,
        eval_data,
        eval_samples,
        seq_len,
        act_order,
        damp,
        layout,
        skip,
    )
    report = quantize_checkpoint(
        model,
        out,
        settings,
        adapters=adapters,
        device=device,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        progress=progress_bar("quantizing", "layers"),
    )
    for line in report.lines():
        typer.echo(line)
    if eval_config is not None:
        from tunesmith.config import load_config
        from tunesmith.judge.evaluate import evaluate_models, format_table

        original = adapters[0] if adapters else model
        cfg = load_config(eval_config, [])
        columns, n = evaluate_models(cfg, [original, str(out)], samples=samples, include_base=False)
        typer.echo(format_table(columns, n))


@app.command(
    "export",
    epilog=examples(
        "tunesmith export --model examples/tiny-llama --outtype q8_0 --out tiny.gguf",
        "tunesmith export --adapter outputs/quickstart/adapter --lora-only --out lora.gguf",
        "tunesmith export --format onnx --adapter outputs/quickstart/adapter --out onnx --verify",
    ),
)
def export_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Output: a .gguf file, or a folder for --format onnx.")
    ],
    fmt: str = typer.Option(
        "gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio) or onnx (onnxruntime)."
    ),
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    outtype: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--outtype",
        help="gguf: f32, f16 (default), bf16, q8_0, q4_0, or a K-quant preset q2_k, q3_k_s, "
        "q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (--lora-only: f32/f16/bf16). "
        "onnx: fp32 (default), fp16, int8, int4.",
    ),
    lora_only: bool = typer.Option(
        False, "--lora-only", help="Write the LoRA adapter alone as a GGUF LoRA file."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="general.name in the file."),  # noqa: UP045
    ollama: bool = typer.Option(
        False, "--ollama", help="Also write an Ollama Modelfile beside the file."
    ),
    exporter: str = typer.Option(
        "auto",
        "--exporter",
        help="onnx: genai (onnxruntime-genai's builder), torch (torch.onnx), or auto (genai "
        "where it takes the architecture).",
    ),
    imatrix_data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--imatrix-data",
            help="gguf K-quants: weight the quantization by an importance matrix computed "
            "from this text (a data file, or a run config's data), as llama-quantize --imatrix.",
        ),
    ] = None,
    verify: bool = typer.Option(
        False, "--verify", help="onnx: check logits and greedy tokens against torch."
    ),
    verify_data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--verify-data", help="onnx --verify: prompts, a .txt (one per line) or .jsonl."
        ),
    ] = None,
    verify_prompts: Annotated[
        int, typer.Option("--verify-prompts", help="onnx --verify: how many prompts to check.")
    ] = 8,
    threads: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--threads",
            help="onnx: onnxruntime threads, written to genai_config.json (onnxruntime-genai "
            "otherwise uses one).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export for local inference. gguf: a checkpoint (or base + adapter, merged first) becomes
    one GGUF file with the tokenizer and chat template; --lora-only writes a GGUF LoRA adapter
    that llama.cpp applies at run time (`--lora`). onnx: a folder with the graph (KV cache in
    and out), the tokenizer and genai_config.json, for onnxruntime and onnxruntime-genai."""

    if fmt not in ("gguf", "onnx"):
        raise TunesmithError(f"--format: {fmt!r} is not supported; use gguf or onnx")
    adapters = list(adapter or [])
    if fmt == "onnx":
        from tunesmith.export.onnx import export_onnx, read_prompts

        if verify_prompts < 1:
            raise TunesmithError(f"--verify-prompts: {verify_prompts} is not a positive count")
        gguf_only = (
            ("--lora-only", lora_only),
            ("--ollama", ollama),
            ("--name", name),
            ("--imatrix-data", imatrix_data),
        )
        for flag, given in gguf_only:
            if given:
                raise TunesmithError(f"{flag}: a gguf option; leave it out with --format onnx")
        if verify_data is not None and not verify:
            raise TunesmithError("--verify-data: give it with --verify")
        report = export_onnx(
            model,
            out,
            adapters,
            outtype=outtype or "fp32",
            exporter=exporter,
            overwrite=overwrite,
            verify=verify,
            prompts=read_prompts(verify_data)[:verify_prompts] if verify_data else None,
            threads=threads,
        )
        for line in report.lines():
            typer.echo(line)
        return
    from tunesmith.export.gguf import export_gguf, export_lora_gguf

    onnx_only = (("--verify", verify), ("--exporter", exporter != "auto"), ("--threads", threads))
    for flag, given in onnx_only:
        if given:
            raise TunesmithError(f"{flag}: an onnx option; use it with --format onnx")
    outtype = outtype or "f16"
    if lora_only and ollama:
        raise TunesmithError("--ollama: Ollama needs the whole model; leave out --lora-only")
    if lora_only and imatrix_data:
        raise TunesmithError("--imatrix-data: a LoRA file is not quantized; leave out --lora-only")
    if lora_only:
        if len(adapters) != 1:
            raise TunesmithError("--lora-only: give exactly one --adapter")
        report = export_lora_gguf(
            adapters[0], out, model=model, outtype=outtype, overwrite=overwrite
        )
    else:
        report = export_gguf(
            model,
            out,
            adapters=adapters,
            outtype=outtype,
            overwrite=overwrite,
            name=name,
            ollama=ollama,
            imatrix_data=imatrix_data,
        )
    for line in report.lines():
        typer.echo(line)


@app.command(
    "score",
    epilog=examples(
        "tunesmith score outputs/reward/adapter examples/data/preference_val.jsonl",
        "tunesmith score outputs/reward/adapter answers.jsonl --out scored.jsonl",
    ),
)
def score_cmd(
    reward_model: Annotated[
        str, typer.Argument(help="The reward model: the adapter or model folder it was saved to.")
    ],
    data: Annotated[
        str,
        typer.Argument(
            help='A .jsonl/.json/.csv/.parquet file of {"prompt", "completion"} records, or '
            'of preference pairs {"prompt", "chosen", "rejected"}.'
        ),
    ],
    model: ModelOpt = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Write the records with their scores here (.jsonl)."),
    ] = None,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward pass."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", min=2, help="Longest sequence."),
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Score prompt/answer records with a reward model (trained with objective: reward)."""
    import json

    from tunesmith.data.sources import read_records
    from tunesmith.io import atomic_write_text
    from tunesmith.judge.score import RewardModel, pair_summary

    reward = RewardModel.load(
        reward_model, model, device, max_seq_len, trust_remote_code=trust_remote_code
    )
    records = list(read_records(data))
    results = reward.score_records(records, batch_size)
    lines = "".join(
        json.dumps({**r.data, **s}, ensure_ascii=False) + "\n"
        for r, s in zip(records, results, strict=True)
    )
    if out is None:
        typer.echo(lines, nl=False)
    else:
        atomic_write_text(lines, out)
    summary = pair_summary(results)
    if summary:
        typer.echo(summary, err=True)
    if out is not None:
        typer.echo(f"wrote {out} ({len(records)} records)", err=True)
