"""Truncation and dropping with counts, validation splits, mixing weights, the cache, several
processes, and every bad-input error with its text."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
from helpers.data import chat_tokenizer, data_section, ids_of, plain_tokenizer, write_jsonl

from tunesmith.data import DataError, prepare_data
from tunesmith.data import prepare as prepare_module
from tunesmith.data.preview import summary_lines


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_truncation_modes_and_counts(tmp_path):
    tok = plain_tokenizer()
    rows = [{"text": "a b c d e f g h i j k l m n o p"}, {"text": "a b"}]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    full = ids_of(tok, "a b c d e f g h i j k l m n o p") + [tok.eos_token_id]
    assert len(full) == 17

    cut = prepare_data(data_section(tmp_path, [path], max_seq_len=8), tok)
    assert cut.train[0][0].tolist() == full[:8]
    assert (cut.sources[0].truncated, cut.sources[0].samples) == (1, 2)

    dropped = prepare_data(data_section(tmp_path, [path], max_seq_len=8, truncation="drop"), tok)
    assert (dropped.sources[0].dropped_too_long, len(dropped.train)) == (1, 1)

    with pytest.warns(UserWarning, match="dropped 1 of 2 samples whose every label is masked"):
        split = prepare_data(data_section(tmp_path, [path], max_seq_len=8, truncation="split"), tok)
    pieces = [split.train[i][0].tolist() for i in range(2)]
    assert pieces == [full[:8], full[8:16]]
    assert [split.train[i][1][0] for i in range(2)] == [-100, -100]
    # The last piece is one token: its only label is masked (nothing precedes it), so it goes.
    assert split.sources[0].split_long == 1 and split.sources[0].dropped_untrained == 1
    assert len(split.train) == 3


def test_samples_with_nothing_to_train_are_dropped_and_counted(tmp_path):
    tok = chat_tokenizer()
    rows = [chat("a long question " * 10, "yes"), chat("q", "yes")]
    path = str(write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.warns(UserWarning) as caught:
        prepared = prepare_data(data_section(tmp_path, [path], max_seq_len=16), tok)
    assert str(caught[0].message) == (
        f"{path}: dropped 1 of 2 samples whose every label is masked (nothing to train, e.g. the "
        "response was truncated away); raise data.max_seq_len or check the data"
    )
    stats = prepared.sources[0]
    assert (stats.truncated, stats.dropped_untrained, stats.samples) == (1, 1, 1)
    assert (
        "dropped 1 (0 too long, 1 with no trained token, 0 with empty responses)"
        in summary_lines(prepared)[1]
    )
    only_long = str(write_jsonl(tmp_path / "long.jsonl", rows[:1]))
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_data(data_section(tmp_path, [only_long], max_seq_len=16), tok)
    assert str(info.value) == (
        f"{only_long}: no samples left: 1 records, 0 dropped as too long, 1 dropped with no "
        "trained token; check data.datasets.0 and data.max_seq_len"
    )


def test_validation_fraction_weights_and_files(tmp_path):
    tok = plain_tokenizer()
    a = str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{k}"} for k in range(20)]))
    b = str(write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{k}"} for k in range(10)]))

    def texts(samples):
        return [tok.decode(samples[i][0].tolist()) for i in range(len(samples))]

    prepared = prepare_data(
        data_section(tmp_path, [a, {"path": b, "weight": 2.0}], val_fraction=0.1), tok, seed=1
    )
    train, val = texts(prepared.train), texts(prepared.validation)
    assert len(val) == 2 + 1 and len(train) == 18 + 2 * 9
    assert not set(train) & set(val)
    b_counts = Counter(t for t in train if t.startswith("b"))
    assert len(b_counts) == 9 and set(b_counts.values()) == {2}  # weight 2: each twice
    assert (
        prepare_data(  # same seed, same split
            data_section(tmp_path, [a, {"path": b, "weight": 2.0}], val_fraction=0.1), tok, seed=1
        ).validation.input_ids.tolist()
        == prepared.validation.input_ids.tolist()
    )
    half = prepare_data(data_section(tmp_path, [{"path": a, "weight": 0.5}]), tok)
    assert len(half.train) == 10 and len(set(texts(half.train))) == 10
    with_file = prepare_data(data_section(tmp_path, [a], validation=[b]), tok)
    assert texts(with_file.validation) == [f"b{k}<|endoftext|>" for k in range(10)]
    assert with_file.sources[1].split == "validation"


def test_cache_hit_on_second_run_and_miss_on_change(tmp_path, monkeypatch):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "c.jsonl", [chat("q", "a"), chat("r", "b")])
    data = data_section(tmp_path, [str(path)])
    first = prepare_data(data, tok)
    assert not first.sources[0].from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare_module, "encode_all", no_tokenizing)
    second = prepare_data(data, tok)
    assert second.sources[0].from_cache
    assert second.train.input_ids.tolist() == first.train.input_ids.tolist()
    assert second.train.labels.tolist() == first.train.labels.tolist()
    assert second.sources[0].trained_tokens == first.sources[0].trained_tokens
    for changed in (
        lambda: data_section(tmp_path, [str(path)], max_seq_len=100),
        lambda: data_section(tmp_path, [str(path)], train_on_inputs=True),
        lambda: data_section(tmp_path, [str(path)], chat_template="llama-3"),
    ):
        with pytest.raises(AssertionError, match="tokenized again"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare_data(changed(), tok)
    write_jsonl(path, [chat("q", "a"), chat("r", "c")])  # same size, new content
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_data(data, tok)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_data(data, tok, use_cache=False)


def test_several_processes_give_the_same_samples(tmp_path):
    tok = chat_tokenizer()
    rows = [chat(f"question {k}", f"answer {k}") for k in range(40)]
    path = str(write_jsonl(tmp_path / "c.jsonl", rows))
    one = prepare_data(data_section(tmp_path, [path], num_proc=1), tok, use_cache=False)
    two = prepare_data(data_section(tmp_path, [path], num_proc=2), tok, use_cache=False)
    assert np.array_equal(one.train.input_ids, two.train.input_ids)
    assert np.array_equal(one.train.labels, two.train.labels)
    assert np.array_equal(one.train.offsets, two.train.offsets)


def error_for(tmp_path, rows_or_text, tokenizer=None, name="d.jsonl", **source) -> str:
    path = tmp_path / name
    if isinstance(rows_or_text, str):
        path.write_text(rows_or_text)
    else:
        write_jsonl(path, rows_or_text)
    with pytest.raises(DataError) as info:
        prepare_data(
            data_section(tmp_path, [{"path": str(path), **source}]), tokenizer or chat_tokenizer()
        )
    return str(info.value).replace(str(path), "FILE")


def test_bad_input_errors_name_file_and_record(tmp_path):
    assert error_for(
        tmp_path, [{"instruction": "i", "output": "o"}, {"instruction": "i"}], format="alpaca"
    ) == (
        'FILE, line 2: missing field "output" (alpaca format); add it, or map another field '
        "with data.datasets.0.fields.output"
    )
    assert error_for(tmp_path, [{"instruction": "i", "output": 3}], format="alpaca") == (
        'FILE, line 1: field "output" must be text, got int'
    )
    assert (
        error_for(tmp_path, [{"messages": []}])
        == 'FILE, line 1: field "messages" is an empty message list'
    )
    assert error_for(tmp_path, [{"messages": "hi"}]) == (
        'FILE, line 1: field "messages" must be a list of messages, got str'
    )
    assert error_for(tmp_path, [{"messages": [{"role": "user", "content": "q"}]}]) == (
        "FILE, line 1: conversation has no assistant turn, so nothing would train; fix the "
        "roles or map them with data.datasets.0.roles"
    )
    assert error_for(
        tmp_path, [chat("q", "a"), {"messages": [{"role": "wizard", "content": "x"}]}]
    ) == (
        'FILE, line 2: messages[0]: unknown role "wizard"; map it to system, user, assistant or '
        "tool with data.datasets.0.roles"
    )
    assert error_for(tmp_path, [{"messages": [{"role": "user"}]}]) == (
        'FILE, line 1: messages[0]: missing "content" (or ShareGPT "value")'
    )
    assert error_for(tmp_path, "") == "FILE: no records (empty dataset; data.datasets.0.path)"
    assert error_for(tmp_path, '{"text": "a"}\n{"text": "b",}\n') == (
        "FILE, line 2: not valid JSON Lines (Expecting property name enclosed in double quotes, "
        "column 14); each line must be one JSON object"
    )
    assert (
        error_for(tmp_path, "[1, 2]\n")
        == "FILE, line 1: expected a JSON object (a record with fields), got list"
    )
    assert error_for(tmp_path, [{"foo": 1}]) == (
        "FILE, line 1: cannot tell the format from fields ['foo']; set data.datasets.0.format "
        "to alpaca, chat, completion, tokenized, preference, unpaired or prompt (and map fields "
        "with "
        "data.datasets.0.fields)"
    )
    assert error_for(tmp_path, [{"input_ids": [1, 2], "labels": [1]}]) == (
        'FILE, line 1: "labels" has 1 entries but "input_ids" has 2; they must be the same length'
    )
    assert error_for(tmp_path, [{"input_ids": [1, "x"]}]) == (
        'FILE, line 1: field "input_ids" must be a list of integers'
    )
    assert error_for(tmp_path, '[{"text": "a"}, 5]', name="d.json") == (
        "FILE, record index 1: expected a JSON object (a record with fields), got int"
    )
    assert error_for(tmp_path, "x", name="d.txt") == (
        "FILE: unsupported file type '.txt'; use .jsonl, .json, .csv, .parquet"
    )
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"^{missing}: no such file or folder$"):
        prepare_data(data_section(tmp_path, [str(missing)]), chat_tokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder has no .jsonl, .json, .csv, .parquet files"):
        prepare_data(data_section(tmp_path, [str(tmp_path / "empty")]), chat_tokenizer())


def test_sample_set_select_gathers_in_order_with_repeats():
    from tunesmith.data import SampleSet

    samples = SampleSet.from_lists([([1, 2, 3], [-100, 2, 3]), ([4], [4]), ([5, 6], [-100, 6])])
    chosen = samples.select([2, 0, 0, 1])
    assert chosen.input_ids.tolist() == [5, 6, 1, 2, 3, 1, 2, 3, 4]
    assert chosen.labels.tolist() == [-100, 6, -100, 2, 3, -100, 2, 3, 4]
    assert chosen.offsets.tolist() == [0, 2, 5, 8, 9]
    assert len(samples.select([])) == 0
