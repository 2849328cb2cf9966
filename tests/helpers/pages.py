"""A run's output folder as the report and review pages read it, made by hand, and a
headless Chromium (Debian's, driven by Playwright) to open them in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

PROMPTS = [
    "How many words: a b c",
    "Are these all from nature: leaf stone",
    "Say hi",
    "Name a colour",
    "2+2?",
    "Capital of France?",
]
REFERENCES = ["There are 3 words.", "Yes, all of them.", "hi", "red", "4", "Paris"]
BASE = ["The following:", "Yes, all of them.", "hello there", "docs docs", "5", "Paris"]
TUNED = ["There are 3 words.", "Yes, all of them.", "hi", "red", "4", "Lyon"]


def write_run(out: Path) -> Path:
    """Six samples: base and tuned both right on 1 (identical, so not reviewed), tuned right
    where base is wrong on 0, 2, 3, 4, base right and tuned wrong on 5."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (p, r, b, t) in enumerate(zip(PROMPTS, REFERENCES, BASE, TUNED, strict=True)):
        lines.append(
            json.dumps(
                {
                    "index": i,
                    "where": f"val.jsonl, line {i + 1}",
                    "messages": [{"role": "user", "content": p}],
                    "reference": r,
                    "answers": {"base": b, "tuned": t},
                    "exact": {
                        "base": b.lower().strip(".") == r.lower().strip("."),
                        "tuned": t.lower().strip(".") == r.lower().strip("."),
                    },
                }
            )
        )
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (out / "eval.json").write_text(
        json.dumps(
            {
                "samples": 6,
                "columns": {
                    "base": {
                        "perplexity": 4255.9,
                        "exact_match": 2 / 6,
                        "contains": 0.5,
                        "accuracy": None,
                        "bleu": 0.1,
                        "chrf": 0.2,
                        "rouge1": 0.3,
                        "rouge2": 0.1,
                        "rouge_l": 0.3,
                    },
                    "tuned": {
                        "perplexity": 1.22,
                        "exact_match": 5 / 6,
                        "contains": 5 / 6,
                        "accuracy": None,
                        "bleu": 0.8,
                        "chrf": 0.9,
                        "rouge1": 0.85,
                        "rouge2": 0.7,
                        "rouge_l": 0.85,
                    },
                },
            }
        )
    )
    metrics = [{"step": s, "loss": 2 / s, "lr": 1e-3 * (1 - s / 40)} for s in range(1, 40)]
    metrics += [{"step": 20, "val_loss": 0.3, "val_ppl": 1.35}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (out / "config.yaml").write_text("method:\n  name: lora\n  r: 16\n")
    (out / "summary.json").write_text(json.dumps({"method": "lora", "steps": 39}))
    return out


def chromium_path() -> str | None:
    return os.environ.get("TUNESMITH_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless. `.ci/run` installs it and sets TUNESMITH_REQUIRE_BROWSER,
    so there a missing browser fails the tests instead of skipping them."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        if os.environ.get("TUNESMITH_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH (apt-get install chromium), but CI requires it")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()
