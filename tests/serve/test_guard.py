"""The server as an attacker would try it: other web sites (DNS rebinding, HTML forms, foreign
Origins), clients that go away or send slowly, requests that can never fit, input that must not
reach a 500, the Prometheus histograms, and a port in use. Each test fails on the server before
issue 30's fixes (the streaming disconnect excepted: Starlette already cancelled it). None
depends on the machine's speed: decode steps are held where a request must still run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from helpers.adapters import BUNDLED, adapter_folder
from helpers.runs import run_cli
from helpers.serving import gated_steps, wait_for

from tunesmith.builder import load_for_inference
from tunesmith.serve.app import Limits, Server, running
from tunesmith.serve.guard import allowed_hosts, host_name

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALPHA = "alpha/alpha"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The --adapter-root, holding one LoRA adapter at ALPHA."""
    root = tmp_path_factory.mktemp("adapters")
    folder = adapter_folder(root, BUNDLED, "lora", name="alpha", seed=1, b_scale=3)
    assert folder.relative_to(root).as_posix() == ALPHA
    return root


def _server(root: Path, **kw) -> Server:
    from tunesmith.serve.engine import Engine

    model, tokenizer, _ = load_for_inference(str(BUNDLED), [])
    engine = Engine(
        model,
        tokenizer,
        max_running=kw.pop("max_running", 4),
        max_queue=kw.pop("max_queue", 8),
    )
    hosts = kw.pop("hosts", None)
    return Server(
        engine, "tiny-llama", api_key=KEY, limits=Limits(**kw), adapter_root=root, hosts=hosts
    )


@pytest.fixture(scope="module")
def served(root):
    server = _server(root, request_timeout_s=1.0)
    with running(server) as url:
        yield server, url


def _post(url: str, path: str, body, headers=None, **kw) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=60, **kw)


# --- 1. other sites cannot drive the server ---------------------------------------------------
def test_host_names_are_compared_without_port_brackets_or_case():
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("localhost.") == "localhost" and host_name("127.0.0.1") == "127.0.0.1"
    assert allowed_hosts("0.0.0.0") == {"127.0.0.1", "localhost", "::1"}
    expected = {"127.0.0.1", "localhost", "::1", "10.1.2.3", "my.box"}
    assert allowed_hosts("10.1.2.3", ["My.Box:443"]) == expected


def test_a_rebound_dns_name_gets_421_and_allowed_hosts_pass(served, root):
    server, url = served
    r = httpx.get(url + "/v1/models", headers={**AUTH, "Host": "attacker.example:8000"})
    assert r.status_code == 421
    assert r.json()["error"] == {
        "message": "Host 'attacker.example:8000' is not a name this server answers to (it "
        "answers to 127.0.0.1, ::1, localhost; --allowed-host adds one)",
        "type": "permission_error",
        "param": None,
        "code": "host_not_allowed",
    }
    assert httpx.get(url + "/health", headers={"Host": "attacker.example"}).status_code == 421
    assert httpx.get(url + "/v1/models", headers={**AUTH, "Host": "localhost:1"}).status_code == 200
    other = _server(root, hosts=allowed_hosts("127.0.0.1", ["models.internal"]))
    with running(other) as url2:
        ok = httpx.get(url2 + "/v1/models", headers={**AUTH, "Host": "models.internal:8000"})
        assert ok.status_code == 200
        assert httpx.get(url2 + "/v1/models", headers={**AUTH, "Host": "x.y"}).status_code == 421


def test_a_form_post_from_another_site_loads_nothing(served, root):
    server, url = served
    form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    body = json.dumps({"name": "evil", "path": ALPHA}).encode()
    r = _post(url, "/v1/adapters", body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["message"] == (
        "Content-Type 'text/plain': send the body as JSON with the header "
        "'Content-Type: application/json'"
    )
    r = _post(
        url, "/v1/adapters", body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415
    r = _post(url, "/v1/adapters", body, headers=form)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = _post(url, "/v1/adapters", body, headers={"Origin": "null"})
    assert r.status_code == 403
    r = httpx.delete(url + "/v1/adapters/alpha", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 403
    assert "evil" not in server.engine.adapters()
    same = {"Origin": url}  # the server's own origin (a page it served) passes
    r = _post(url, "/v1/adapters", body, headers=same)
    assert r.status_code == 201 and "evil" in server.engine.adapters()
    assert httpx.delete(url + "/v1/adapters/evil", headers=AUTH).status_code == 200


# --- 2. a client that goes away frees its slot within one decode step -------------------------
def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_slot_within_one_step(served, monkeypatch, stream):
    """Decode steps are held while the client leaves, so the check counts steps, not time:
    the sequence is cancelled before the next step and leaves the batch after it."""
    server, url = served
    engine = server.engine
    seen = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda seqs: (seen.extend(seqs), real_submit(seqs)))
    cancelled = engine.stats.finished.get("cancelled", 0)
    with gated_steps(engine) as gate:
        sock = _raw_request(url, {**CHAT, "max_tokens": 400, "stream": stream})
        wait_for(lambda: seen and seen[0].generated == 1, "the request was not admitted")
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
        wait_for(lambda: seen[0].cancelled, "the server did not notice the client leave")
        gate.set()
        wait_for(
            lambda: seen[0].done and engine.cached_tokens() == 0 and engine.running() == 0,
            "the sequence did not leave the batch",
        )
    seq = seen[0]
    assert seq.finish_reason == "cancelled" and seq.generated_at_cancel == 1  # the prefill's
    assert seq.generated - seq.generated_at_cancel <= 1  # the step under way, no more
    assert engine.stats.finished["cancelled"] == cancelled + 1


# --- 3. a request that can never fit is a 400 -------------------------------------------------
def test_more_completions_than_the_server_runs_is_400_not_429(root):
    server = _server(root, max_running=2, max_queue=8)
    with running(server) as url:
        r = _post(url, "/v1/chat/completions", {**CHAT, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
        assert r.json()["error"]["message"] == (
            "this request asks for 3 completions (prompts × n), more than this server takes at "
            "once (2; --max-running); send fewer prompts or a smaller n"
        )
        prompts = {"model": "tiny-llama", "prompt": ["a", "b", "c"], "max_tokens": 2}
        assert _post(url, "/v1/completions", prompts).status_code == 400
        assert _post(url, "/v1/chat/completions", {**CHAT, "n": 2}).status_code == 200
    server = _server(root, max_running=8, max_queue=2)
    with running(server) as url:
        r = _post(url, "/v1/chat/completions", {**CHAT, "n": 3})
        assert r.status_code == 400 and "(2; --max-queue)" in r.json()["error"]["message"]


# --- 4. client input never gives a 500 --------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, where",
    [
        ({**CHAT, "seed": 2**64}, 400, "seed"),
        ({**CHAT, "seed": -(2**63) - 1}, 400, "seed"),
        ({**CHAT, "max_tokens": True}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": "4"}, 400, "max_tokens"),
        ({**CHAT, "n": 1.5}, 400, "n"),
        ({**CHAT, "temperature": True}, 400, "temperature"),
        ({**CHAT, "stream": "yes"}, 400, "stream"),
        ({**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages"),
        ({**CHAT, "model": "x\udfff"}, 400, "model"),
        ({**CHAT, "stop": ["\ud800"]}, 400, "stop"),
        ({"model": "tiny-llama", "prompt": [[1, 2**70]]}, 400, "prompt"),
    ],
)
def test_bad_fields_are_400_naming_the_field(served, body, status, where):
    _, url = served
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # lone surrogates as JSON escapes
    r = _post(url, path, raw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"].startswith(where), r.json()


def test_largest_seeds_with_several_choices_still_answer(served):
    _, url = served
    r = _post(url, "/v1/chat/completions", {**CHAT, "seed": 2**63 - 1, "n": 3, "temperature": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


@pytest.mark.parametrize(
    "path, message",
    [
        ("a\x00b", "path: holds a NUL character"),
        ("x" * 300, "path: 'xxxxxxxx"),
        ("/".join(["y" * 200] * 20), "path: "),
        ("../outside", "path: '../outside' is outside the folder"),
    ],
)
def test_bad_adapter_paths_are_400(served, path, message):
    _, url = served
    r = _post(url, "/v1/adapters", {"name": "n", "path": path})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text


def test_bad_adapter_names_are_400(served):
    _, url = served
    for name in ("a/b", "", "x" * 300, "\x00"):
        r = _post(url, "/v1/adapters", {"name": name, "path": ALPHA})
        assert r.status_code == 400, (name, r.text)
    raw = json.dumps({"name": "\ud800", "path": ALPHA}).encode("utf-8", "surrogatepass")
    r = _post(url, "/v1/adapters", raw)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "name: holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode text"
    )


def test_slow_headers_and_bodies_are_timed_out(served):
    _, url = served  # --request-timeout 1 s here
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        reply = sock.recv(4096)  # the server answers and closes; it does not wait for us
        assert reply.startswith(b"HTTP/1.1 408 Request Timeout")
        assert b"(--request-timeout)" in reply and sock.recv(4096) == b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k"
            b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'
        )
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408")
        assert b"the request body did not arrive within 1 s (--request-timeout)" in reply


# --- 5. /metrics: Prometheus histograms --------------------------------------------------------
def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_histograms_are_cumulative_and_never_go_down(served):
    _, url = served
    before = _samples(httpx.get(url + "/metrics", headers=AUTH).text)
    for _ in range(3):
        assert _post(url, "/v1/chat/completions", CHAT).status_code == 200
    text = httpx.get(url + "/metrics", headers=AUTH).text
    after = _samples(text)
    assert "# TYPE tunesmith_request_seconds histogram" in text
    assert "# TYPE tunesmith_time_to_first_token_seconds histogram" in text
    for name in ("tunesmith_request_seconds", "tunesmith_time_to_first_token_seconds"):
        label = '{endpoint="chat",' if name == "tunesmith_request_seconds" else "{"
        buckets = [(k, v) for k, v in after.items() if k.startswith(f"{name}_bucket{label}")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0].endswith('le="+Inf"}')
        count_key = f"{name}_count" + ('{endpoint="chat"}' if label != "{" else "")
        assert buckets[-1][1] == after[count_key]
        assert after[count_key] - before.get(count_key, 0) == 3
        for key, value in before.items():
            if key.startswith(name):
                assert after[key] >= value, key


# --- 6. the port is checked before the model loads --------------------------------------------
def test_serve_says_the_port_is_in_use_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model folder that does not exist: the port is checked first, so it is not reached
        run = run_cli("serve", "--model", str(tmp_path / "nothing"), "--port", str(port))
    assert run.returncode == 2
    assert run.stderr == (
        f"error: --port {port}: 127.0.0.1:{port} is already in use (another server?); stop it "
        "or choose another --port\n"
    )
