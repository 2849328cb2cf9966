"""Runs as the tests make them: a small learnable chat task, a run config around the tiny
model, quiet progress, and the `tunesmith` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers.data import write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.train.progress import Progress

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """`tunesmith ARGS...` in a new process, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


WORDS = "red green blue cyan pink gold gray teal".split()


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task with answers of varied length: name the colour after "after"."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        i = int(torch.randint(0, len(WORDS) - 1, (1,), generator=g))
        repeat = 1 + int(torch.randint(0, 3, (1,), generator=g))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"after {WORDS[i]}"},
                    {"role": "assistant", "content": " ".join([WORDS[i + 1]] * repeat)},
                ]
            }
        )
    return rows


def make_config(tmp_path: Path, tiny_dir: Path, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", toy_rows(48))
    val_file = write_jsonl(tmp_path / "val.jsonl", toy_rows(8, seed=1))
    raw = {
        "model": {"path": str(tiny_dir), "dtype": "fp32", "device": "cpu"},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {
            "datasets": [{"path": str(train_file)}],
            "validation": [{"path": str(val_file)}],
            "max_seq_len": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 5e-3},
        "output_dir": str(tmp_path / "out"),
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "method"
        raw[key] = {**raw.get(key, {}), **value} if merge else value
    return config_from_dict(raw)


def quiet() -> Progress:
    return Progress(log_every=1000, live=False)


def losses(output_dir: Path) -> list[float]:
    """The training losses a run logged to output_dir/metrics.jsonl, in step order."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs on `toy_rows`' task: the right colour chosen, another rejected."""
    g = torch.Generator().manual_seed(seed + 100)
    pairs = []
    for row in toy_rows(n, seed):
        user, answer = row["messages"]
        wrong = WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        if wrong in answer["content"]:
            wrong = "purple"
        pairs.append(
            {
                "prompt": [user],
                "chosen": [answer],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return pairs


def toy_unpaired(n: int, seed: int = 0) -> list[dict]:
    """KTO's examples from `toy_pairs`: alternately the good answer (label true) and the bad."""
    return [
        {
            "prompt": p["prompt"],
            "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
            "label": i % 2 == 0,
        }
        for i, p in enumerate(toy_pairs(n, seed))
    ]


def preference_config(tmp_path: Path, tiny_dir: Path, objective="dpo", **sections):
    """`make_config` on preference data (unpaired for kto) with `objective`."""
    unpaired = (objective if isinstance(objective, str) else objective["name"]) == "kto"
    rows = toy_unpaired if unpaired else toy_pairs
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(tmp_path / "pairs.jsonl", rows(24))
    val_file = write_jsonl(tmp_path / "pairs_val.jsonl", rows(6, seed=1))
    data = {
        "datasets": [{"path": str(train_file)}],
        "validation": [{"path": str(val_file)}],
        **sections.pop("data", {}),
    }
    return make_config(tmp_path, tiny_dir, objective=objective, data=data, **sections)
