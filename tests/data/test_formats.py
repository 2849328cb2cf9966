"""Formats, field mappings, chat templates and loss masking, checked on the label ids."""

from __future__ import annotations

import csv
import json

import pytest
from helpers.data import chat_tokenizer, data_section, ids_of, plain_tokenizer, write_jsonl

from tunesmith.data import BUILTIN_TEMPLATES, IGNORE_INDEX, prepare_data, render_segments
from tunesmith.data.preview import show_sample

M = IGNORE_INDEX
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "user", "content": "First: c d"},
        {"role": "assistant", "content": "c"},
    ]
}


def expected(tokenizer, segments, bos=()):
    """ids and labels for (text, trained) segments, with the first label masked."""
    ids, labels = list(bos), [M] * len(bos)
    for text, trained in segments:
        seg = ids_of(tokenizer, text)
        ids += seg
        labels += seg if trained else [M] * len(seg)
    labels[0] = M
    return ids, labels


def only(prepared):
    assert len(prepared.train) == 1
    ids, labels = prepared.train[0]
    return ids.tolist(), labels.tolist()


def test_chat_masks_every_assistant_turn_with_its_end_of_turn(tmp_path):
    tok = chat_tokenizer()
    data = data_section(tmp_path, [str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))])
    got = only(prepare_data(data, tok))
    assert got == expected(
        tok,
        [
            (
                "<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nReverse: a b<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("b a<|im_end|>", True),
            ("\n<|im_start|>user\nFirst: c d<|im_end|>\n<|im_start|>assistant\n", False),
            ("c<|im_end|>", True),
            ("\n", False),  # after the end of the turn: nothing the model must produce
        ],
    )
    # The end-of-turn token is a single special token, and it is trained.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [i for i, label in zip(got[0], got[1], strict=True) if label != M]
    assert trained.count(im_end) == 2


def test_train_on_inputs_trains_everything_but_the_first_token(tmp_path):
    tok = chat_tokenizer()
    data = data_section(
        tmp_path, [str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))], train_on_inputs=True
    )
    ids, labels = only(prepare_data(data, tok))
    assert labels == [M] + ids[1:]


def test_sharegpt_with_role_mapping(tmp_path):
    tok = chat_tokenizer()
    row = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "narrator", "value": "ok"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    path = write_jsonl(tmp_path / "s.jsonl", [row])
    data = data_section(tmp_path, [{"path": str(path), "roles": {"narrator": "user"}}])
    assert only(prepare_data(data, tok)) == expected(
        tok,
        [
            (
                "<|im_start|>user\nhi<|im_end|>\n<|im_start|>user\nok<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("yo<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_chat_field_mapping_and_content_parts(tmp_path):
    tok = chat_tokenizer()
    row = {
        "dialog": [
            {"speaker": "user", "text": [{"type": "text", "text": "q"}]},
            {"speaker": "assistant", "text": "a"},
        ]
    }
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    fields = {"messages": "dialog", "role": "speaker", "content": "text"}
    data = data_section(tmp_path, [{"path": str(path), "format": "chat", "fields": fields}])
    assert only(prepare_data(data, tok)) == expected(
        tok,
        [
            ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False),
            ("a<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_alpaca_with_builtin_template_bos_and_field_mapping(tmp_path):
    tok = plain_tokenizer(bos=True)  # no chat template: "auto" picks the alpaca template
    rows = [{"instruction": "Sort", "context": "b a", "response": "a b"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    fields = {"input": "context", "output": "response"}
    data = data_section(tmp_path, [{"path": str(path), "format": "alpaca", "fields": fields}])
    prepared = prepare_data(data, tok)
    assert prepared.template_name == "alpaca"
    header = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSort\n\nb a\n\n### Response:\n"
    )
    assert only(prepared) == expected(
        tok,
        [(header, False), ("a b<|endoftext|>", True), ("\n\n", False)],
        bos=[tok.bos_token_id],
    )


def test_alpaca_system_field_and_system_prompt(tmp_path):
    tok = plain_tokenizer()
    rows = [
        {"instruction": "i", "output": "o", "system": "S1"},
        {"instruction": "i", "output": "o"},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = data_section(tmp_path, [str(path)], system_prompt="S2", chat_template="chatml")
    prepared = prepare_data(data, tok)
    texts = [tok.decode(prepared.train[i][0].tolist()) for i in range(2)]
    assert texts[0].startswith("<|im_start|>system\nS1<|im_end|>\n<|im_start|>user\ni<|im_end|>")
    assert texts[1].startswith("<|im_start|>system\nS2<|im_end|>\n")


def test_completion_appends_eos_and_trains_all(tmp_path):
    tok = plain_tokenizer(bos=True)
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "once upon"}])
    data = data_section(
        tmp_path, [{"path": str(path), "format": "completion", "fields": {"text": "body"}}]
    )
    ids, labels = only(prepare_data(data, tok))
    want = [tok.bos_token_id, *ids_of(tok, "once upon"), tok.eos_token_id]
    assert ids == want and labels == [M] + want[1:]
    no_eos = data_section(
        tmp_path, [{"path": str(path), "fields": {"text": "body"}}], add_eos=False
    )
    assert only(prepare_data(no_eos, tok))[0] == want[:-1]


def test_tokenized_with_and_without_labels(tmp_path):
    tok = plain_tokenizer()
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [M, M, 7, 8]}, {"input_ids": [9, 10, 11]}]
    data = data_section(tmp_path, [str(write_jsonl(tmp_path / "k.jsonl", rows))])
    prepared = prepare_data(data, tok)
    assert [(i.tolist(), lab.tolist()) for i, lab in (prepared.train[0], prepared.train[1])] == [
        ([5, 6, 7, 8], [M, M, 7, 8]),
        ([9, 10, 11], [M, 10, 11]),
    ]


@pytest.mark.parametrize("name", ["chatml", "llama-3", "alpaca"])
def test_builtin_templates_render_exactly(name):
    tok = plain_tokenizer()
    messages = CHAT["messages"]
    segments = render_segments(messages, BUILTIN_TEMPLATES[name], tok, "here")
    full = tok.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=False)
    assert "".join(text for text, _ in segments) == full
    responses = [text for text, trained in segments if trained]
    assert (
        responses
        == {
            "chatml": ["b a<|im_end|>", "c<|im_end|>"],
            "llama-3": ["b a<|eot_id|>", "c<|eot_id|>"],
            "alpaca": ["b a<|endoftext|>", "c<|endoftext|>"],
        }[name]
    )
    if name == "llama-3":
        assert full.startswith(
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nReverse: a b<|eot_id|>"
        )


def test_template_choice(tmp_path):
    path = str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    assert (
        prepare_data(data_section(tmp_path, [path]), chat_tokenizer()).template_name == "tokenizer"
    )
    with pytest.raises(
        ValueError, match="^data.chat_template: the tokenizer has no chat template; "
    ):
        prepare_data(data_section(tmp_path, [path]), plain_tokenizer())
    with pytest.raises(
        ValueError, match="^data.chat_template: the tokenizer has no chat template; "
    ):
        prepare_data(data_section(tmp_path, [path], chat_template="tokenizer"), plain_tokenizer())
    with pytest.warns(
        UserWarning, match="<|start_header_id|>, <|end_header_id|>, <|eot_id|> are not"
    ):
        prepared = prepare_data(
            data_section(tmp_path, [path], chat_template="llama-3"), plain_tokenizer()
        )
    assert prepared.template_name == "llama-3"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}")
    ids, labels = only(
        prepare_data(data_section(tmp_path, [path], chat_template=str(jinja)), plain_tokenizer())
    )
    tok = plain_tokenizer()
    assert (
        tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != M])
        == "[assistant]b a\n[assistant]c\n"
    )


def test_a_template_that_rewrites_history_trains_each_turn_with_one_warning(tmp_path):
    """The count in front changes with every message, so no prompt is the one generation
    sends: each response is found in the whole rendering, and the warning names the turn."""
    tok = plain_tokenizer()
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    path = str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    with pytest.warns(UserWarning) as caught:
        prepared = prepare_data(data_section(tmp_path, [path], chat_template=str(jinja)), tok)
    (warning,) = [
        str(w.message) for w in caught if "conversations the chat template" in str(w.message)
    ]
    assert warning.startswith(
        f"{path}: in 1 of 1 conversations the chat template renders an assistant turn behind "
        "another prompt than its generation prompt"
    )
    assert f"first: {path}, line 1, assistant turn 1)" in warning
    ids, labels = prepared.train[0]
    pairs = zip(ids.tolist(), labels.tolist(), strict=True)
    trained = tok.decode([i for i, lab in pairs if lab != M])
    assert trained == "b ac"  # both answers, nothing else
    assert prepared.sources[0].inexact_template == 1


def test_a_turn_the_template_does_not_render_is_an_error_naming_it(tmp_path):
    tok = plain_tokenizer()
    jinja = tmp_path / "t.jinja"
    jinja.write_text(
        "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}"
        "{% endfor %}"
    )
    path = str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    with pytest.raises(ValueError) as err:
        prepare_data(data_section(tmp_path, [path], chat_template=str(jinja)), tok)
    assert str(err.value) == (
        f"{path}, line 1: assistant turn 1 (message 2): the chat template renders it "
        "differently within the conversation than after its generation prompt, so its tokens "
        "cannot be masked exactly; choose another data.chat_template"
    )


def test_local_sources_json_csv_parquet_folder(tmp_path):
    tok = chat_tokenizer()
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(rows))
    with (folder / "b.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), folder / "c.parquet")
    prepared = prepare_data(data_section(tmp_path, [str(folder)]), tok)
    assert len(prepared.train) == 9
    decoded = [tok.decode(prepared.train[i][0].tolist()) for i in range(9)]
    assert decoded[0] == decoded[3] == decoded[6]  # same record from json, csv and parquet
    assert "<|im_start|>user\ni2<|im_end|>" in decoded[8]
    capped = prepare_data(data_section(tmp_path, [{"path": str(folder), "max_samples": 4}]), tok)
    assert len(capped.train) == 4


def test_hub_source_goes_through_datasets(tmp_path, monkeypatch):
    import datasets

    calls = []

    class Fake(list):
        _fingerprint = "abc"

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return Fake([{"text": "hello"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = data_section(
        tmp_path, [{"path": "someone/corpus", "subset": "en", "split": "train[:10]"}]
    )
    prepared = prepare_data(data, plain_tokenizer())
    assert prepared.sources[0].format == "completion" and len(prepared.train) == 1
    assert calls[0] == ("someone/corpus", "en", "train[:10]", None)


def test_preview_marks_masked_spans(tmp_path):
    tok = chat_tokenizer()
    data = data_section(tmp_path, [str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))])
    prepared = prepare_data(data, tok)
    assert show_sample(*prepared.train[0], tok) == (
        "⟦<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse: a b<|im_end|>\n"
        "<|im_start|>assistant\n⟧b a<|im_end|>⟦\n<|im_start|>user\nFirst: c d<|im_end|>\n"
        "<|im_start|>assistant\n⟧c<|im_end|>⟦\n⟧"
    )


def test_tokenizer_built_from_a_vocab_with_its_own_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>", "<turn>", "<end>", "user", "assistant", "hello", "there", "hi"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", additional_special_tokens=["<turn>", "<end>"]
    )
    tok.chat_template = (
        "{% for m in messages %}<turn>{{ m.role }} {{ m.content }}<end>{% endfor %}"
        "{% if add_generation_prompt %}<turn>assistant {% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
        ]
    }
    data = data_section(tmp_path, [str(write_jsonl(tmp_path / "v.jsonl", [row]))])
    ids, labels = only(prepare_data(data, tok))
    #        <turn> user hello there <end> <turn> assistant | hi <end>
    assert ids == [2, 4, 6, 7, 3, 2, 5, 8, 3]
    assert labels == [M, M, M, M, M, M, M, 8, 3]
