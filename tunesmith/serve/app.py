"""The HTTP side of `tunesmith serve`: an OpenAI-compatible API on Starlette (run by uvicorn).

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`POST /v1/adapters`, `DELETE /v1/adapters/{name}`, `GET /health`, `GET /metrics`. Errors have
OpenAI's body, `{"error": {"message", "type", "param", "code"}}`. Each route is a function of
the request; the server's state (`server.Server`) is `request.app.state.server`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tunesmith.errors import TunesmithError, first_line
from tunesmith.paths import is_within
from tunesmith.serve.engine import AdapterBusy, NeverFits, QueueFull, Sequence, UnknownModel
from tunesmith.serve.guard import Refused, check_json_content_type
from tunesmith.serve.runner import serve_in_thread
from tunesmith.serve.server import (
    AdapterBody,
    ApiError,
    ChatBody,
    CompletionBody,
    Limits,
    Server,
    bad_request,
    error_body,
    validation_message,
)

__all__ = ["Limits", "Server", "build_app", "running"]

log = logging.getLogger("tunesmith.serve")


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


class _Request:
    """The sequences of one API request and the events they send."""

    def __init__(self, server: Server, prompts: list[list[int]], adapter, params, n) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokenizer = server.tokenizer
        self.wants_logprobs = params.logprobs is not None
        self._arrived: list[tuple[int, str, object]] = []
        self._lock = threading.Lock()
        self._woken = False
        self.sequences: list[Sequence] = []
        timeout_s = server.limits.timeout_s
        for p_index, prompt in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                p = dataclasses.replace(params, seed=seed)
                index = p_index * n + j
                self.sequences.append(
                    Sequence(prompt, adapter, p, self._callback(index), timeout_s)
                )

    def _callback(self, index: int):
        def on_event(kind: str, value) -> None:
            # the engine sends a step's events together: wake the event loop once for them
            with self._lock:
                self._arrived.append((index, kind, value))
                if self._woken:
                    return
                self._woken = True
            self.loop.call_soon_threadsafe(self._take)

        return on_event

    def _take(self) -> None:
        with self._lock:
            arrived, self._arrived, self._woken = self._arrived, [], False
        for event in arrived:
            self.events.put_nowait(event)

    def pending(self) -> list[tuple[int, str, object]]:
        """The events already queued (without waiting)."""
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancel()

    async def watch(self, request: Request) -> None:
        """Until the client goes away (its body already read): then cancel every sequence, so
        their rows leave the batch after the decode step under way, and wake the waiter."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.events.put_nowait((-1, "disconnected", None))

    @asynccontextmanager
    async def watching(self, request: Request) -> AsyncIterator[None]:
        task = asyncio.create_task(self.watch(request))
        try:
            yield
        finally:
            task.cancel()
            self.cancel()  # a no-op for sequences that finished


class LogProbs:
    """One choice's log-probabilities in OpenAI's shape, handed out as they arrive: chat's
    `{"content": [{token, logprob, bytes, top_logprobs}]}`, completions' `{tokens,
    token_logprobs, top_logprobs, text_offset}` (text_offset counted over the tokens' texts)."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.entries: list = []
        self.offset = 0

    def add(self, entries) -> None:
        self.entries.extend(entries)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def take(self) -> dict:
        entries, self.entries = self.entries, []
        if self.chat:
            return {
                "content": [
                    {
                        **self._item(token, logprob),
                        "top_logprobs": [self._item(t, lp) for t, lp in top],
                    }
                    for token, logprob, top in entries
                ]
            }
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in entries:
            text = self._text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append({self._text(t): lp for t, lp in top} | {text: logprob})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def _item(self, token: int, logprob: float) -> dict:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _server(request: Request) -> Server:
    return request.app.state.server


def _guarded(handler, endpoint: str, auth: bool = True):
    """`handler` behind the guard (Host, Origin, API key unless `auth` is off, a JSON body
    for POST), errors as OpenAI's body (500 for anything unexpected, logged) and the request
    counted in the metrics."""

    async def run(request: Request) -> Response:
        server = _server(request)
        started = time.monotonic()
        try:
            server.access.check(request, key=auth)
            if request.method == "POST":
                check_json_content_type(request)
            response = await handler(request)
        except Refused as err:
            response = ApiError.of(err).response()
        except ApiError as err:
            response = err.response()
        except Exception:
            log.exception("unhandled error in %s", endpoint)
            response = ApiError(500, "internal server error", "server_error").response()
        server.metrics.request(endpoint, response.status_code, time.monotonic() - started)
        return response

    return run


async def _parse(request: Request, model: type[BaseModel]):
    data = await _server(request).read_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, where = validation_message(err)
        raise bad_request(message, where) from None


def _submit(server: Server, req: _Request) -> None:
    try:
        server.engine.submit(req.sequences)
    except NeverFits as err:
        raise bad_request(str(err), "n", "too_many_sequences") from None
    except QueueFull as err:
        raise ApiError(
            429, str(err), "rate_limit_error", "queue_full", headers={"Retry-After": "1"}
        ) from None
    except UnknownModel as err:
        raise ApiError(404, str(err), "invalid_request_error", "model_not_found") from None


async def _complete(request: Request, chat: bool) -> Response:
    server = _server(request)
    body = await _parse(request, ChatBody if chat else CompletionBody)
    adapter = server.adapter_for(body.model)
    try:
        prompts = [server.chat_prompt(body)] if chat else server.completion_prompts(body)
    except TunesmithError as err:
        raise bad_request(first_line(err), "messages" if chat else "prompt") from None
    max_tokens = body.max_completion_tokens if chat else None
    max_tokens = max_tokens or body.max_tokens
    params = server.params(body, max(len(p) for p in prompts), max_tokens)
    req = _Request(server, prompts, adapter, params, body.n)
    _submit(server, req)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": ident, "created": int(time.time()), "model": body.model}
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        stream = _stream(req, request, head, chat, prompt_tokens, include_usage)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    async with req.watching(request):
        return await _whole(req, head, chat, prompt_tokens)


FAILURE_STATUS = {
    "timeout": (504, "timeout"),
    "failed": (500, "server_error"),
    "shutdown": (503, "server_error"),
}
"""The engine's failure kinds as (HTTP status, OpenAI error type)."""


def _failure(value) -> ApiError:
    kind, message = value
    status, error_type = FAILURE_STATUS[kind]
    return ApiError(status, message, error_type)


async def _whole(req: _Request, head: dict, chat: bool, prompt_tokens: int):
    """Wait for every sequence of `req`, then answer in one body."""
    texts = {i: "" for i in range(len(req.sequences))}
    logprobs = {i: LogProbs(req.tokenizer, chat) for i in range(len(req.sequences))}
    reasons: dict[int, str] = {}
    while len(reasons) < len(req.sequences):
        index, what, value = await req.events.get()
        if what == "text":
            texts[index] += value
        elif what == "logprobs":
            logprobs[index].add(value)
        elif what == "done":
            reasons[index] = value
        elif what == "disconnected":
            return Response(status_code=499)  # nobody reads it
        else:
            raise _failure(value)
    choices = []
    for i in range(len(req.sequences)):
        if chat:
            choice = {"index": i, "message": {"role": "assistant", "content": texts[i]}}
        else:
            choice = {"index": i, "text": texts[i]}
        lp = logprobs[i].take() if req.wants_logprobs else None
        choices.append({**choice, "logprobs": lp, "finish_reason": reasons[i]})
    kind = "chat.completion" if chat else "text_completion"
    return JSONResponse(
        {**head, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, req.sequences)}
    )


async def _stream(
    req: _Request, request: Request, head: dict, chat: bool, prompt_tokens: int, include_usage: bool
):
    """Server-sent events as the sequences of `req` produce text, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    logprobs = {i: LogProbs(req.tokenizer, chat) for i in range(len(req.sequences))}

    def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        lp = logprobs[index].take() if req.wants_logprobs and not first else None
        choice.update({"logprobs": lp, "finish_reason": reason})
        return _sse({**head, "object": kind, "choices": [choice]})

    finished = 0
    async with req.watching(request):
        if chat:
            yield b"".join(chunk(i, None, None, first=True) for i in range(len(req.sequences)))
        while finished < len(req.sequences):
            out = []  # one write for every event that has arrived (a step's, usually)
            for index, what, value in [await req.events.get(), *req.pending()]:
                if what == "text":
                    out.append(chunk(index, value, None))
                elif what == "logprobs":
                    logprobs[index].add(value)
                elif what == "done":
                    finished += 1
                    out.append(chunk(index, None, value))
                elif what == "disconnected":
                    return
                else:
                    failure = _failure(value)
                    yield b"".join(out) + _sse(error_body(failure.message, failure.kind))
                    return
            yield b"".join(out)
        if include_usage:
            usage = _usage(prompt_tokens, req.sequences)
            yield _sse({**head, "object": kind, "choices": [], "usage": usage})
        yield _sse("[DONE]")


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


def _model_card(server: Server, name: str, parent: str | None, method: str | None = None):
    card = {"id": name, "object": "model", "created": server.created, "owned_by": "tunesmith"}
    card["root"] = name if parent is None else parent
    card["parent"] = parent
    if method:
        card["method"] = method
    return card


async def models(request: Request) -> Response:
    server = _server(request)
    cards = [_model_card(server, server.base_name, None)]
    for name, method in server.engine.adapters().items():
        cards.append(_model_card(server, name, server.base_name, method))
    return JSONResponse({"object": "list", "data": cards})


async def add_adapter(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, AdapterBody)
    if body.name == server.base_name:
        raise bad_request(f"name: {body.name!r} is the base model's name", "name")
    path = _adapter_path(server, body.path)
    try:
        method = await asyncio.to_thread(server.engine.load, body.name, str(path))
    except TunesmithError as err:
        raise bad_request(first_line(err), "path") from None
    card = _model_card(server, body.name, server.base_name, method)
    return JSONResponse(card, status_code=201)


def _adapter_path(server: Server, given: str) -> Path:
    """`given` resolved under --adapter-root, or a 400 naming what is wrong with it."""
    if "\0" in given:
        raise bad_request("path: holds a NUL character", "path")
    try:
        path = (server.adapter_root / given).resolve()
        if not is_within(path, server.adapter_root):
            raise bad_request(
                f"path: {given!r} is outside the folder this server loads adapters from "
                f"({server.adapter_root}; --adapter-root)",
                "path",
            )
        if not path.is_dir():
            raise bad_request(f"path: {given!r} is not a folder", "path")
    except OSError as err:  # a name too long for the file system, a loop of links
        raise bad_request(f"path: {given[:80]!r}: {err.strerror or err}", "path") from None
    return path


async def remove_adapter(request: Request) -> Response:
    name = request.path_params["name"]
    try:
        await asyncio.to_thread(_server(request).engine.unload, name)
    except UnknownModel as err:
        raise ApiError(404, str(err), "invalid_request_error", "model_not_found") from None
    except AdapterBusy as err:
        raise ApiError(409, str(err), "invalid_request_error", "adapter_busy") from None
    return JSONResponse({"id": name, "object": "model", "deleted": True})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    text = _server(request).metrics.render()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _not_found(request: Request, exc) -> Response:
    status = getattr(exc, "status_code", 404)
    message = "method not allowed" if status == 405 else f"no route {request.url.path}"
    return ApiError(status, message, "invalid_request_error", "not_found").response()


ROUTES = [
    Route("/v1/chat/completions", _guarded(chat_completions, "chat"), methods=["POST"]),
    Route("/v1/completions", _guarded(completions, "completions"), methods=["POST"]),
    Route("/v1/models", _guarded(models, "models"), methods=["GET"]),
    Route("/v1/adapters", _guarded(add_adapter, "adapters"), methods=["POST"]),
    Route("/v1/adapters/{name}", _guarded(remove_adapter, "adapters"), methods=["DELETE"]),
    Route("/health", _guarded(health, "health", auth=False), methods=["GET"]),
    Route("/metrics", _guarded(prometheus, "metrics"), methods=["GET"]),
]


def build_app(server: Server) -> Starlette:
    """The Starlette app serving `server`; its engine runs while the app does (lifespan)."""

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = Starlette(
        routes=ROUTES, lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_found}
    )
    app.state.server = server
    return app


def _usage(prompt_tokens: int, sequences: list[Sequence]) -> dict:
    generated = sum(s.generated for s in sequences)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": sum(s.cached for s in sequences)},
    }


@contextmanager
def running(server: Server, host: str = "127.0.0.1", port: int = 0):
    """Serve `server` from a background thread (tests, benchmarks); yields the base URL
    (`http://host:port`, the port chosen by the system when 0) and stops on exit."""
    with serve_in_thread(build_app(server), host, port) as url:
        yield url
