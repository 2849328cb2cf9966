"""`tunesmith review`: blind A/B review of two models' answers from a run's samples.jsonl.

Each reviewer sees every prompt once, in an order of their own, with the two answers in a
random left/right order that only the server knows; votes (left better, right better, tie,
both bad) are appended to OUTPUT_DIR/review.jsonl as they are cast, in the models' terms (A or
B), one whole line per write. The latest vote of a reviewer on an item counts; a vote whose
item no longer has the same prompt and answers (the run was trained again) is stale and left
out. The summary gives B's win rate over A among decisive votes with a 95% Wilson interval.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.judge.evaluate import SAMPLES_FILE
from tunesmith.judge.files import Warn, needs, once, read_json_lines

REVIEW_FILE = "review.jsonl"
VOTES = ("a", "b", "tie", "both_bad")
SAMPLE_SHAPE = needs(index=int, messages=list, reference=str, answers=dict, exact=dict)
"""What a line of samples.jsonl holds (`evaluate.write_samples`)."""
VOTE_SHAPE = needs(reviewer=str, item=int, key=str, vote=str)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _vote_shape(entry: dict) -> str | None:
    problem = VOTE_SHAPE(entry)
    if problem is None and entry["vote"] not in VOTES:
        problem = f"vote {entry['vote']!r} is not one of {', '.join(VOTES)}"
    return problem


REVIEWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass
class ReviewItem:
    index: int
    key: str
    """Changes when the prompt or either answer changes: votes on another key are stale."""
    prompt: list[dict]
    reference: str
    a: str
    b: str


def load_items(
    output_dir: Path, a: str, b: str, warn: Warn = _warn
) -> tuple[list[ReviewItem], int]:
    """The items to review (answers of columns `a` and `b` of samples.jsonl that differ) and
    how many pairs were left out because the two answers are the same. A damaged line is left
    out with one warning through `warn`."""
    path = output_dir / SAMPLES_FILE
    if not path.is_file():
        raise TunesmithError(
            f"{path}: no such file; it is written by `tunesmith train` with "
            "eval.generate_samples > 0 (and data.validation set)"
        )
    items, same = [], 0
    for number, record in read_json_lines(path, warn, SAMPLE_SHAPE):
        answers = record["answers"]
        for name in (a, b):
            if name not in answers:
                raise TunesmithError(
                    f"{path}, line {number}: no answers from {name!r}; the columns are "
                    f"{', '.join(sorted(answers))} (choose with --a and --b)"
                )
        if answers[a] == answers[b]:
            same += 1
            continue
        payload = json.dumps([record["messages"], answers[a], answers[b]], ensure_ascii=False)
        key = hashlib.sha256(payload.encode()).hexdigest()[:16]
        items.append(
            ReviewItem(
                record["index"],
                key,
                record["messages"],
                record["reference"],
                answers[a],
                answers[b],
            )
        )
    return items, same


def check_reviewer(name: str) -> str:
    if not isinstance(name, str) or not REVIEWER.fullmatch(name):
        raise TunesmithError(
            f"reviewer name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'"
        )
    return name


def _rng(reviewer: str, salt: str) -> random.Random:
    digest = hashlib.sha256(f"{reviewer}\0{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def order_for(reviewer: str, items: list[ReviewItem]) -> list[ReviewItem]:
    """The reviewer's own order of the items (the same on every reload)."""
    order = list(items)
    _rng(reviewer, "order").shuffle(order)
    return order


def a_on_left(reviewer: str, item: ReviewItem) -> bool:
    """Whether model A's answer is shown on the left to this reviewer (a fair coin per item
    and reviewer, the same on every reload)."""
    return _rng(reviewer, item.key).random() < 0.5


def to_vote(side: str, left_is_a: bool) -> str:
    """A vote on the page (left, right, tie, both_bad) in the models' terms."""
    if side in ("tie", "both_bad"):
        return side
    if side not in ("left", "right"):
        raise ValueError(f"vote must be left, right, tie or both_bad, got {side!r}")
    return "a" if (side == "left") == left_is_a else "b"


class VoteLog:
    """review.jsonl: appends one whole line per vote (one write on an O_APPEND file, then
    fsync), so a crash leaves at most a torn last line, which reading skips (with a warning,
    as it does any other damaged line)."""

    def __init__(self, path: Path, warn: Warn = _warn) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.warn = once(warn)  # the log is read again on every request

    def append(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size and not _ends_with_newline(fd):
                    line = b"\n" + line  # after a torn line, start a new one
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict]:
        return [entry for _, entry in read_json_lines(self.path, self.warn, _vote_shape)]


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def latest_votes(entries: list[dict], items: list[ReviewItem]) -> dict[tuple[str, int], dict]:
    """(reviewer, item index) -> the reviewer's latest vote on the item as it is now."""
    keys = {item.index: item.key for item in items}
    latest = {}
    for entry in entries:
        if keys.get(entry.get("item")) == entry.get("key"):
            latest[(entry["reviewer"], entry["item"])] = entry
    return latest


def wilson(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def tally(votes: list[dict]) -> dict:
    """Counts of each vote and B's win rate over A among decisive votes, with its interval."""
    counts = {v: sum(1 for e in votes if e["vote"] == v) for v in VOTES}
    decisive = counts["a"] + counts["b"]
    low, high = wilson(counts["b"], decisive)
    return {
        **counts,
        "votes": len(votes),
        "win_rate_b": counts["b"] / decisive if decisive else None,
        "ci95": [low, high] if decisive else None,
    }


def summary(entries: list[dict], items: list[ReviewItem]) -> dict:
    """All reviewers together and each on their own."""
    latest = latest_votes(entries, items)
    reviewers = sorted({r for r, _ in latest})
    return {
        "items": len(items),
        "all": tally(list(latest.values())),
        "reviewers": {
            r: tally([e for (who, _), e in latest.items() if who == r]) for r in reviewers
        },
        "stale": sum(1 for e in entries if (e["reviewer"], e["item"]) not in latest),
    }


def summary_lines(result: dict, a: str, b: str) -> list[str]:
    def line(label: str, t: dict) -> str:
        rate = (
            f"{b} wins {100 * t['win_rate_b']:.0f}% of decisive votes (95% CI "
            f"{100 * t['ci95'][0]:.0f}-{100 * t['ci95'][1]:.0f}%)"
            if t["win_rate_b"] is not None
            else "no decisive votes yet"
        )
        return (
            f"{label}: {t['votes']} votes: {a} better {t['a']}, {b} better {t['b']}, "
            f"tie {t['tie']}, both bad {t['both_bad']}; {rate}"
        )

    lines = [line("all reviewers", result["all"])]
    lines += [line(f"  {r}", t) for r, t in result["reviewers"].items()]
    return lines


class Review:
    """The state behind the review page."""

    def __init__(self, output_dir: Path, a: str, b: str, warn: Warn = _warn) -> None:
        self.output_dir = Path(output_dir)
        self.a, self.b = a, b
        self.items, self.identical = load_items(self.output_dir, a, b, warn)
        if not self.items:
            raise TunesmithError(
                f"{self.output_dir / SAMPLES_FILE}: {a!r} and {b!r} gave the same answer to "
                "every prompt; there is nothing to review"
            )
        self.by_index = {item.index: item for item in self.items}
        self.log = VoteLog(self.output_dir / REVIEW_FILE, warn)

    def queue(self, reviewer: str) -> dict:
        """The reviewer's items in their order, as the page shows them (no model names), and
        which of them they have voted on."""
        check_reviewer(reviewer)
        latest = latest_votes(self.log.read(), self.items)
        shown = []
        for item in order_for(reviewer, self.items):
            left_is_a = a_on_left(reviewer, item)
            vote = latest.get((reviewer, item.index))
            side = None
            if vote is not None:
                side = {"tie": "tie", "both_bad": "both_bad"}.get(vote["vote"]) or (
                    "left" if (vote["vote"] == "a") == left_is_a else "right"
                )
            shown.append(
                {
                    "item": item.index,
                    "key": item.key,
                    "prompt": item.prompt,
                    "reference": item.reference,
                    "left": item.a if left_is_a else item.b,
                    "right": item.b if left_is_a else item.a,
                    "voted": side,
                }
            )
        return {"reviewer": reviewer, "items": shown, "identical": self.identical}

    def vote(self, reviewer: str, index: int, key: str, side: str) -> dict:
        check_reviewer(reviewer)
        item = self.by_index.get(index)
        if item is None or item.key != key:
            raise TunesmithError(
                f"item {index}: not in this review (or its answers changed); reload the page"
            )
        entry = {
            "reviewer": reviewer,
            "item": index,
            "key": key,
            "vote": to_vote(side, a_on_left(reviewer, item)),
            "a": self.a,
            "b": self.b,
            "time": round(time.time(), 3),
        }
        self.log.append(entry)
        return entry

    def summary(self) -> dict:
        return {"a": self.a, "b": self.b, **summary(self.log.read(), self.items)}


__all__ = [
    "REVIEW_FILE",
    "Review",
    "ReviewItem",
    "VoteLog",
    "a_on_left",
    "load_items",
    "summary",
    "summary_lines",
    "tally",
    "to_vote",
    "wilson",
]
