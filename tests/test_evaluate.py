"""Evaluation metrics on known inputs, prompt/answer extraction, the comparison table, and
the CLI verbs around training (plot, --resume parsing, generate/chat/eval errors)."""

from __future__ import annotations

import json

import pytest
from helpers.data import data_section, write_jsonl

from tunesmith.cli.app import _resume_default
from tunesmith.evaluate import (
    Column,
    format_table,
    generation_scores,
    normalize,
    prompt_answer_pairs,
    rouge_l,
)
from tunesmith.train.plot import plot_metrics


def test_rouge_l_is_the_lcs_f1_on_words():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS of [a b c d] and [a c d e] is [a c d]: P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    # LCS 2 of pred 2 words, ref 4 words: P 1, R 1/2, F 2/3
    assert rouge_l("Apple, river!", "apple stone river cloud") == pytest.approx(2 / 3)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0


def test_generation_scores_exact_and_contains():
    predictions = ["Paris.", "It is Paris", "london", "  Rome  "]
    references = ["paris", "Paris", "Paris", "rome"]
    scores = generation_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(2 / 4)  # "Paris." and "  Rome  "
    assert scores["contains"] == pytest.approx(3 / 4)
    assert scores["rouge_l"] == pytest.approx((1 + 2 * (1 / 3) * 1 / (1 / 3 + 1) + 0 + 1) / 4)
    assert normalize("  Hello,   World! ") == "hello, world"
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_scores(["a", "b"], ["a"])


def test_prompt_answer_pairs_take_the_last_assistant_turn(tmp_path):
    rows = [
        {"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        ]},
        {"instruction": "ignored: another format in another file"},
    ]  # fmt: skip
    chat = write_jsonl(tmp_path / "chat.jsonl", rows[:1])
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "1 1", "output": "2"}]
    )
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text has no answer"}])
    data = data_section(tmp_path, [str(chat), str(alpaca), str(text)])
    pairs = prompt_answer_pairs(data.datasets, data)
    assert [p.answer for p in pairs] == ["4", "2"]
    assert [m["content"] for m in pairs[0].messages] == ["hi", "hello", "2+2?"]
    assert pairs[1].messages[-1]["role"] == "user" and "Add" in pairs[1].messages[-1]["content"]
    assert len(prompt_answer_pairs(data.datasets, data, limit=1)) == 1


def test_the_table_puts_models_side_by_side():
    columns = [
        Column("base", 12.345, {"exact_match": 0.0, "contains": 0.1, "rouge_l": 0.25}),
        Column("tuned", 2.5, {"exact_match": 0.875, "contains": 0.9, "rouge_l": 0.95}),
    ]
    assert format_table(columns, 8).splitlines() == [
        "                       base     tuned",
        "perplexity            12.35      2.50",
        "exact match (n=8)      0.0%     87.5%",
        "contains (n=8)        10.0%     90.0%",
        "ROUGE-L (n=8)         25.0%     95.0%",
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "r.yaml", "--resume"], ["train", "r.yaml", "--resume", "latest"]),
        (["train", "r.yaml", "--resume", "--overwrite"],
         ["train", "r.yaml", "--resume", "latest", "--overwrite"]),
        (["train", "r.yaml", "--resume", "train.lr=1"],
         ["train", "r.yaml", "--resume", "latest", "train.lr=1"]),
        (["train", "r.yaml", "--resume", "out/checkpoints/step-000010"],
         ["train", "r.yaml", "--resume", "out/checkpoints/step-000010"]),
    ],
)  # fmt: skip
def test_resume_alone_means_latest(argv, expected):
    assert _resume_default(argv) == expected


def test_plot_renders_train_and_validation_curves(tmp_path):
    lines = [{"step": s, "loss": 3 - s / 10, "lr": 1e-3} for s in range(1, 11)]
    lines.append({"step": 10, "val_loss": 2.5, "val_ppl": 12.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="metrics.jsonl: no such file"):
        plot_metrics(tmp_path / "nothing")
