"""What the two local HTTP servers (`tunesmith serve` and `tunesmith review`) check before a
handler runs, in one place:

- where they may listen: loopback, or any other address only with an API key (`check_bind`);
- the Host header: one of the names this server answers to (`allowed_hosts`), so a web page
  whose DNS name is rebound to 127.0.0.1 gets a 421 instead of a local model or the votes;
- the Origin header, when a browser sends one: the server's own origin, so a page elsewhere
  cannot post (a plain HTML form needs no CORS preflight);
- state-changing requests carry `Content-Type: application/json` (a form cannot send that);
- the API key, when the server has one (constant-time comparison);
- the body: at most `limit` bytes, all of it within `timeout_s`, JSON whose strings are valid
  Unicode (a lone surrogate cannot be tokenized or written back).

Each check raises `Refused` (status, message, code); each server turns it into its own error
body. Slow request headers are cut off by the uvicorn protocol in `runner.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect, Request

from tunesmith.errors import TunesmithError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Addresses and names of this machine that a server may bind without an API key."""
WILDCARDS = ("0.0.0.0", "::", "")


class Refused(Exception):
    """A request this server will not handle: HTTP `status`, a one-line `message`, a short
    machine-readable `code`."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def check_bind(host: str, api_key: str | None, what: str) -> None:
    """Binding beyond this machine needs an API key (`what`: what would be exposed)."""
    if host not in LOOPBACK and not api_key:
        raise TunesmithError(
            f"--host {host}: binding beyond this machine would open {what} to the network; "
            "bind 127.0.0.1, or set --api-key (or the TUNESMITH_API_KEY environment variable)"
        )


def check_settings(counts: dict[str, int], seconds: dict[str, float]) -> None:
    """A server's settings by option name: each count at least 1, each duration more than 0
    seconds; a one-line error naming the first that is not."""
    for option, value in counts.items():
        if value < 1:
            raise TunesmithError(f"{option}: must be at least 1, got {value}")
    for option, value in seconds.items():
        if not value > 0:
            raise TunesmithError(f"{option}: must be more than 0 seconds, got {value:g}")


def host_name(value: str) -> str:
    """A Host header (or an Origin's netloc) as a bare lower-case name: no port, no IPv6
    brackets, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(bind: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The Host names a server bound to `bind` answers to: this machine's loopback names, the
    bound address itself (unless a wildcard), and `extra` (`--allowed-host`; `*`: any)."""
    names = {*LOOPBACK, *(host_name(h) for h in extra)}
    if host_name(bind) not in WILDCARDS:
        names.add(host_name(bind))
    return frozenset(names)


@dataclass(frozen=True)
class Access:
    """Who may use a server: the Host names it answers to and its API key (None: none)."""

    hosts: frozenset[str] = frozenset(LOOPBACK)
    api_key: str | None = None
    key_in_query: bool = False
    """Also take the key from `?key=` (the review page's links carry it)."""

    def check(self, request: Request, key: bool = True) -> None:
        """Host, Origin and (with `key`) the API key; raises `Refused`."""
        host = request.headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            raise Refused(
                421,
                f"Host {host!r} is not a name this server answers to (it answers to "
                f"{', '.join(sorted(self.hosts))}; --allowed-host adds one)",
                "host_not_allowed",
            )
        origin = request.headers.get("origin")
        if origin is not None and not _same_origin(origin, host):
            raise Refused(
                403,
                f"Origin {origin!r} refused: this server takes requests from its own pages and "
                "from programs, not from other web sites",
                "origin_not_allowed",
            )
        if (
            key
            and self.api_key is not None
            and not hmac.compare_digest(
                _given_key(request, self.key_in_query).encode(), self.api_key.encode()
            )
        ):
            raise Refused(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                "the server's --api-key",
                "invalid_api_key",
            )


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def _given_key(request: Request, in_query: bool) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query_params.get("key", "") if in_query else ""


def check_json_content_type(request: Request) -> None:
    """A request that changes state must say its body is JSON: an HTML form on another site
    can post text/plain or form data across origins without a preflight, never JSON."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        given = f"Content-Type {kind!r}" if kind else "no Content-Type header"
        raise Refused(
            415,
            f"{given}: send the body as JSON with the header 'Content-Type: application/json'",
            "unsupported_media_type",
        )


async def read_json_body(
    request: Request, limit: int, timeout_s: float, limit_option: str | None = "--max-body-bytes"
) -> dict:
    """The request's JSON object: at most `limit` bytes (`limit_option` sets it, named in the
    413's message), received within `timeout_s`, every string valid Unicode. Raises `Refused`
    (400, 408, 413)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, limit_option)

    async def receive() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit, limit_option)
        return bytes(body)

    try:
        body = await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise Refused(
            408,
            f"the request body did not arrive within {timeout_s:g} s (--request-timeout)",
            "request_timeout",
        ) from None
    except ClientDisconnect:
        raise Refused(400, "the client closed the connection mid-body", "client_closed") from None
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(400, f"the body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object", "invalid_json")
    bad = _invalid_text(data, "")
    if bad is not None:
        raise Refused(
            400,
            f"{bad or 'body'}: holds a lone surrogate (\\ud800-\\udfff), which is not valid "
            "Unicode text",
            "invalid_text",
        )
    return data


def _invalid_text(value, where: str) -> str | None:
    """Where in `value` the first string (a key or a value) lies that UTF-8 cannot encode,
    written so that it can be: `messages[0].content`."""
    if isinstance(value, str):
        return None if _encodes(value) else where
    if isinstance(value, dict):
        pairs = [(f"{where}.{k}" if where else str(k), k, v) for k, v in value.items()]
    elif isinstance(value, list):
        pairs = [(f"{where}[{i}]", None, v) for i, v in enumerate(value)]
    else:
        return None
    for path, key, item in pairs:
        shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
        if key is not None and not _encodes(key):
            return shown
        found = _invalid_text(item, shown)
        if found is not None:
            return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_large(limit: int, option: str | None) -> Refused:
    where = f"{limit} bytes; {option}" if option else f"{limit} bytes"
    return Refused(
        413, f"the request body is larger than this server accepts ({where})", "request_too_large"
    )


__all__ = [
    "LOOPBACK",
    "Access",
    "Refused",
    "allowed_hosts",
    "check_bind",
    "check_settings",
    "check_json_content_type",
    "host_name",
    "read_json_body",
]
