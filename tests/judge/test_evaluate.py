"""Evaluation metrics on known inputs, prompt/answer extraction, the comparison table, and
the CLI verbs around training (plot, --resume parsing, generate/chat/eval errors)."""

from __future__ import annotations

import json

import pytest
from helpers.data import data_section, write_jsonl

from tunesmith.cli.app import _resume_default
from tunesmith.judge.evaluate import (
    Column,
    format_table,
    generation_scores,
    label_set,
    normalize,
    predicted_label,
    prompt_answer_pairs,
)
from tunesmith.train.plot import plot_metrics


def test_generation_scores_exact_and_contains():
    predictions = ["Paris.", "It is Paris", "london", "  Rome  "]
    references = ["paris", "Paris", "Paris", "rome"]
    scores = generation_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(2 / 4)  # "Paris." and "  Rome  "
    assert scores["contains"] == pytest.approx(3 / 4)
    # ROUGE-L F1 on words: 1, then LCS 1 of 3 predicted words and 1 reference word, 0, 1
    assert scores["rouge_l"] == pytest.approx((1 + 2 * (1 / 3) * 1 / (1 / 3 + 1) + 0 + 1) / 4)
    assert normalize("  Hello,   World! ") == "hello, world"
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_scores(["a", "b"], ["a"])


# Free-form answers and references with punctuation, case, repeats and a miss.
PREDICTIONS = [
    "The cat sat on the mat.",
    "there are 4 words",
    "No, not all of them.",
    "2 of them",
    "A quick brown fox jumps over the lazy dog",
    "",
    "Yes",
    "the the the",
]
REFERENCES = [
    "The cat is on the mat.",
    "There are 4 words.",
    "Yes, all of them.",
    "2 of them.",
    "The quick brown fox jumped over the lazy dog.",
    "Nothing here",
    "Yes, all of them.",
    "the cat",
]


def test_bleu_chrf_and_rouge_are_the_libraries_own_figures():
    import sacrebleu
    from rouge_score import rouge_scorer

    scores = generation_scores(PREDICTIONS, REFERENCES)
    assert scores["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score / 100
    assert scores["chrf"] == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score / 100
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for key, name in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rouge_l", "rougeL")):
        per_pair = [
            scorer.score(r, p)[name].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)
        ]
        assert scores[key] == pytest.approx(sum(per_pair) / len(per_pair), abs=1e-12)
    # Known values: identical texts are BLEU/chrF 1, ROUGE 1; rouge-score's F1 of "the cat sat
    # on the mat" against "the cat is on the mat": 5 of 6 unigrams, 3 of 5 bigrams
    same = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(1.0) and same["chrf"] == pytest.approx(1.0)
    one = generation_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert one["rouge1"] == pytest.approx(5 / 6) and one["rouge2"] == pytest.approx(3 / 5)
    assert one["rouge_l"] == pytest.approx(5 / 6)


def test_accuracy_scores_classification_like_answers_only():
    references = ["positive", "negative", "Positive", "neutral", "negative", "positive"]
    predictions = [
        "Positive. The reviewer loved it",
        "negative",
        "neutral",
        "Neutral!",
        "I think negative",
        "positively",
    ]
    assert label_set(references) == ["negative", "positive", "neutral"]
    assert predicted_label("Positive. The reviewer loved it", label_set(references)) == "positive"
    assert predicted_label("positively", label_set(references)) is None
    # right: 0 (starts with the label), 1, 3 (punctuation trimmed); wrong: 2, 4, 5
    assert generation_scores(predictions, references)["accuracy"] == pytest.approx(3 / 6)
    # free-form answers (as many labels as answers, or long ones) are not classification-like
    assert label_set(REFERENCES) is None
    assert generation_scores(PREDICTIONS, REFERENCES)["accuracy"] is None
    assert label_set(["a b c d", "a b c d", "x", "x"]) is None  # a 4-word label


def test_prompt_answer_pairs_take_the_last_assistant_turn(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"instruction": "ignored: another format in another file"},
    ]
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
        "BLEU (n=8)                -         -",
        "chrF (n=8)                -         -",
        "ROUGE-1 (n=8)             -         -",
        "ROUGE-2 (n=8)             -         -",
        "ROUGE-L (n=8)         25.0%     95.0%",
    ]  # accuracy has no row: neither column has one
    columns[1].scores["accuracy"] = 0.5
    assert "accuracy (n=8)            -     50.0%" in format_table(columns, 8).splitlines()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "r.yaml", "--resume"], ["train", "r.yaml", "--resume", "latest"]),
        (
            ["train", "r.yaml", "--resume", "--overwrite"],
            ["train", "r.yaml", "--resume", "latest", "--overwrite"],
        ),
        (
            ["train", "r.yaml", "--resume", "train.lr=1"],
            ["train", "r.yaml", "--resume", "latest", "train.lr=1"],
        ),
        (
            ["train", "r.yaml", "--resume", "out/checkpoints/step-000010"],
            ["train", "r.yaml", "--resume", "out/checkpoints/step-000010"],
        ),
    ],
)
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
