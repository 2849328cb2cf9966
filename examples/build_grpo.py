"""Build the GRPO example's prompt data from the quickstart's questions:

    python examples/build_grpo.py

Each quickstart conversation becomes a prompt record: the messages before the answer as
`prompt`, and the answer as the `answer` column, which the exact_match reward compares with.
Writes examples/data/grpo_train.jsonl (the first 400 training questions) and
examples/data/grpo_val.jsonl (the 100 held-out ones)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_PROMPTS = 400


def prompts(source: Path, limit: int | None = None) -> list[dict]:
    rows = []
    for line in source.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
    return rows


def main() -> None:
    data = HERE / "data"
    pairs = [
        ("quickstart_train.jsonl", "grpo_train.jsonl", TRAIN_PROMPTS),
        ("quickstart_val.jsonl", "grpo_val.jsonl", None),
    ]
    for source, target, limit in pairs:
        rows = prompts(data / source, limit)
        (data / target).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{target}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
