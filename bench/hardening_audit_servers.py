"""The second hardening audit (issue 30): the local servers, the report and review pages, the
trackers, the data report, dropout across processes, chat templates and the kernel check, tried
as a new user and as an attacker would, from the command line and over HTTP on 127.0.0.1.
Each case prints what the user (or the attacking page) sees and whether it is what should
happen; the table goes to --out as Markdown.

    python bench/hardening_audit_servers.py [--out bench/results/hardening_audit_servers.md]

Runs from the repository root on the bundled model and data, in a scratch folder (about five
minutes on 2 CPU cores). It starts `tunesmith serve` and `tunesmith review` on free loopback
ports and stops them at the end; no request leaves this machine."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUICK = "examples/quickstart.yaml"
SHORT = ["train.max_steps=4", "train.save_every_steps=2", "eval.generate_samples=0"]
KEY = "audit-key"


def tunesmith(*args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("error:", "warning:")):
            return line
    return lines[-1] if lines else ""


class Audit:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool]] = []

    def check(self, name: str, seen: str, ok: bool) -> None:
        seen = seen.replace("\n", " ")[:300]
        self.rows.append((name, seen, ok))
        print(f"{'ok ' if ok else 'BAD'} {name}: {seen}", flush=True)

    def http(self, name: str, response: httpx.Response, status: int, text: str = "") -> None:
        body = response.text
        self.check(
            name, f"{response.status_code} {body}", response.status_code == status and text in body
        )


def start(args: list[str], url: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.get(url, timeout=5)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"did not start: {proc.stderr.read()}") from None
            time.sleep(0.3)


def raw(port: int, data: bytes, wait_s: float = 30.0) -> tuple[bytes, float]:
    """Send `data` and read until the server closes; (reply, seconds to the close)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply, time.monotonic() - started


def leave_midway(port: int, body: dict, stream: bool) -> None:
    """A client that sends a request and goes away once the first bytes (stream) or half a
    second (whole answer) have passed."""
    data = json.dumps({**body, "stream": stream}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + data)
        if stream:
            sock.recv(1024)
        else:
            time.sleep(0.2)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def serve_cases(audit: Audit, work: Path, adapter: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(
        [
            "serve",
            "--adapter",
            f"a={adapter}",
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--allowed-host",
            "models.internal",
            "--max-running",
            "4",
            "--max-queue",
            "8",
            "--request-timeout",
            "2",
            "--adapter-root",
            str(work),
        ],
        url + "/health",
    )
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def post(path, body=None, content=None, headers=None):
        payload = content if content is not None else json.dumps(body).encode()
        return httpx.post(
            url + path, content=payload, headers={**auth, **(headers or {})}, timeout=60
        )

    try:
        audit.http(
            "serve 1 DNS rebinding: Host attacker.example",
            httpx.get(url + "/v1/models", headers={**auth, "Host": "attacker.example"}),
            421,
            "is not a name this server answers to",
        )
        audit.http(
            "serve 1 Host localhost:PORT",
            httpx.get(url + "/v1/models", headers={**auth, "Host": f"localhost:{port}"}),
            200,
        )
        audit.http(
            "serve 1 --allowed-host models.internal",
            httpx.get(url + "/v1/models", headers={**auth, "Host": "models.internal"}),
            200,
        )
        audit.http(
            "serve 1 foreign Origin posts a chat",
            post("/v1/chat/completions", chat, headers={"Origin": "http://evil.example"}),
            403,
            "refused",
        )
        audit.http(
            "serve 1 Origin: null (sandboxed frame)",
            post("/v1/chat/completions", chat, headers={"Origin": "null"}),
            403,
        )
        audit.http(
            "serve 1 same-origin page posts a chat",
            post("/v1/chat/completions", chat, headers={"Origin": url}),
            200,
        )
        form = json.dumps({"name": "evil", "path": "run/adapter"}).encode()
        audit.http(
            "serve 1 form post (text/plain) loads an adapter",
            post("/v1/adapters", content=form, headers={"Content-Type": "text/plain"}),
            415,
            "Content-Type 'text/plain'",
        )
        audit.http(
            "serve 1 form post (urlencoded) loads an adapter",
            post(
                "/v1/adapters",
                content=b"name=evil&path=run",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
            415,
        )
        models = httpx.get(url + "/v1/models", headers=auth).json()["data"]
        audit.check(
            "serve 1 nothing was loaded by those",
            str([m["id"] for m in models]),
            [m["id"] for m in models] == ["tiny-llama", "a"],
        )
        audit.http(
            "serve 1 DELETE from a foreign Origin",
            httpx.delete(url + "/v1/adapters/a", headers={**auth, "Origin": "http://evil.example"}),
            403,
        )

        long = {**chat, "max_tokens": 500, "messages": [{"role": "user", "content": "def f"}]}
        for stream in (False, True):
            before = metrics(url).get('tunesmith_sequences_finished_total{reason="cancelled"}', 0)
            leave_midway(port, long, stream)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = metrics(url)
                done = now.get('tunesmith_sequences_finished_total{reason="cancelled"}', 0)
                if done > before and now["tunesmith_running_sequences"] == 0:
                    break
                time.sleep(0.05)
            generated = now["tunesmith_generated_tokens_total"]
            audit.check(
                f"serve 2 client leaves a {'streaming' if stream else 'whole'} request",
                f"cancelled {done - before:g}, running {now['tunesmith_running_sequences']:g}"
                f", tokens so far {generated:g}",
                done == before + 1 and now["tunesmith_running_sequences"] == 0,
            )

        audit.http(
            "serve 3 n=5 above --max-running 4",
            post("/v1/chat/completions", {**chat, "n": 5}),
            400,
            "too_many_sequences",
        )
        audit.http(
            "serve 3 3 prompts x n=3 above --max-running",
            post(
                "/v1/completions",
                {"model": "a", "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2},
            ),
            400,
            "(prompts × n)",
        )
        audit.http("serve 3 n=4 fits", post("/v1/chat/completions", {**chat, "n": 4}), 200)

        bad = {
            "seed 2**64": {**chat, "seed": 2**64},
            "seed -2**63-1": {**chat, "seed": -(2**63) - 1},
            "max_tokens: true": {**chat, "max_tokens": True},
            "temperature: true": {**chat, "temperature": True},
            'n: "2"': {**chat, "n": "2"},
            "lone surrogate in a message": {
                **chat,
                "messages": [{"role": "user", "content": "a\ud800"}],
            },
            "lone surrogate in the model": {**chat, "model": "\udfff"},
            "lone surrogate in a stop string": {**chat, "stop": ["\ud800"]},
        }
        for name, body in bad.items():
            raw_body = json.dumps(body).encode("utf-8", "surrogatepass")
            audit.http(f"serve 4 {name}", post("/v1/chat/completions", content=raw_body), 400)
        audit.http(
            "serve 4 seed 2**63-1 with n=3",
            post("/v1/chat/completions", {**chat, "seed": 2**63 - 1, "n": 3, "temperature": 1}),
            200,
        )
        for name, path in (
            ("NUL byte", "a\x00b"),
            ("300-character name", "x" * 300),
            ("4,000-character path", "/".join(["y" * 199] * 20)),
        ):
            audit.http(
                f"serve 4 adapter path with a {name}",
                post("/v1/adapters", {"name": "n", "path": path}),
                400,
                "path",
            )
        surrogate = json.dumps({"name": "\ud800", "path": "run/adapter"}).encode(
            "utf-8", "surrogatepass"
        )
        audit.http(
            "serve 4 adapter name with a lone surrogate",
            post("/v1/adapters", content=surrogate),
            400,
            "lone surrogate",
        )
        audit.http(
            "serve 4 body over --max-body-bytes",
            post("/v1/chat/completions", {**chat, "pad": "x" * (1 << 20)}),
            413,
        )
        reply, seconds = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX: ")
        audit.check(
            "serve 4 slow headers (slowloris)",
            f"{reply[:60]!r} after {seconds:.1f} s",
            reply.startswith(b"HTTP/1.1 408") and seconds < 10,
        )
        reply, seconds = raw(
            port,
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{{"
            ).encode(),
        )
        audit.check(
            "serve 4 half-sent body",
            f"{reply[:60]!r} after {seconds:.1f} s",
            b" 408 " in reply[:20] and seconds < 10,
        )

        first = metrics(url)
        for _ in range(3):
            post("/v1/chat/completions", chat)
        second = metrics(url)
        name = 'tunesmith_request_seconds_bucket{endpoint="chat",le="+Inf"}'
        cumulative = all(
            second.get(k, 0) >= v
            for k, v in first.items()
            if k.startswith("tunesmith_request_seconds")
        )
        audit.check(
            "serve 5 /metrics histograms never go down",
            f"{name}: {first.get(name)} -> {second.get(name)}",
            cumulative and second[name] >= first.get(name, 0) + 3,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        started = time.monotonic()
        result = tunesmith("serve", "--port", str(taken), "--model", str(work / "no-model"))
        seconds = time.monotonic() - started
    audit.check(
        "serve 6 port in use (and a model that does not exist)",
        f"{first_line(result.stderr)} ({seconds:.1f} s)",
        result.returncode == 2 and "is already in use" in result.stderr,
    )
    result = tunesmith("serve", "--host", "0.0.0.0")
    audit.check(
        "serve 0.0.0.0 without an API key",
        first_line(result.stderr),
        result.returncode == 2 and "--api-key" in result.stderr,
    )
    result = tunesmith("serve", "--request-timeout", "0")
    audit.check(
        "serve --request-timeout 0",
        first_line(result.stderr),
        result.returncode == 2 and "more than 0 seconds" in result.stderr,
    )


def write_samples(out: Path) -> None:
    lines = []
    for i, (tuned, base) in enumerate([("red", "blue"), ("4", "5"), ("Paris", "Lyon")]):
        lines.append(
            json.dumps(
                {
                    "index": i,
                    "where": f"val.jsonl, line {i + 1}",
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "reference": tuned,
                    "answers": {"base": base, "tuned": tuned},
                    "exact": {"base": False, "tuned": True},
                }
            )
        )
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")


def review_cases(audit: Audit, work: Path) -> None:
    out = work / "review-run"
    out.mkdir()
    write_samples(out)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["review", str(out), "--port", str(port)], url + "/")
    try:
        queue = httpx.get(url + "/api/queue?reviewer=ann").json()["items"]
        vote = {"reviewer": "ann", "item": queue[0]["item"], "key": queue[0]["key"], "side": "left"}
        audit.http(
            "review 1 DNS rebinding: Host attacker.example",
            httpx.get(url + "/api/summary", headers={"Host": "attacker.example"}),
            421,
        )
        audit.http(
            "review 1 form post (text/plain) casts a vote",
            httpx.post(
                url + "/api/vote", content=json.dumps(vote), headers={"Content-Type": "text/plain"}
            ),
            415,
        )
        audit.http(
            "review 1 foreign Origin casts a vote",
            httpx.post(url + "/api/vote", json=vote, headers={"Origin": "http://evil.example"}),
            403,
        )
        audit.check(
            "review 1 no vote was counted",
            str((out / "review.jsonl").exists()),
            not (out / "review.jsonl").exists(),
        )
        audit.http(
            "review 8 100 KB vote",
            httpx.post(url + "/api/vote", json={**vote, "pad": "x" * 100_000}),
            413,
        )
        audit.http(
            "review 8 reviewer 'ann\\n'",
            httpx.post(url + "/api/vote", json={**vote, "reviewer": "ann\n"}),
            400,
            "reviewer name",
        )
        audit.http(
            "review 8 item as a string",
            httpx.post(url + "/api/vote", json={**vote, "item": "0"}),
            400,
            "of another type: item",
        )
        reply, seconds = raw(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: ", wait_s=60)
        audit.check(
            "review slow headers (slowloris)",
            f"{reply[:40]!r} after {seconds:.1f} s",
            reply.startswith(b"HTTP/1.1 408"),
        )
        audit.http(
            "review a vote from its own page",
            httpx.post(url + "/api/vote", json=vote, headers={"Origin": url}),
            200,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    with open(out / "review.jsonl", "a") as f:
        f.write('{"item": 0, "key": "k", "vote": "a"}\n{"reviewer": "bob", "ite')
    result = tunesmith("review", str(out), "--summary")
    audit.check(
        "review 7 torn line and a line without a reviewer",
        " / ".join(ln for ln in result.stderr.splitlines() if ln.startswith("warning:")),
        result.returncode == 0
        and result.stderr.count("warning:") == 2
        and "no 'reviewer'" in result.stderr
        and "torn last line" in result.stderr,
    )


def report_cases(audit: Audit, work: Path) -> None:
    out = work / "report-run"
    out.mkdir()
    write_samples(out)
    (out / "config.yaml").write_text("method: lora\n")
    metrics_lines = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 5)]
    text = "".join(json.dumps(m) + "\n" for m in metrics_lines)
    damages = {
        "torn last line of samples.jsonl": ("samples.jsonl", "append", '{"index": 9, "mess'),
        "binary eval.json": ("eval.json", "bytes", b"\x89PNG\r\n\x1a\n\x00"),
        "summary.json holding a list": ("summary.json", "text", "[1, 2]"),
        "data_report.json of another shape": ("data_report.json", "text", '{"sources": 3}'),
        "an Infinity loss": ("metrics.jsonl", "text", text + '{"step": 5, "loss": Infinity}\n'),
        "a review line without a reviewer": (
            "review.jsonl",
            "text",
            '{"item": 0, "key": "k", "vote": "a"}\n',
        ),
    }
    for name, (file, how, value) in damages.items():
        (out / "metrics.jsonl").write_text(text)
        write_samples(out)
        for other in ("eval.json", "summary.json", "data_report.json", "review.jsonl"):
            (out / other).unlink(missing_ok=True)
        if how == "append":
            with open(out / file, "a") as f:
                f.write(value)
        elif how == "bytes":
            (out / file).write_bytes(value)
        else:
            (out / file).write_text(value)
        result = tunesmith("report", str(out))
        warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
        audit.check(
            f"report 7 {name}",
            warned[0] if warned else result.stderr[-200:],
            result.returncode == 0
            and len(warned) == 1
            and file in warned[0]
            and (out / "report.html").is_file(),
        )
    write_samples(out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["answers"]["tuned"] = "<!--<script>alert(1)</script>"
    (out / "samples.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    tunesmith("report", str(out))
    page = (out / "report.html").read_text()
    block = page.split('id="samples-data">', 1)[1].split("</script>", 1)[0]
    audit.check(
        "report 7 a sample holding <!--<script>",
        block[:80],
        "<" not in block and json.loads(block)[0]["answers"]["tuned"].startswith("<!--"),
    )


def tracker_cases(audit: Audit, work: Path) -> None:
    (work / "a-file").write_text("x")
    cases = {
        "mlflow: unreachable tracking server": (
            {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
            "mlflow",
        ),
        "mlflow: store under a file": (
            {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/a-file/m.db"},
            "mlflow",
        ),
        "wandb: online without an API key": (
            {"WANDB_MODE": "online", "WANDB_API_KEY": ""},
            "wandb",
        ),
    }
    for name, (env, tracker) in cases.items():
        out = work / f"tracked-{tracker}-{len(audit.rows)}"
        started = time.monotonic()
        result = tunesmith(
            "train", QUICK, f"output_dir={out}", *SHORT, f"train.report_to=[{tracker}]", env=env
        )
        seconds = time.monotonic() - started
        line = first_line(result.stderr)
        audit.check(
            f"trackers 9 {name}",
            f"{line} ({seconds:.0f} s; output_dir left: {out.exists()})",
            result.returncode == 2
            and line.startswith(f"error: train.report_to: {tracker} could not start")
            and not out.exists(),
        )


def data_cases(audit: Audit, work: Path) -> None:
    result = tunesmith("data", "report", QUICK, "data.max_seq_len=8", f"output_dir={work / 'dr'}")
    top = next((ln for ln in result.stdout.splitlines() if "no sample survives" in ln), "")
    audit.check(
        "data report 10 nothing survives preparation",
        top.strip(),
        result.returncode == 0 and bool(top),
    )
    jinja = ROOT / "tests/data/chat_templates/mistralai-Mistral-7B-Instruct-v0.3.jinja"
    result = tunesmith(
        "preprocess",
        QUICK,
        f"data.chat_template={jinja}",
        "data.system_prompt=Be brief.",
        "--show",
        "0",
    )
    warned = [ln for ln in result.stderr.splitlines() if "chat template" in ln]
    audit.check(
        "templates Mistral v0.3 with a system prompt",
        " / ".join(w[:160] for w in warned),
        result.returncode == 0 and len(warned) >= 2,
    )


def dropout_case(audit: Audit, work: Path) -> None:
    losses = {}
    for procs in (1, 2):
        out = work / f"drop{procs}"
        args = [
            "train",
            QUICK,
            f"output_dir={out}",
            "train.max_steps=4",
            "train.log_every_steps=1",
            "eval.generate_samples=0",
            "method.dropout=0.2",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=2",
        ]
        if procs == 2:
            args += ["--nproc", "2"]
        result = tunesmith(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        entries = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses[procs] = [round(e["loss"], 5) for e in entries if "loss" in e]
    audit.check(
        "torchrun 11 dropout 0.2: 1 vs 2 processes",
        f"{losses[1]} vs {losses[2]}",
        losses[1] == losses[2],
    )


def kernel_case(audit: Audit) -> None:
    code = (
        "import warnings; from tunesmith.train.kernels import KERNELS, checked_kernels; "
        "print(checked_kernels(KERNELS, 'cpu'))"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    warned = [ln for ln in result.stderr.splitlines() if "train.kernels:" in ln]
    audit.check(
        "kernels liger checked on first use (Triton interpreter)",
        f"{result.stdout.strip()}; {len(warned)} fell back",
        "('rope', 'cross_entropy')" in result.stdout and len(warned) == 2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Write the table here too.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-audit2-"))
    audit = Audit()
    run = work / "run"
    trained = tunesmith("train", QUICK, f"output_dir={run}", *SHORT)
    assert trained.returncode == 0, trained.stderr
    try:
        serve_cases(audit, work, run / "adapter")
        review_cases(audit, work)
        report_cases(audit, work)
        tracker_cases(audit, work)
        data_cases(audit, work)
        dropout_case(audit, work)
        kernel_case(audit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| case | what the user (or the other site) sees | as expected |", "|---|---|---|"]
    for name, seen, ok in audit.rows:
        shown = seen.replace("|", "/").replace(str(work), "WORK")
        table.append(f"| {name} | `{shown}` | {'yes' if ok else 'NO'} |")
    bad = [name for name, _, ok in audit.rows if not ok]
    summary = f"{len(audit.rows) - len(bad)} of {len(audit.rows)} cases as expected"
    report = "\n".join(table) + f"\n\n{summary}\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    print(f"{summary}; not: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
