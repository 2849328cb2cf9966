"""Build the bundled preference task from the quickstart's (run from the repository root):

    python examples/build_preference.py

- examples/data/preference_{train,val}.jsonl: pairs in TRL's conversational preference shape,
  {"prompt": [messages], "chosen": [answer], "rejected": [answer]}: the quickstart question,
  its right answer as chosen and a wrong answer of the same kind as rejected (a count one off,
  yes for no). Train: all 1,200 training questions; validation: all 100 held-out ones.
- examples/data/unpaired_train.jsonl: the same 1,200 questions for KTO,
  {"prompt", "completion", "label"}, alternately the right answer (label true) and the wrong
  one (false).

Seeded; the files come out the same every time."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
TRAIN_PAIRS = 1200


def wrong_answer(answer: str, question: str, rng: random.Random) -> str:
    """A wrong answer in the right answer's own form."""
    if answer == "Yes, all of them.":
        return "No, not all of them."
    if answer == "No, not all of them.":
        return "Yes, all of them."
    words = len(question.rsplit(":", 1)[1].split())
    match = re.fullmatch(r"There are (\d) words\.", answer)
    if match:
        n = int(match.group(1))
        options = [m for m in (n - 1, n + 1) if 3 <= m <= 6]
        return f"There are {rng.choice(options)} words."
    match = re.fullmatch(r"(\d) of them\.", answer)
    if match:
        n = int(match.group(1))
        options = [m for m in (n - 1, n + 1) if 0 <= m <= words]
        return f"{rng.choice(options)} of them."
    raise ValueError(f"unexpected answer {answer!r}")


def pairs(path: Path, limit: int | None, rng: random.Random) -> list[dict]:
    out = []
    for line in path.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        prompt, answer = messages[:-1], messages[-1]["content"]
        wrong = wrong_answer(answer, prompt[-1]["content"], rng)
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return out


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {path} ({len(records)} records)")


def main() -> None:
    rng = random.Random(32)
    train = pairs(DATA / "quickstart_train.jsonl", TRAIN_PAIRS, rng)
    write(DATA / "preference_train.jsonl", train)
    write(DATA / "preference_val.jsonl", pairs(DATA / "quickstart_val.jsonl", None, rng))
    unpaired = [
        {
            "prompt": p["prompt"],
            "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
            "label": i % 2 == 0,
        }
        for i, p in enumerate(train)
    ]
    write(DATA / "unpaired_train.jsonl", unpaired)


if __name__ == "__main__":
    main()
