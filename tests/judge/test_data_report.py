"""The data report on crafted data whose duplicates, near duplicates, leakage, truncations,
role errors, empty answers and label imbalance are known: exact counts and record numbers."""

from __future__ import annotations

import json
import random

import pytest
from helpers.data import chat_tokenizer, write_jsonl
from helpers.runs import make_config, run_cli

from tunesmith.judge.data_report import data_report, jaccard, shingles, summary_lines

VOCAB = [f"w{i:03d}" for i in range(600)]


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def crafted(tmp_path):
    """Training: 20 distinct records (lines 1-20), then exact repeats of line 3 (lines 21, 22)
    and line 5 (23), a near copy of line 7 (24: its last word changed), a prompt so long the
    answer lies past max_seq_len (25), a record cut at max_seq_len (26), roles out of order
    (27) and an empty answer (28). Validation: a copy of training line 10 (1), a near copy of
    line 12 (2), line 14's prompt with another answer (3), and two new records (4, 5)."""
    rng = random.Random(0)

    def words(n):
        return " ".join(rng.choice(VOCAB) for _ in range(n))

    base = [chat(words(30), words(8)) for _ in range(20)]
    train = list(base)
    train += [base[2], base[2], base[4]]
    near = json.loads(json.dumps(base[6]))
    near["messages"][1]["content"] = near["messages"][1]["content"].rsplit(" ", 1)[0] + " zzz"
    train.append(near)
    train.append(chat(words(400), words(5)))  # ~800 prompt tokens: the answer is cut away
    train.append(chat(words(10), words(200)))  # the answer is cut
    train.append(
        {
            "messages": [
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": words(6)},
            ]
        }
    )
    train.append(chat(words(12), ""))
    near_val = json.loads(json.dumps(base[11]))
    near_val["messages"][0]["content"] = near_val["messages"][0]["content"].rsplit(" ", 1)[0] + " q"
    val = [base[9], near_val, chat(base[13]["messages"][0]["content"], words(8))]
    val += [chat(words(30), words(8)) for _ in range(2)]
    train_file = write_jsonl(tmp_path / "c_train.jsonl", train)
    val_file = write_jsonl(tmp_path / "c_val.jsonl", val)
    return train_file, val_file


def findings(report):
    return {f.key: f for f in report.findings}


def test_counts_duplicates_leakage_and_truncation_on_crafted_data(tmp_path, tiny_dir):
    train_file, val_file = crafted(tmp_path)
    cfg = make_config(
        tmp_path,
        tiny_dir,
        data={
            "datasets": [{"path": str(train_file)}],
            "validation": [{"path": str(val_file)}],
            "max_seq_len": 256,
        },
    )
    report = data_report(cfg, chat_tokenizer(), threshold=0.8)
    train, val = report.sources
    assert (train.split, train.records, val.split, val.records) == ("train", 28, "validation", 5)
    assert (train.dropped_untrained, train.truncated, train.dropped_empty_response) == (1, 2, 1)
    assert (train.out_of_order, train.samples) == (1, 26)
    assert len(train.prompt_lengths) == 28 and train.prompt_lengths[24] > 256
    assert train.answer_lengths[25] > 200  # before max_seq_len
    f = findings(report)
    t, v = f"{train_file}, line", f"{val_file}, line"
    assert f["duplicates_exact"].count == 3
    assert f["duplicates_exact"].where == [f"{t} 3 = {t} 21 = {t} 22", f"{t} 5 = {t} 23"]
    assert (f["duplicates_near"].count, f["duplicates_near"].where) == (1, [f"{t} 7 ~ {t} 24"])
    assert f["leakage_exact"].where == [f"{v} 1 = {t} 10"]
    assert f["leakage_near"].where == [f"{v} 2 ~ {t} 12"]
    assert f["leakage_prompt"].where == [f"{v} 3 = {t} 14"]
    assert f["truncated_away"].where == [f"{t} 25"]
    # line 25 is cut too (then dropped); line 26 is cut and keeps part of its answer
    assert f["truncated"].where == [f"{t} 25", f"{t} 26"]
    assert f["out_of_order"].where == [f"{t} 27"]
    assert f["empty_answer"].where == [f"{t} 28"]
    assert set(f) == {
        "duplicates_exact",
        "duplicates_near",
        "leakage_exact",
        "leakage_near",
        "leakage_prompt",
        "truncated_away",
        "truncated",
        "out_of_order",
        "empty_answer",
    }
    severities = [x.severity for x in report.findings]
    assert severities == sorted(severities) and report.findings[0].severity == 0
    lines = summary_lines(report, top=3)
    assert lines[-1] == "  … and 6 more in the HTML or JSON report"
    assert "near duplicates: word 3-gram Jaccard >= 0.8 (MinHash, 128 permutations, LSH)" in lines


def test_the_threshold_decides_what_is_near(tmp_path, tiny_dir):
    a = " ".join(VOCAB[:10])  # 8 word 3-grams
    b = " ".join(VOCAB[:9] + ["other"])  # shares 7 of 9 in the union: Jaccard 7/9
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(7 / 9)
    others = [" ".join(VOCAB[20 + 10 * i : 30 + 10 * i]) for i in range(6)]
    rows = [chat(a, "x y z"), chat(b, "x y z")] + [
        chat(o, f"answer {i} here") for i, o in enumerate(others)
    ]
    # the records add roles and answers to the texts: the threshold brackets their similarity
    train_file = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = make_config(
        tmp_path, tiny_dir, data={"datasets": [{"path": str(train_file)}], "validation": []}
    )
    texts = [" ".join(f"{m['role']}: {m['content']}" for m in r["messages"]).lower() for r in rows]
    similarity = jaccard(shingles(texts[0]), shingles(texts[1]))
    below = data_report(cfg, chat_tokenizer(), threshold=min(1.0, similarity + 0.05))
    above = data_report(cfg, chat_tokenizer(), threshold=similarity - 0.05)
    assert "duplicates_near" not in findings(below)
    assert findings(above)["duplicates_near"].count == 1


def test_label_shares_and_imbalance(tmp_path, tiny_dir):
    labels = ["positive"] * 9 + ["negative"] * 3
    rows = [chat(" ".join(VOCAB[5 * i : 5 * i + 5]), label) for i, label in enumerate(labels)]
    train_file = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = make_config(
        tmp_path, tiny_dir, data={"datasets": [{"path": str(train_file)}], "validation": []}
    )
    report = data_report(cfg, chat_tokenizer())
    assert report.sources[0].answers == {"positive": 0.75, "negative": 0.25}
    imbalance = findings(report)["imbalance"]
    assert imbalance.message.startswith(
        f"{train_file}: labels are imbalanced: 'positive' 75% vs 25%"
    )
    assert "same_answer" not in findings(report)  # labels repeat by design
    balanced = write_jsonl(tmp_path / "b.jsonl", rows[:3] + rows[9:])  # 3 and 3
    cfg = make_config(
        tmp_path, tiny_dir, data={"datasets": [{"path": str(balanced)}], "validation": []}
    )
    assert "imbalance" not in findings(data_report(cfg, chat_tokenizer()))


def test_the_command_writes_json_html_and_png(tmp_path, tiny_dir):
    train_file, val_file = crafted(tmp_path)
    cfg = make_config(tmp_path, tiny_dir)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {tiny_dir}, dtype: fp32, device: cpu}}\n"
        f"data: {{datasets: [{{path: {train_file}}}], validation: [{{path: {val_file}}}], "
        f"max_seq_len: 256, cache_dir: {tmp_path / 'cache'}}}\noutput_dir: {cfg.output_dir}\n"
    )
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    result = run_cli("data", "report", str(config), "--html", str(html), "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert "worth fixing first (9 finding(s)):" in result.stdout
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert {f["key"]: f["count"] for f in saved["findings"]}["duplicates_exact"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text()
    assert "<svg" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    bad = run_cli("data", "report", str(config), "--threshold", "1.5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: --threshold must lie in (0, 1], got 1.5"


def test_repeated_answers_one_character_answers_and_drops(tmp_path, tiny_dir):
    """Free-form data: an answer given to 6 of 12 prompts (at least 5) is flagged, with its
    count; one-character answers are listed; truncation: drop drops the long record."""
    rng = random.Random(1)
    rows = [
        chat(" ".join(rng.choice(VOCAB) for _ in range(6)), "I cannot say which one it is")
        for _ in range(6)
    ]
    rows += [
        chat(" ".join(rng.choice(VOCAB) for _ in range(6)), f"answer {w} is a long one")
        for w in VOCAB[:3]
    ]
    rows += [chat("pick one", "x"), chat("pick two", "y")]  # lines 10, 11
    rows.append(chat(" ".join(rng.choice(VOCAB) for _ in range(300)), "too long to keep"))
    train_file = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = make_config(
        tmp_path,
        tiny_dir,
        data={
            "datasets": [{"path": str(train_file)}],
            "validation": [],
            "max_seq_len": 128,
            "truncation": "drop",
        },
    )
    report = data_report(cfg, chat_tokenizer())
    f = findings(report)
    assert report.sources[0].answers is None  # free-form: most answers are long
    assert f["same_answer"].count == 6
    assert f["same_answer"].where == [
        f"'i cannot say which one it is' x6 (first: {train_file}, line 1)"
    ]
    assert f["short_answer"].where == [f"{train_file}, line 10", f"{train_file}, line 11"]
    assert f["too_long"].where == [f"{train_file}, line 12"]
    assert report.sources[0].dropped_too_long == 1 and report.sources[0].samples == 11


def test_nothing_left_after_preparation_is_the_finding_not_an_error(tmp_path, tiny_dir):
    """Every answer lies past max_seq_len: `train` refuses the data, the report says why."""
    rows = [chat(" ".join(VOCAB[i : i + 40]), "w001 w002") for i in range(6)]
    train_file = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = make_config(tmp_path, tiny_dir)
    cfg.data.datasets[0].path = str(train_file)
    cfg.data.validation = []
    cfg.data.max_seq_len = 16
    report = data_report(cfg, chat_tokenizer())
    assert report.train_samples == 0
    (finding,) = [f for f in report.findings if f.key == "nothing_left"]
    assert finding.severity == 0 and finding.count == 1
    assert finding.where == [
        f"{train_file} (train): 6 records, 6 with the answer cut away, 0 too long, 0 with "
        "empty answers"
    ]
    assert report.findings[0].key in ("truncated_away", "nothing_left")


def test_preference_data_identical_pairs_length_bias_duplicates_and_leakage(tmp_path, tiny_dir):
    """Planted: two pairs whose answers are the same, chosen answers longer in 9 of 10 pairs
    that differ in length, a repeated pair, and a validation pair copied from training."""
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    train = [
        {
            "prompt": user(f"question number {i} about {w}"),
            "chosen": bot(f"a long and careful answer about {w}" if i != 3 else "no"),
            "rejected": bot("no" if i != 3 else f"a long and careful answer about {w}"),
        }
        for i, w in enumerate(
            "apple river stone cloud tiger paper lemon candle forest silver".split()
        )
    ]
    train.append({"prompt": user("same?"), "chosen": bot("Yes"), "rejected": bot("yes")})
    train.append({"prompt": user("twice?"), "chosen": bot("sure"), "rejected": bot("sure ")})
    train.append(train[0])
    val = [train[1], {"prompt": user("new"), "chosen": bot("good"), "rejected": bot("bad")}]
    config = make_config(
        tmp_path,
        tiny_dir,
        objective="dpo",
        data={
            "datasets": [{"path": str(write_jsonl(tmp_path / "p.jsonl", train))}],
            "validation": [{"path": str(write_jsonl(tmp_path / "v.jsonl", val))}],
        },
    )
    report = data_report(config, chat_tokenizer())
    found = {f.key: f for f in report.findings}
    assert found["identical_pair"].count == 2
    assert found["identical_pair"].where == [f"{tmp_path / 'p.jsonl'}, line {n}" for n in (11, 12)]
    # of the 12 pairs whose answers differ in tokens ("sure" and "sure " do), 10 have the
    # longer answer chosen: 9 planted, and the repeat of one of them
    assert report.sources[0].chosen_longer == pytest.approx(10 / 12)
    assert found["length_bias"].message.startswith(
        f"{tmp_path / 'p.jsonl'}: in 83% of pairs the chosen answer is the longer one"
    )
    assert found["duplicates_exact"].count == 1
    assert found["leakage_exact"].where == [
        f"{tmp_path / 'v.jsonl'}, line 1 = {tmp_path / 'p.jsonl'}, line 2"
    ]
    assert "same_answer" not in found  # answers repeat across pairs by design
    lines = summary_lines(report)
    assert "  chosen answer the longer: 83.3% of the pairs whose answers differ in length" in lines


def test_kto_data_label_balance(tmp_path, tiny_dir):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": [{"role": "assistant", "content": f"a{i}"}],
            "label": i < 8,
        }
        for i in range(10)
    ]
    config = make_config(
        tmp_path,
        tiny_dir,
        objective="kto",
        data={
            "datasets": [{"path": str(write_jsonl(tmp_path / "u.jsonl", rows))}],
            "validation": [],
        },
    )
    report = data_report(config, chat_tokenizer())
    assert report.sources[0].desirable == 0.8
    (balance,) = [f for f in report.findings if f.key == "label_balance"]
    assert balance.message.startswith(f"{tmp_path / 'u.jsonl'}: 80% of examples are desirable;")
    assert "  desirable examples: 80.0%" in summary_lines(report)
