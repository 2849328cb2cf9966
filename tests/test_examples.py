"""Every shipped example runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lora_quickstart(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/lora_quickstart.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "per-row routing matches separate runs" in result.stdout
    assert "greedy continuation of 10 11 12 13: 14 15 16 17 18 19 20 21" in result.stdout
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp"))


CONFIGS = sorted(ROOT.glob("examples/*.yaml")) + sorted(ROOT.glob("examples/configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    from tunesmith.config import load_config
    from tunesmith.data.sources import is_local, local_source_problems

    config = load_config(path)
    assert config.output_dir.startswith("outputs/")
    sources = config.data.datasets + config.data.validation
    if all(is_local(s.path) for s in sources):  # offline examples: their files exist
        assert local_source_problems(sources, "data.datasets") == []


def test_the_quickstart_trains_evaluates_and_saves_shortened(tmp_path):
    """`tunesmith train examples/quickstart.yaml`, cut to 6 steps and 12 eval prompts."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "train",
            "examples/quickstart.yaml",
            "train.max_steps=6",
            "train.save_every_steps=3",
            "eval.every_steps=3",
            "eval.generate_samples=12",
            "eval.max_new_tokens=8",
            "eval.show_samples=1",
            f"output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "method lora: 295,936 of 4,246,784 parameters train (6.97%); 6 steps" in out
    assert "done: 6 steps" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["base", "tuned"])
    assert lines[header + 1].startswith("perplexity")
    assert lines[header + 2].startswith("exact match (n=12)")
    assert "--- sample 0: " in out and "    reference: " in out
    run = tmp_path / "out"
    names = [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "eval.json",
        "config.yaml",
    ]
    for name in names:
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000006",
    ]
    evaluation = json.loads((run / "eval.json").read_text())
    assert set(evaluation["columns"]) == {"base", "tuned"}
    # the saved adapter generates through the CLI
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "generate",
            "--model",
            "examples/tiny-llama",
            "--adapter",
            str(run / "adapter"),
            "How many words: apple river",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.strip()
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "chat",
            "--adapter",
            str(run / "adapter"),
            "--max-new-tokens",
            "4",
            "--seed",
            "0",
        ],
        input="How many words: apple river\n/reset\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("assistant> ") == 1 and "(history cleared)" in chat.stdout
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "eval",
            "examples/quickstart.yaml",
            "--adapter",
            str(run / "adapter"),
            "--samples",
            "4",
            "--max-new-tokens",
            "4",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    table = evaluated.stdout.splitlines()
    assert table[0].split() == ["base", "out"]
    assert table[2].startswith("exact match (n=4)")
    no_data = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "eval",
            "examples/quickstart.yaml",
            "data.validation=[]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert no_data.returncode == 2
    assert no_data.stderr == (
        "error: no evaluation data: set data.validation in the run config or pass --data FILE\n"
    )
