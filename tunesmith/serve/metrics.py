"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4).

Requests (by endpoint and status) and their latency, tokens in and out, sequences running
(the batch) and waiting (the queue), the mean decode batch, time to first token and the
generation rate. Latency and time to first token are histograms as Prometheus defines them:
cumulative bucket counts, `_sum` and `_count` over every observation since the server started,
so they never go down between scrapes and `rate()` and `histogram_quantile()` work on them.
Written out by hand: the format is a few lines of text and this keeps the server's dependencies
at Starlette and uvicorn."""

from __future__ import annotations

import math
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Observations counted into buckets with upper bounds `bounds` (and +Inf), with their sum
    and count; safe to observe from several threads."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket, not cumulative; the last is (largest bound, +Inf)."""
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        at = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self.counts[at] += 1
            self.sum += value
            self.count += 1

    def samples(self, name: str, labels: dict | None = None) -> list[str]:
        """The `_bucket` (cumulative, `le` ascending, +Inf last), `_sum` and `_count` lines."""
        with self._lock:
            counts, total, count = list(self.counts), self.sum, self.count
        lines, running = [], 0
        for bound, n in zip([*self.bounds, math.inf], counts, strict=True):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append(f"{name}_bucket{_labels({**(labels or {}), 'le': le})} {running}")
        lines.append(f"{name}_sum{_labels(labels)} {round(total, 6)}")
        lines.append(f"{name}_count{_labels(labels)} {count}")
        return lines


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, Histogram] = {}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            histogram = self._latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS))
        histogram.observe(seconds)

    def render(self) -> str:
        stats = self.engine.stats
        lines: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        def metric(name: str, kind: str, text: str, samples) -> None:
            head(name, kind, text)
            lines.extend(f"{name}{_labels(labels)} {value}" for labels, value in samples)

        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted(self._latency.items())
        metric(
            "tunesmith_requests_total",
            "counter",
            "HTTP requests by endpoint and status code.",
            [({"endpoint": e, "status": s}, n) for (e, s), n in requests],
        )
        head("tunesmith_request_seconds", "histogram", "Seconds spent answering requests.")
        for endpoint, histogram in latency:
            lines += histogram.samples("tunesmith_request_seconds", {"endpoint": endpoint})
        metric(
            "tunesmith_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            [({}, stats.prompt_tokens)],
        )
        metric(
            "tunesmith_prefix_cache_tokens_total",
            "counter",
            "Prompt tokens whose keys and values came from the prefix cache.",
            [({}, stats.cached_prompt_tokens)],
        )
        metric(
            "tunesmith_generated_tokens_total",
            "counter",
            "Tokens generated.",
            [({}, stats.generated_tokens)],
        )
        metric(
            "tunesmith_sequences_finished_total",
            "counter",
            "Sequences finished, by reason (stop, length, cancelled, error).",
            [({"reason": r}, n) for r, n in sorted(stats.finished.items())],
        )
        metric(
            "tunesmith_running_sequences",
            "gauge",
            "Sequences in the running batch.",
            [({}, self.engine.running())],
        )
        metric(
            "tunesmith_queue_length",
            "gauge",
            "Sequences waiting for a slot.",
            [({}, self.engine.queue_length())],
        )
        mean = stats.step_rows / stats.steps if stats.steps else 0.0
        metric(
            "tunesmith_mean_batch_size",
            "gauge",
            "Mean rows per decode step since start.",
            [({}, round(mean, 4))],
        )
        rate = stats.generated_tokens / stats.busy_s if stats.busy_s else 0.0
        metric(
            "tunesmith_tokens_per_second",
            "gauge",
            "Tokens generated per second of computing, since start.",
            [({}, round(rate, 3))],
        )
        name = "tunesmith_time_to_first_token_seconds"
        head(name, "histogram", "Seconds from a sequence's arrival to its first token.")
        lines += stats.ttft.samples(name)
        metric(
            "tunesmith_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            [({}, round(time.monotonic() - self.started, 3))],
        )
        return "\n".join(lines) + "\n"
