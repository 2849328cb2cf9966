"""Preference records (`data/preference.py`) in TRL's shapes: explicit and implicit prompts,
text and messages, unpaired; and the one-line errors naming record and field."""

from __future__ import annotations

import pytest

from tunesmith.data.preference import Pair, Unpaired, parse_pair, parse_unpaired
from tunesmith.data.sources import DataError, Record


def rec(**data) -> Record:
    return Record(data, "prefs.jsonl, line 3")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_an_explicit_prompt_in_text_or_messages():
    assert parse_pair(rec(prompt="2+2?", chosen="4", rejected="5")) == Pair(
        [user("2+2?")], [bot("4")], [bot("5")]
    )
    got = parse_pair(
        rec(
            prompt=[{"role": "system", "content": "Be brief."}, user("2+2?")],
            chosen=[bot("4")],
            rejected=[{"role": "gpt", "content": "5"}],  # ShareGPT's role names too
        )
    )
    assert got == Pair(
        [{"role": "system", "content": "Be brief."}, user("2+2?")], [bot("4")], [bot("5")]
    )


def test_an_implicit_prompt_is_the_shared_beginning():
    # text: cut at the whitespace before the texts differ; the answers start with it
    got = parse_pair(rec(chosen="The capital is Paris", rejected="The capital is Lyon"))
    assert got == Pair([user("The capital is")], [bot(" Paris")], [bot(" Lyon")])
    got = parse_pair(rec(chosen="Answer: 12", rejected="Answer: 13"))  # never mid-word
    assert (got.prompt, got.chosen, got.rejected) == ([user("Answer:")], [bot(" 12")], [bot(" 13")])
    # messages: the shared leading messages, ending before the answers' first assistant turn
    chat = [user("hi"), bot("hello"), user("2+2?")]
    got = parse_pair(rec(chosen=[*chat, bot("4")], rejected=[*chat, bot("5")]))
    assert got == Pair(chat, [bot("4")], [bot("5")])
    same = parse_pair(rec(chosen=[*chat, bot("4")], rejected=[*chat, bot("4")]))
    assert same.chosen == same.rejected == [bot("4")]  # identical: a data report finding


def test_unpaired_records_for_kto():
    assert parse_unpaired(rec(prompt="2+2?", completion="4", label=True)) == Unpaired(
        [user("2+2?")], [bot("4")], True
    )


@pytest.mark.parametrize(
    ("record", "parse", "message"),
    [
        (
            rec(prompt="q", chosen="a"),
            parse_pair,
            'prefs.jsonl, line 3: missing field "rejected" (preference format: "prompt", '
            '"chosen" and "rejected", or "chosen" and "rejected" sharing the prompt)',
        ),
        (
            rec(prompt="q", chosen=4, rejected="a"),
            parse_pair,
            'prefs.jsonl, line 3: field "chosen" must be text or a list of messages, got a number',
        ),
        (
            rec(chosen="Paris", rejected="Lyon"),
            parse_pair,
            'prefs.jsonl, line 3: "chosen" and "rejected" share no prompt; give it in a '
            '"prompt" field',
        ),
        (
            rec(chosen=[bot("4")], rejected=[bot("5")]),
            parse_pair,
            'prefs.jsonl, line 3: "chosen" and "rejected" share no prompt messages; give the '
            'prompt in a "prompt" field',
        ),
        (
            rec(prompt="q", chosen=[user("a")], rejected="b"),
            parse_pair,
            'prefs.jsonl, line 3: field "chosen" holds no assistant message, so nothing would '
            "train",
        ),
        (
            rec(prompt="q", chosen=[{"role": "critic", "content": "x"}], rejected="b"),
            parse_pair,
            'prefs.jsonl, line 3: chosen[0]: unknown role "critic"; use system, user, assistant '
            "or tool",
        ),
        (
            rec(prompt="q", completion="a", label=1),
            parse_unpaired,
            'prefs.jsonl, line 3: field "label" must be true or false, got a number',
        ),
        (
            rec(prompt="q", completion="a"),
            parse_unpaired,
            'prefs.jsonl, line 3: missing field "label" (unpaired format: "prompt", '
            '"completion" and "label", true for a desirable answer)',
        ),
    ],
)
def test_bad_records_are_one_line_naming_record_and_field(record, parse, message):
    with pytest.raises(DataError) as err:
        parse(record)
    assert str(err.value) == message


# --- encoding -------------------------------------------------------------------------------


def _encode(pair, max_seq_len=256, truncation="truncate"):
    from collections import Counter

    from helpers.data import chat_tokenizer

    from tunesmith.data.encode import EncodeSettings
    from tunesmith.data.preference import encode_pair

    tokenizer = chat_tokenizer()
    settings = EncodeSettings(max_seq_len=max_seq_len, template=tokenizer.chat_template)
    stats = Counter()
    sample = encode_pair(pair, tokenizer, settings, "prefs.jsonl, line 3", stats, truncation)
    return tokenizer, sample, stats


def _trained_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])


def test_a_pair_trains_only_its_answers_behind_one_prompt():
    chat = [user("hi"), bot("hello"), user("2+2?")]  # the prompt's own answer is context
    tokenizer, sample, stats = _encode(Pair(chat, [bot("four")], [bot("five, I think")]))
    assert _trained_text(tokenizer, sample.chosen_ids, sample.chosen_labels) == "four<|im_end|>"
    assert (
        _trained_text(tokenizer, sample.rejected_ids, sample.rejected_labels)
        == "five, I think<|im_end|>"
    )
    start = sample.chosen_labels.index(next(t for t in sample.chosen_labels if t != -100))
    # the prompt is token for token what generation sends, the same in both sequences
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert sample.chosen_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert sample.rejected_ids[:start] == sample.chosen_ids[:start]
    assert stats == {"pairs": 1}


def test_a_long_pair_is_cut_or_dropped_whole():
    pair = Pair([user("2+2?")], [bot("four " * 40)], [bot("five")])
    tokenizer, sample, stats = _encode(pair, max_seq_len=24)
    assert len(sample.chosen_ids) == 24 and len(sample.rejected_ids) < 24
    assert _trained_text(tokenizer, sample.rejected_ids, sample.rejected_labels) == "five<|im_end|>"
    assert stats == {"pairs": 1, "truncated_pairs": 1}
    _, dropped, stats = _encode(pair, max_seq_len=24, truncation="drop")
    assert dropped is None and stats == {"dropped_too_long": 1}
    _, dropped, stats = _encode(Pair([user("long " * 40)], [bot("a")], [bot("b")]), max_seq_len=24)
    assert dropped is None and stats == {"dropped_too_long": 1}  # no room left for an answer


def _prepare(tmp_path, rows, **data):
    from helpers.data import chat_tokenizer, write_jsonl

    from tunesmith.config import DataSection
    from tunesmith.data import prepare_data

    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    section = DataSection(
        datasets=[{"path": str(path), **data.pop("source", {})}],
        cache_dir=str(tmp_path / "cache"),
        max_seq_len=data.pop("max_seq_len", 128),
        **data,
    )
    return prepare_data(section, chat_tokenizer(), seed=3)


def test_the_pipeline_keeps_pairs_whole_through_split_weighting_and_cache(tmp_path):
    from helpers.runs import toy_pairs

    rows = toy_pairs(20)
    first = _prepare(tmp_path, rows, val_fraction=0.2)
    again = _prepare(tmp_path, rows, val_fraction=0.2)  # from the cache
    assert again.sources[0].from_cache and not first.sources[0].from_cache
    for prepared in (first, again):
        assert prepared.group == 2
        assert (len(prepared.train), len(prepared.validation)) == (32, 8)  # 16 + 4 pairs
        for samples in (prepared.train, prepared.validation):
            for i in range(0, len(samples), 2):
                (c_ids, c_labels), (r_ids, r_labels) = samples[i], samples[i + 1]
                start = min(j for j, t in enumerate(c_labels) if t != -100)
                # one prompt in front of both answers, and only the answers train
                assert list(c_ids[:start]) == list(r_ids[:start])
                assert all(t == -100 for t in r_labels[:start])
                assert list(c_ids[start:]) != list(r_ids[start:])
    weighted = _prepare(tmp_path, rows, source={"weight": 1.5})
    assert len(weighted.train) == 60  # 30 pairs: every pair once, half of them twice


def test_kto_examples_carry_their_label_and_a_mismatched_kl_sequence(tmp_path):
    from helpers.data import chat_tokenizer
    from helpers.runs import toy_unpaired

    rows = toy_unpaired(6)
    prepared = _prepare(tmp_path, rows)
    samples, tokenizer = prepared.train, chat_tokenizer()
    assert samples.flags.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    text = lambda i: tokenizer.decode(samples[i][0])  # noqa: E731
    answer = lambda i: tokenizer.decode([t for t in samples[i][1] if t != -100])  # noqa: E731
    for unit in range(6):
        example, kl = 2 * unit, 2 * unit + 1
        assert rows[unit]["prompt"][0]["content"] in text(example)
        assert rows[unit]["prompt"][0]["content"] in text(kl)  # its own prompt ...
        nxt = rows[(unit + 1) % 6]["completion"][0]["content"]
        assert answer(kl).startswith(nxt)  # ... with the next example's answer
    assert prepared.sources[0].format == "unpaired"


def test_field_names_map_and_a_system_prompt_is_added(tmp_path):
    rows = [{"question": "2+2?", "good": "4", "bad": "5"}]
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    prepared = _prepare(
        tmp_path,
        rows,
        source={"format": "preference", "fields": fields},
        system_prompt="Be brief.",
    )
    from helpers.data import chat_tokenizer

    text = chat_tokenizer().decode(prepared.train[0][0])
    assert "Be brief." in text and "2+2?" in text and text.rstrip().endswith("4<|im_end|>")


def test_preference_data_cannot_mix_with_demonstrations(tmp_path):
    from helpers.data import chat_tokenizer, write_jsonl
    from helpers.runs import toy_pairs, toy_rows

    from tunesmith.config import DataSection
    from tunesmith.data import prepare_data

    a = write_jsonl(tmp_path / "a.jsonl", toy_pairs(2))
    b = write_jsonl(tmp_path / "b.jsonl", toy_rows(2))
    section = DataSection(datasets=[str(a), str(b)], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as err:
        prepare_data(section, chat_tokenizer())
    assert str(err.value) == (
        "data.datasets.0 is preference data and data.datasets.1 is chat data; a run trains on "
        "one kind: preference objectives on preference or unpaired data, sft on the rest"
    )
