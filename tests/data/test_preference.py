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
