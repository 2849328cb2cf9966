"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4).

Requests (by endpoint and status) and their latency, tokens in and out, sequences running
(the batch) and waiting (the queue), the mean decode batch, time to first token and the
generation rate. Written out by hand: the format is a few lines of text and this keeps the
server's dependencies at Starlette and uvicorn."""

from __future__ import annotations

import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency_sum: dict[str, float] = {}
        self._latency_count: dict[str, int] = {}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency_sum[endpoint] = self._latency_sum.get(endpoint, 0.0) + seconds
            self._latency_count[endpoint] = self._latency_count.get(endpoint, 0) + 1

    def render(self) -> str:
        stats = self.engine.stats
        lines: list[str] = []

        def metric(name: str, kind: str, text: str, samples) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")

        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted(self._latency_sum.items())
            counts = dict(self._latency_count)
        metric(
            "tunesmith_requests_total", "counter", "HTTP requests by endpoint and status code.",
            [({"endpoint": e, "status": s}, n) for (e, s), n in requests],
        )  # fmt: skip
        lines.append("# HELP tunesmith_request_seconds Seconds spent answering requests.")
        lines.append("# TYPE tunesmith_request_seconds summary")
        for e, v in latency:
            lines.append(f'tunesmith_request_seconds_sum{{endpoint="{e}"}} {round(v, 6)}')
            lines.append(f'tunesmith_request_seconds_count{{endpoint="{e}"}} {counts[e]}')
        metric(
            "tunesmith_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
            [({}, stats.prompt_tokens)],
        )  # fmt: skip
        metric(
            "tunesmith_generated_tokens_total", "counter", "Tokens generated.",
            [({}, stats.generated_tokens)],
        )  # fmt: skip
        metric(
            "tunesmith_sequences_finished_total", "counter",
            "Sequences finished, by reason (stop, length, cancelled, error).",
            [({"reason": r}, n) for r, n in sorted(stats.finished.items())],
        )  # fmt: skip
        metric(
            "tunesmith_running_sequences", "gauge", "Sequences in the running batch.",
            [({}, self.engine.running())],
        )  # fmt: skip
        metric(
            "tunesmith_queue_length", "gauge", "Sequences waiting for a slot.",
            [({}, self.engine.queue_length())],
        )  # fmt: skip
        mean = stats.step_rows / stats.steps if stats.steps else 0.0
        metric(
            "tunesmith_mean_batch_size", "gauge", "Mean rows per decode step since start.",
            [({}, round(mean, 4))],
        )  # fmt: skip
        rate = stats.generated_tokens / stats.busy_s if stats.busy_s else 0.0
        metric(
            "tunesmith_tokens_per_second", "gauge",
            "Tokens generated per second of computing, since start.", [({}, round(rate, 3))],
        )  # fmt: skip
        ttft = list(stats.ttft_s)
        name = "tunesmith_time_to_first_token_seconds"
        lines.append(f"# HELP {name} Time to first token of the last 1000 sequences.")
        lines.append(f"# TYPE {name} histogram")
        for bound in TTFT_BUCKETS:
            lines.append(f'{name}_bucket{{le="{bound}"}} {sum(1 for t in ttft if t <= bound)}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {len(ttft)}')
        lines.append(f"{name}_sum {round(sum(ttft), 6)}")
        lines.append(f"{name}_count {len(ttft)}")
        metric(
            "tunesmith_uptime_seconds", "gauge", "Seconds since the server started.",
            [({}, round(time.monotonic() - self.started, 3))],
        )  # fmt: skip
        return "\n".join(lines) + "\n"
