"""Build the bundled multiple-choice task for `tunesmith bench` from the quickstart's held-out
prompts: each question with every answer its kind of question can have, the reference's index
as the target. Writes tunesmith/judge/tasks/tunesmith_words.jsonl.

    python examples/build_bench_task.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHOICES = {
    "Are these all from nature": ["Yes, all of them.", "No, not all of them."],
    "How many words": [f"There are {n} words." for n in range(3, 7)],
    "How many are made by people": [f"{n} of them." for n in range(6)],
}


def main() -> None:
    out = []
    for line in (ROOT / "examples/data/quickstart_val.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        question = [m for m in messages if m["role"] == "user"][-1]["content"]
        choices = CHOICES[question.split(":")[0]]
        out.append(
            {
                "question": question,
                "choices": choices,
                "answer": choices.index(messages[-1]["content"]),
            }
        )
    target = ROOT / "tunesmith/judge/tasks/tunesmith_words.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {target}: {len(out)} questions")


if __name__ == "__main__":
    main()
