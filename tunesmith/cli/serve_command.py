"""`tunesmith serve`: the OpenAI-compatible server (see `tunesmith.serve`)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from tunesmith.cli.app import (
    AllowedHostOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    RequestTimeoutOpt,
    ThreadsOpt,
    TrustOpt,
    app,
    examples,
)
from tunesmith.errors import TunesmithError


def parse_adapters(values: list[str]) -> tuple[list[str | None], list[str]]:
    """`NAME=DIR` or `DIR` options as (names, folders); a bare folder is named by the server
    after its folder name."""
    names: list[str | None] = []
    folders: list[str] = []
    for value in values:
        name, sep, folder = value.partition("=")
        if sep and name and folder and "/" not in name:
            names.append(name)
            folders.append(folder)
        else:
            names.append(None)
            folders.append(value)
    return names, folders


@app.command(
    "serve",
    epilog=examples(
        "tunesmith serve --adapter quickstart=outputs/quickstart/adapter",
        "tunesmith serve --model examples/tiny-llama --adapter a=runs/a --adapter b=runs/b "
        "--host 0.0.0.0 --api-key $KEY",
    ),
)
def serve_cmd(
    model: ModelOpt = None,
    adapter: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--adapter",
            show_default=False,
            help="An adapter to serve, as NAME=DIR (or DIR: named by its folder); repeat.",
        ),
    ] = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to bind."),
    api_key: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--api-key",
        envvar="TUNESMITH_API_KEY",
        show_default=False,
        help="Require 'Authorization: Bearer KEY' (needed to bind beyond localhost).",
    ),
    name: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--name",
        show_default=False,
        help="The base model's name in requests (default: its folder name or hub id).",
    ),
    max_running: int = typer.Option(16, "--max-running", help="Sequences decoded at once."),
    max_queue: int = typer.Option(64, "--max-queue", help="Sequences waiting (then HTTP 429)."),
    prefill_tokens: int = typer.Option(
        512,
        "--prefill-tokens",
        help="Prompt tokens prefilled per step, across requests (longer prompts go in chunks "
        "between decode steps).",
    ),
    prefix_cache_mb: int = typer.Option(
        256, "--prefix-cache-mb", help="Memory for shared prompt prefixes (0: off)."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per completion."),
    max_n: int = typer.Option(8, "--max-n", help="Most choices (n) per request."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may take."),
    request_timeout: RequestTimeoutOpt = 30.0,
    allowed_host: AllowedHostOpt = None,
    adapter_root: str = typer.Option(
        ".", "--adapter-root", help="POST /v1/adapters loads only folders under this one."
    ),
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Serve the model and its adapters with an OpenAI-compatible API (chat, completions,
    models; streaming; adapters loaded and unloaded at run time), decoding requests for
    different adapters together in one batch."""
    try:
        from tunesmith.serve.app import Limits, Server, build_app
        from tunesmith.serve.guard import allowed_hosts, check_bind, check_settings
        from tunesmith.serve.runner import bind, serve_forever
    except ImportError as err:
        raise TunesmithError(
            f"tunesmith serve needs the serve extra ({err.name} is missing): "
            "pip install 'tunesmith[serve]'"
        ) from None
    from tunesmith.builder import load_for_inference
    from tunesmith.serve.engine import Engine
    from tunesmith.threads import plan_threads

    check_bind(host, api_key, "the model")
    counts = {"--max-running": max_running, "--max-queue": max_queue}
    counts |= {"--prefill-tokens": prefill_tokens}
    counts |= {"--max-tokens": max_tokens, "--max-n": max_n, "--max-body-bytes": max_body_bytes}
    check_settings(counts, {"--timeout": timeout, "--request-timeout": request_timeout})
    if prefix_cache_mb < 0:
        raise TunesmithError(f"--prefix-cache-mb: must be 0 (off) or more, got {prefix_cache_mb}")
    sock = bind(host, port)  # before the model loads: a port in use is said at once
    names, folders = parse_adapters(list(adapter or []))
    lm, tokenizer, loaded = load_for_inference(
        model,
        folders,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        names=names,
    )
    base = name or _base_name(model, lm)
    if base in loaded:
        raise TunesmithError(f"--name: {base!r} is also an adapter's name; choose another")
    plan = plan_threads(threads, reserve=1)
    engine = Engine(
        lm,
        tokenizer,
        max_running=max_running,
        max_queue=max_queue,
        threads=plan,
        prefill_tokens=prefill_tokens,
        prefix_cache_bytes=prefix_cache_mb << 20,
        pack_weights=True,
    )
    limits = Limits(max_body_bytes, max_tokens, max_n, timeout, request_timeout)
    server = Server(
        engine,
        base,
        api_key=api_key,
        limits=limits,
        adapter_root=adapter_root,
        hosts=allowed_hosts(host, allowed_host or []),
    )
    typer.echo(
        f"serving {base!r} with adapters {', '.join(loaded) or '(none)'} on "
        f"http://{host}:{port}/v1"
        + (" (API key required)" if api_key else "")
        + f"; {plan.describe()}"
        + (f"; {engine.packed_layers} bf16 linear layers prepacked" * bool(engine.packed_layers)),
        err=True,
    )
    serve_forever(build_app(server), sock, request_timeout)


def _base_name(model: str | None, lm) -> str:
    source = model or getattr(lm.config, "_name_or_path", "") or "base"
    source = source.rstrip("/")
    return os.path.basename(source) if os.path.isdir(source) else source
