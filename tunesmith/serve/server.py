"""What the routes of `tunesmith serve` share: the server's state and limits (`Server`,
`Limits`), the request bodies, and OpenAI's error body (`ApiError`). The routes are in
`app.py`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from tunesmith.data.encode import bos_prefix
from tunesmith.errors import TunesmithError
from tunesmith.generation import chat_template_of, prompt_ids
from tunesmith.serve.engine import Engine, GrammarError, Params
from tunesmith.serve.guard import Access, Refused, read_json_body
from tunesmith.serve.metrics import Metrics
from tunesmith.serve.runner import REQUEST_TIMEOUT_S

INVALID = "invalid_request_error"


@dataclass
class Limits:
    """What one request may ask for, and how long it may take."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    """The most tokens one completion may generate (and the default when a request says none)."""
    max_n: int = 8
    timeout_s: float = 300.0
    """Seconds from a request's arrival to its last token (--timeout; then 504)."""
    request_timeout_s: float = REQUEST_TIMEOUT_S
    """Seconds a client may take to send a request's line and headers, and again its body
    (--request-timeout; then 408)."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.param, self.headers = param, headers or {}

    @classmethod
    def of(cls, refused: Refused) -> ApiError:
        """A guard's refusal as OpenAI's error body."""
        kinds = {401: "authentication_error", 403: "permission_error", 421: "permission_error"}
        return cls(
            refused.status, refused.message, kinds.get(refused.status, INVALID), refused.code
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.kind, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


# --- request bodies ---------------------------------------------------------------------------
# JSON's true is not a number and "3" is not an int: no coercion between kinds
Number = Annotated[float, Strict()]
"""A JSON number (an int is one; a bool or a string is not)."""
INT64 = 2**63


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not act on is refused, not ignored

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    stop: Union[str, list[str], None] = None  # noqa: UP007
    stream: StrictBool = False
    stream_options: dict | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    user: str | None = None
    """An end-user id (OpenAI's abuse monitoring): accepted and not used."""


class _Part(BaseModel):
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_Part], None] = None  # noqa: UP007
    name: str | None = None
    """A participant's name: accepted and not shown to the model (as OpenAI's own models)."""


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    """More arguments for the chat template (as vLLM takes them), e.g. enable_thinking."""


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]  # noqa: UP007
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    response_format: ResponseFormat | None = None
    """Not in OpenAI's completions API; vLLM takes it there too."""
    echo: StrictBool = False
    suffix: str | None = None


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    path: str = Field(min_length=1, max_length=4096)


def validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"{where}: tunesmith serve does not take this field; remove it", where
    return f"{where}: {first['msg']}", where


# --- the app ----------------------------------------------------------------------------------
class Server:
    """The state behind the routes: the engine, what it serves and the limits."""

    def __init__(
        self,
        engine: Engine,
        base_name: str,
        *,
        api_key: str | None = None,
        limits: Limits | None = None,
        adapter_root: str | Path = ".",
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.engine = engine
        self.base_name = base_name
        self.access = Access(api_key=api_key) if hosts is None else Access(hosts, api_key)
        self.limits = limits or Limits()
        self.adapter_root = Path(adapter_root).resolve()
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.tokenizer = engine.tokenizer

    async def read_json(self, request: Request) -> dict:
        """The request's JSON body, within --max-body-bytes and --request-timeout."""
        try:
            return await read_json_body(
                request, self.limits.max_body_bytes, self.limits.request_timeout_s
            )
        except Refused as err:
            raise ApiError.of(err) from None

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise ApiError(
            404,
            f"the model {model!r} does not exist; GET /v1/models lists the base "
            f"({self.base_name!r}) and the adapters this server has",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    def params(self, body: _Body, prompt_tokens: int, max_tokens: int | None) -> Params:
        if body.presence_penalty or body.frequency_penalty:
            raise bad_request(
                "presence_penalty and frequency_penalty are not supported by tunesmith serve; "
                "leave them at 0",
                "presence_penalty",
            )
        if body.n > self.limits.max_n:
            raise bad_request(f"n: at most {self.limits.max_n} on this server (--max-n)", "n")
        cap = self.limits.max_tokens
        if max_tokens is not None and max_tokens > cap:
            raise bad_request(
                f"max_tokens: {max_tokens} is more than this server allows ({cap}; --max-tokens)",
                "max_tokens",
            )
        context = self.engine.context
        room = context - prompt_tokens
        wanted = max_tokens if max_tokens is not None else min(cap, room)
        if wanted > room:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, "
                f"{wanted} in the completion). Please reduce the length of the prompt or "
                "completion.",
                "messages",
                "context_length_exceeded",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("stop: up to 4 non-empty strings", "stop")
        if isinstance(body, ChatBody):
            if body.top_logprobs is not None and not body.logprobs:
                raise bad_request("top_logprobs: set logprobs to true as well", "top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        grammar = self.grammar(body.response_format)
        return Params(
            wanted, body.temperature, body.top_p, body.seed, tuple(stop), logprobs, grammar
        )

    def grammar(self, form: ResponseFormat | None) -> str | None:
        """The llguidance grammar that `response_format` asks for (None: free text), or a 400
        naming what is wrong with it."""
        if form is None or form.type == "text":
            return None
        if form.type == "json_schema" and form.json_schema is None:
            raise bad_request(
                "response_format.json_schema: give {name, schema} with type json_schema",
                "response_format",
            )
        schema = {"type": "object"} if form.type == "json_object" else form.json_schema.schema_
        try:
            return self.engine.json_grammar(schema)
        except GrammarError as err:
            raise bad_request(
                f"response_format.json_schema.schema: {err}", "response_format"
            ) from None

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
        kwargs = body.chat_template_kwargs
        return prompt_ids(messages, template, self.tokenizer, add_bos=False, template_kwargs=kwargs)

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
