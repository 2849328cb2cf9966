"""Running an ASGI app with uvicorn, for `tunesmith serve` and `tunesmith review`: the
listening socket bound first (`bind`, so a port in use is reported before a model is loaded),
then served in the foreground (`serve_forever`, the commands) or from a thread
(`serve_in_thread`: tests, benchmarks). Both use uvicorn's h11 protocol with a deadline for a
request's line and headers (uvicorn has none: a client sending one header byte a minute keeps a
connection open forever); the body's deadline is the app's (`guard.read_json_body`)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from contextlib import contextmanager

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tunesmith.errors import TunesmithError

REQUEST_TIMEOUT_S = 30.0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a one-line error saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            why = "is already in use (another server?); stop it or choose another --port"
        elif err.errno == errno.EACCES:
            why = "needs privileges this user lacks (ports below 1024); choose --port 1024 or more"
        else:
            why = f"cannot be bound ({err.strerror or err}); check --host and --port"
        raise TunesmithError(f"--port {port}: {where} {why}") from None
    return sock


def timed_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request line and headers have
    not all arrived `header_timeout_s` after it opened (or after the last response) with 408."""

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                text = (
                    f"the request line and headers did not arrive within {header_timeout_s:g} s "
                    "(--request-timeout)\n"
                ).encode()
                head = (
                    "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    f"connection: close\r\ncontent-length: {len(text)}\r\n\r\n"
                ).encode()
                self.transport.write(head + text)
                self.transport.close()

    return TimedH11Protocol


def _server(app, request_timeout_s: float, lifespan: str = "on") -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        http=timed_protocol(request_timeout_s),
        ws="none",
        lifespan=lifespan,
        log_level="warning",
    )
    return uvicorn.Server(config)


def serve_forever(app, sock: socket.socket, request_timeout_s: float = REQUEST_TIMEOUT_S):
    """Serve `app` on the bound `sock` until Ctrl-C."""
    _server(app, request_timeout_s).run(sockets=[sock])


@contextmanager
def serve_in_thread(
    app,
    host: str = "127.0.0.1",
    port: int = 0,
    lifespan: str = "on",
    request_timeout_s: float = REQUEST_TIMEOUT_S,
):
    """Serve `app` from a daemon thread; yields the base URL (`http://host:port`, the port
    chosen by the system when 0) and stops the server on exit."""
    sock = bind(host, port)
    runner = _server(app, request_timeout_s, lifespan)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        sock.close()


__all__ = ["REQUEST_TIMEOUT_S", "bind", "serve_forever", "serve_in_thread", "timed_protocol"]
