"""`tunesmith bench` on the bundled local harness task: the harness's own JSON for the base
and an adapter attached in memory, checked against a log-likelihood argmax computed here."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.adapters import adapter_folder
from helpers.runs import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.adapters import load_adapter
from tunesmith.judge.harness import BUNDLED_TASKS

pytest.importorskip("lm_eval")
LIMIT = 8


@torch.no_grad()
def reference_accuracy(model, tokenizer, docs) -> float:
    """Multiple choice as the harness scores it (acc): the choice whose tokens, after the
    chat-templated question, have the highest summed log-probability."""
    right = 0
    for doc in docs:
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": doc["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(start, len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


@pytest.mark.slow  # another tool's run: once in .ci/run, at the newest transformers
def test_bench_runs_the_bundled_task_for_base_and_adapter(tmp_path, tiny_dir):
    adapter = adapter_folder(tmp_path, tiny_dir, "lora", name="words", seed=2, b_scale=3.0)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {tiny_dir}, dtype: fp32, device: cpu}}\n"
        f"data: {{datasets: [{{path: unused.jsonl}}]}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    result = run_cli(
        "bench",
        str(config),
        "--tasks",
        "tunesmith_words",
        "--limit",
        str(LIMIT),
        "--adapter",
        str(adapter),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["task", "metric", "base", "words"]
    out = tmp_path / "out" / "bench"
    base, tuned = (json.loads((out / f"{n}.json").read_text()) for n in ("base", "words"))
    for harness in (base, tuned):
        assert harness["results"]["tunesmith_words"]["sample_len"] == LIMIT
        assert "lm_eval_version" in harness and harness["configs"]["tunesmith_words"]
    docs = [
        json.loads(x) for x in (BUNDLED_TASKS / "tunesmith_words.jsonl").read_text().splitlines()
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    expected_base = reference_accuracy(model, tokenizer, docs[:LIMIT])
    load_adapter(model, adapter, name="words")
    expected_tuned = reference_accuracy(model, tokenizer, docs[:LIMIT])
    assert (expected_base, expected_tuned) == (3 / 8, 1 / 8)  # the adapter changes answers
    assert base["results"]["tunesmith_words"]["acc,none"] == pytest.approx(expected_base)
    assert tuned["results"]["tunesmith_words"]["acc,none"] == pytest.approx(expected_tuned)
    table = json.loads((out / "table.json").read_text())
    assert table["header"] == ["task", "metric", "base", "words"]
    assert [r[:2] for r in table["rows"]] == [
        ["tunesmith_words", "acc"],
        ["tunesmith_words", "acc_norm"],
    ]
    assert table["rows"][0][2].startswith(f"{expected_base:.4f} ± ")
    unknown = run_cli("bench", str(config), "--tasks", "no_such_task", "--no-base")
    assert unknown.returncode == 2
    assert (
        unknown.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --tasks: unknown task(s) no_such_task; bundled: tunesmith_words")
    )
