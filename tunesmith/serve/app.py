"""The HTTP side of `tunesmith serve`: an OpenAI-compatible API on Starlette (run by uvicorn).

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`POST /v1/adapters`, `DELETE /v1/adapters/{name}`, `GET /health`, `GET /metrics`.
Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tunesmith.data.encode import bos_prefix
from tunesmith.errors import TunesmithError, first_line
from tunesmith.generation import chat_template_of, prompt_ids
from tunesmith.paths import is_within
from tunesmith.serve.engine import (
    AdapterBusy,
    Engine,
    Params,
    QueueFull,
    Sequence,
    UnknownModel,
)
from tunesmith.serve.metrics import Metrics

log = logging.getLogger("tunesmith.serve")


@dataclass
class Limits:
    """What one request may ask for, and how long it may take."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    """The most tokens one completion may generate (and the default when a request says none)."""
    max_n: int = 8
    request_timeout_s: float = 300.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None,
                 param: str | None = None, headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.param, self.headers = param, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.kind, self.code, self.param),
            status_code=self.status, headers=self.headers,
        )  # fmt: skip


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


# --- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None  # noqa: UP007
    stream: bool = False
    stream_options: dict | None = None
    logprobs: Union[bool, int, None] = None  # noqa: UP007
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class _Part(BaseModel):
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_Part], None] = None  # noqa: UP007


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007
    echo: bool = False
    suffix: str | None = None


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def _validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}", where


# --- the app ----------------------------------------------------------------------------------
class Server:
    """The state behind the routes: the engine, what it serves and the limits."""

    def __init__(
        self, engine: Engine, base_name: str, *, api_key: str | None = None,
        limits: Limits | None = None, adapter_root: str | Path = ".",
    ) -> None:  # fmt: skip
        self.engine = engine
        self.base_name = base_name
        self.api_key = api_key
        self.limits = limits or Limits()
        self.adapter_root = Path(adapter_root).resolve()
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.tokenizer = engine.tokenizer

    # --- checks ---
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                "the server's --api-key",
                "authentication_error", "invalid_api_key",
            )  # fmt: skip

    async def read_json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise self._too_large(limit)
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise bad_request("the body must be a JSON object")
        return data

    @staticmethod
    def _too_large(limit: int) -> ApiError:
        return ApiError(
            413, f"the request body is larger than this server accepts ({limit} bytes; "
            "--max-body-bytes)", "invalid_request_error", "request_too_large",
        )  # fmt: skip

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise ApiError(
            404,
            f"the model {model!r} does not exist; GET /v1/models lists the base "
            f"({self.base_name!r}) and the adapters this server has",
            "invalid_request_error", "model_not_found", "model",
        )  # fmt: skip

    def params(self, body: _Body, prompt_tokens: int, max_tokens: int | None) -> Params:
        if body.logprobs:
            raise bad_request("logprobs are not supported by tunesmith serve", "logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise bad_request(
                "presence_penalty and frequency_penalty are not supported by tunesmith serve; "
                "leave them at 0", "presence_penalty",
            )  # fmt: skip
        if body.n > self.limits.max_n:
            raise bad_request(f"n: at most {self.limits.max_n} on this server (--max-n)", "n")
        cap = self.limits.max_tokens
        if max_tokens is not None and max_tokens > cap:
            raise bad_request(
                f"max_tokens: {max_tokens} is more than this server allows ({cap}; "
                "--max-tokens)", "max_tokens",
            )  # fmt: skip
        context = self.engine.context
        room = context - prompt_tokens
        wanted = max_tokens if max_tokens is not None else min(cap, room)
        if wanted > room:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, "
                f"{wanted} in the completion). Please reduce the length of the prompt or "
                "completion.", "messages", "context_length_exceeded",
            )  # fmt: skip
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("stop: up to 4 non-empty strings", "stop")
        return Params(wanted, body.temperature, body.top_p, body.seed, tuple(stop))

    # --- prompts ---
    def chat_prompt(self, body: ChatBody) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = [p.text or "" for p in content if p.type == "text"]
                if len(texts) != len(content):
                    raise bad_request(
                        f"messages[{i}].content: only text parts are supported", "messages"
                    )
                content = "".join(texts)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        if not any(m["role"] == "user" for m in messages):
            raise bad_request("messages: give at least one message with role 'user'", "messages")
        try:
            template = chat_template_of(self.tokenizer)
        except TunesmithError as err:
            raise bad_request(
                f"{err}; this model has no chat template, use /v1/completions"
            ) from None
        return prompt_ids(messages, template, self.tokenizer, add_bos=False)

    def completion_prompts(self, body: CompletionBody) -> list[list[int]]:
        if body.echo or body.suffix:
            raise bad_request("echo and suffix are not supported by tunesmith serve", "echo")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        vocab = len(self.tokenizer)
        for item in prompt:
            if isinstance(item, str):
                ids = (
                    bos_prefix(self.tokenizer)
                    + self.tokenizer(item, add_special_tokens=False)["input_ids"]
                )
            else:
                ids = list(item)
                if any(not 0 <= t < vocab for t in ids):
                    raise bad_request(f"prompt: token ids must be in [0, {vocab})", "prompt")
            if not ids:
                raise bad_request("prompt: the prompt gives no tokens", "prompt")
            out.append(ids)
        if not out:
            raise bad_request("prompt: give at least one prompt", "prompt")
        return out


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


class _Request:
    """The sequences of one API request and the events they send."""

    def __init__(self, server: Server, prompts: list[list[int]], adapter, params, n) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.sequences: list[Sequence] = []
        for p_index, prompt in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                p = Params(params.max_tokens, params.temperature, params.top_p, seed, params.stop)
                index = p_index * n + j
                self.sequences.append(
                    Sequence(
                        prompt, adapter, p, self._callback(index), server.limits.request_timeout_s
                    )  # fmt: skip
                )

    def _callback(self, index: int):
        def on_event(kind: str, value) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))

        return on_event

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancel()


def build_app(server: Server) -> Starlette:
    engine = server.engine
    metrics = server.metrics

    def guarded(handler, endpoint: str, auth: bool = True):
        async def run(request: Request) -> Response:
            started = time.monotonic()
            try:
                if auth:
                    server.check_key(request)
                response = await handler(request)
            except ApiError as err:
                response = err.response()
            except Exception:
                log.exception("unhandled error in %s", endpoint)
                response = ApiError(500, "internal server error", "server_error").response()
            metrics.request(endpoint, response.status_code, time.monotonic() - started)
            return response

        return run

    async def parse(request: Request, model: type[BaseModel]):
        data = await server.read_json(request)
        try:
            return model.model_validate(data)
        except ValidationError as err:
            message, where = _validation_message(err)
            raise bad_request(message, where) from None

    def submit(req: _Request) -> None:
        try:
            engine.submit(req.sequences)
        except QueueFull as err:
            raise ApiError(
                429, str(err), "rate_limit_error", "queue_full", headers={"Retry-After": "1"}
            ) from None
        except UnknownModel as err:
            raise ApiError(404, str(err), "invalid_request_error", "model_not_found") from None

    async def complete(request: Request, chat: bool) -> Response:
        body = await parse(request, ChatBody if chat else CompletionBody)
        adapter = server.adapter_for(body.model)
        try:
            prompts = [server.chat_prompt(body)] if chat else server.completion_prompts(body)
        except TunesmithError as err:
            raise bad_request(first_line(err), "messages" if chat else "prompt") from None
        max_tokens = body.max_completion_tokens if chat else None
        max_tokens = max_tokens or body.max_tokens
        params = server.params(body, max(len(p) for p in prompts), max_tokens)
        req = _Request(server, prompts, adapter, params, body.n)
        submit(req)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "created": int(time.time()), "model": body.model}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            stream = _stream(req, request, head, kind, chat, prompt_tokens, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _whole(req, request, head, kind, chat, prompt_tokens)

    async def _whole(req, request, head, kind, chat, prompt_tokens) -> Response:
        texts = {i: "" for i in range(len(req.sequences))}
        reasons: dict[int, str] = {}
        try:
            while len(reasons) < len(req.sequences):
                try:
                    index, what, value = await asyncio.wait_for(req.events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        return Response(status_code=499)
                    continue
                if what == "text":
                    texts[index] += value
                elif what == "done":
                    reasons[index] = value
                else:
                    status, message = value
                    req.cancel()
                    kind_ = "timeout" if status == 504 else "server_error"
                    raise ApiError(status, message, kind_)
        except asyncio.CancelledError:
            req.cancel()
            raise
        choices = []
        for i in range(len(req.sequences)):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": texts[i]}}
            else:
                choice = {"index": i, "text": texts[i]}
            choices.append({**choice, "logprobs": None, "finish_reason": reasons[i]})
        generated = sum(s.generated for s in req.sequences)
        return JSONResponse(
            {**head, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, generated)}
        )

    async def _stream(req, request, head, kind, chat, prompt_tokens, include_usage):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, first: bool = False):
            if chat:
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": text or ""}
            choice.update({"logprobs": None, "finish_reason": reason})
            return _sse({**head, "object": chunk_kind, "choices": [choice]})

        finished = 0
        try:
            if chat:
                for i in range(len(req.sequences)):
                    yield chunk(i, None, None, first=True)
            while finished < len(req.sequences):
                index, what, value = await req.events.get()
                if what == "text":
                    yield chunk(index, value, None)
                elif what == "done":
                    finished += 1
                    yield chunk(index, None, value)
                else:
                    status, message = value
                    kind_ = "timeout" if status == 504 else "server_error"
                    yield _sse(error_body(message, kind_))
                    req.cancel()
                    break
            if include_usage:
                generated = sum(s.generated for s in req.sequences)
                usage = _usage(prompt_tokens, generated)
                yield _sse({**head, "object": chunk_kind, "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:  # also when the client disconnects: the slots free at the next step
            req.cancel()

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    def model_card(name: str, parent: str | None, method: str | None = None) -> dict:
        card = {"id": name, "object": "model", "created": server.created, "owned_by": "tunesmith"}
        card["root"] = name if parent is None else parent
        card["parent"] = parent
        if method:
            card["method"] = method
        return card

    async def models(request: Request) -> Response:
        cards = [model_card(server.base_name, None)]
        for name, method in engine.adapters().items():
            cards.append(model_card(name, server.base_name, method))
        return JSONResponse({"object": "list", "data": cards})

    async def add_adapter(request: Request) -> Response:
        body = await parse(request, AdapterBody)
        if body.name == server.base_name:
            raise bad_request(f"name: {body.name!r} is the base model's name", "name")
        path = (server.adapter_root / body.path).resolve()
        if not is_within(path, server.adapter_root):
            raise bad_request(
                f"path: {body.path!r} is outside the folder this server loads adapters from "
                f"({server.adapter_root}; --adapter-root)", "path",
            )  # fmt: skip
        if not path.is_dir():
            raise bad_request(f"path: {body.path!r} is not a folder", "path")
        try:
            method = await asyncio.to_thread(engine.load, body.name, str(path))
        except TunesmithError as err:
            raise bad_request(first_line(err), "path") from None
        return JSONResponse(model_card(body.name, server.base_name, method), status_code=201)

    async def remove_adapter(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            await asyncio.to_thread(engine.unload, name)
        except UnknownModel as err:
            raise ApiError(404, str(err), "invalid_request_error", "model_not_found") from None
        except AdapterBusy as err:
            raise ApiError(409, str(err), "invalid_request_error", "adapter_busy") from None
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(
            metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions, "chat"), methods=["POST"]),
        Route("/v1/completions", guarded(completions, "completions"), methods=["POST"]),
        Route("/v1/models", guarded(models, "models"), methods=["GET"]),
        Route("/v1/adapters", guarded(add_adapter, "adapters"), methods=["POST"]),
        Route("/v1/adapters/{name}", guarded(remove_adapter, "adapters"), methods=["DELETE"]),
        Route("/health", guarded(health, "health", auth=False), methods=["GET"]),
        Route("/metrics", guarded(prometheus, "metrics"), methods=["GET"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return ApiError(status, message, "invalid_request_error", "not_found").response()

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )


def _usage(prompt_tokens: int, generated: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
    }


@contextmanager
def running(server: Server, host: str = "127.0.0.1", port: int = 0):
    """Serve `server` from a background thread (tests, benchmarks); yields the base URL
    (`http://host:port`, the port chosen by the system when 0) and stops on exit."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(build_app(server), log_level="warning", lifespan="on")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        sock.close()
