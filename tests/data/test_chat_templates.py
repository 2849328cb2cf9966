"""Masking on the chat templates models are published with (`chat_templates/`, the Jinja text
from each model's tokenizer_config.json; see its README): for a multi-turn chat with a system
prompt, every assistant turn's words and its end-of-turn marker train once and nothing else
does; generation's prompt is the text the template renders with `add_generation_prompt`, and
before each exact turn training holds the same tokens; a turn that cannot be masked exactly is
named in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers.data import BUNDLED
from transformers import PreTrainedTokenizerFast

from tunesmith.data import EncodeSettings, encode_examples
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.formats import Conversation
from tunesmith.data.sources import DataError
from tunesmith.generation import prompt_ids

TEMPLATES = Path(__file__).parent / "chat_templates"
SYSTEM = "You are terse."
TURNS = [("Name a colour.", "Red."), ("Another one?", "Blue, then."), ("And a third?", "Green.")]
THOUGHTS = ["It asks for one.", "A second one.", "Pick green."]

LLAMA3 = {
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
    "specials": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"],
}
CHATML = {"bos": None, "eos": "<|im_end|>", "specials": ["<|im_start|>", "<|endoftext|>"]}
DEEPSEEK = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "specials": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
}
MISTRAL = {"bos": "<s>", "eos": "</s>", "specials": ["[INST]", "[/INST]"]}
GEMMA = {"bos": "<bos>", "eos": "<eos>", "specials": ["<start_of_turn>", "<end_of_turn>"]}


def _answers(eot: str, lead: str = "", last_lead: str = "") -> list[str]:
    """The trained text of each assistant turn: its words and the end-of-turn marker."""
    out = [f"{lead}{answer}{eot}" for _, answer in TURNS]
    out[-1] = f"{last_lead or lead}{TURNS[-1][1]}{eot}"
    return out


# name: (template file, tokenizer, template arguments, thinking in the answers, trained text
# per turn, turns trained behind another prompt than the generation prompt)
CASES = {
    "llama-3.1": (
        "meta-llama-Llama-3.1-8B-Instruct",
        LLAMA3,
        {},
        False,
        _answers("<|eot_id|>"),
        [],
    ),
    "llama-3.2": (
        "meta-llama-Llama-3.2-3B-Instruct",
        LLAMA3,
        {},
        False,
        _answers("<|eot_id|>"),
        [],
    ),
    "llama-3.3": (
        "meta-llama-Llama-3.3-70B-Instruct",
        LLAMA3,
        {},
        False,
        _answers("<|eot_id|>"),
        [],
    ),
    # the system prompt goes into the last user turn only, so a conversation that ends with
    # an answer has none: every prompt differs from generation's, and message 0 is left out
    "mistral-v0.3": (
        "mistralai-Mistral-7B-Instruct-v0.3",
        MISTRAL,
        {},
        False,
        _answers("</s>", lead=" "),
        [1, 2, 3],
    ),
    "mistral-small-3.2": (
        "mistralai-Mistral-Small-3.2-24B-Instruct-2506",
        {**MISTRAL, "specials": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]},
        {},
        False,
        _answers("</s>"),
        [],
    ),
    "gemma-3": ("google-gemma-3-4b-it", GEMMA, {}, False, _answers("<end_of_turn>"), []),
    "qwen-2.5": ("Qwen-Qwen2.5-7B-Instruct", CHATML, {}, False, _answers("<|im_end|>"), []),
    # Qwen3 renders the last turn with an (empty) thinking block and earlier ones without
    "qwen-3": (
        "Qwen-Qwen3-0.6B",
        CHATML,
        {},
        False,
        _answers("<|im_end|>", last_lead="<think>\n\n</think>\n\n"),
        [],
    ),
    # without thinking, generation prompts end in an empty thinking block that earlier turns
    # lack once later turns follow
    "qwen-3-no-thinking": (
        "Qwen-Qwen3-0.6B",
        CHATML,
        {"enable_thinking": False},
        False,
        _answers("<|im_end|>"),
        [1, 2],
    ),
    # with thinking in the answers: the template keeps only the last turn's
    "qwen-3-thinking": (
        "Qwen-Qwen3-0.6B",
        CHATML,
        {},
        True,
        [*_answers("<|im_end|>")[:2], f"<think>\n{THOUGHTS[2]}\n</think>\n\nGreen.<|im_end|>"],
        [],
    ),
    "phi-3.5": (
        "microsoft-Phi-3.5-mini-instruct",
        {
            "bos": None,
            "eos": "<|endoftext|>",
            "specials": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        },
        {},
        False,
        _answers("<|end|>"),
        [],
    ),
    "phi-4": (
        "microsoft-phi-4",
        {**CHATML, "specials": ["<|im_start|>", "<|im_sep|>"]},
        {},
        False,
        _answers("<|im_end|>"),
        [],
    ),
    # the generation prompt opens a <think> block the rendered turns do not have
    "deepseek-r1-distill-llama": (
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
        DEEPSEEK,
        {},
        False,
        _answers("<｜end▁of▁sentence｜>"),
        [1, 2, 3],
    ),
    "deepseek-r1-distill-qwen": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        DEEPSEEK,
        {},
        False,
        _answers("<｜end▁of▁sentence｜>"),
        [1, 2, 3],
    ),
    "smollm2": (
        "HuggingFaceTB-SmolLM2-1.7B-Instruct",
        CHATML,
        {},
        False,
        _answers("<|im_end|>"),
        [],
    ),
}


def tokenizer_for(spec: dict, template: str) -> PreTrainedTokenizerFast:
    """The bundled byte-level BPE vocabulary with the template's special tokens added, its
    BOS and EOS set as the model's tokenizer sets them, and its chat template."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED / "tokenizer.json"))
    named = {"eos_token": spec["eos"], "pad_token": "<|pad|>"}
    if spec["bos"]:
        named["bos_token"] = spec["bos"]
    tokenizer.add_special_tokens({**named, "additional_special_tokens": spec["specials"]})
    tokenizer.chat_template = template
    return tokenizer


def conversation(thinking: bool) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for (question, answer), thought in zip(TURNS, THOUGHTS, strict=True):
        if thinking:
            answer = f"<think>\n{thought}\n</think>\n\n{answer}"
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return messages


def encode(messages, tokenizer, kwargs) -> tuple[list[int], list[int], list[str]]:
    settings = EncodeSettings(
        max_seq_len=4096, template=tokenizer.chat_template, template_kwargs=kwargs or None
    )
    from collections import Counter

    stats: Counter = Counter()
    [(ids, labels)] = encode_examples(
        [(Conversation(messages), "chat.jsonl, line 1")], tokenizer, settings, stats
    )
    notes = sorted(k for k in stats if k.startswith("first "))
    return list(ids), list(labels), notes


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_every_assistant_turn_and_its_end_of_turn_train_once_and_nothing_else(name):
    file, spec, kwargs, thinking, expected, inexact = CASES[name]
    tokenizer = tokenizer_for(spec, (TEMPLATES / f"{file}.jinja").read_text())
    messages = conversation(thinking)
    ids, labels, notes = encode(messages, tokenizer, kwargs)
    runs = trained_runs(ids, labels)
    texts = [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in runs]
    assert texts == expected
    eot = expected[0][len(expected[0].rstrip(">").rsplit("<", 1)[0]) :]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    assert [ids[b - 1] for a, b in runs] == [eot_id] * 3  # one special token, trained
    expected_notes = []
    if name == "mistral-v0.3":
        expected_notes.append("first dropped_message:chat.jsonl, line 1, message 0 (system)")
    if inexact:
        expected_notes.append(
            f"first inexact_template:chat.jsonl, line 1, assistant turn {inexact[0]}"
        )
    assert notes == expected_notes
    # before each exact turn: the tokens generation sends for that point of the conversation
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn, ((start, _), index) in enumerate(zip(runs, assistant, strict=True), 1):
        generation = prompt_ids(messages[:index], tokenizer.chat_template, tokenizer, False, kwargs)
        rendered = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert tokenizer.decode(generation, skip_special_tokens=False) == rendered
        if turn in inexact:
            assert ids[:start] != generation
        else:
            assert ids[:start] == generation, (name, turn)


def test_gemma_2_refuses_a_system_prompt_in_one_line():
    tokenizer = tokenizer_for(GEMMA, (TEMPLATES / "google-gemma-2-2b-it.jinja").read_text())
    with pytest.raises(DataError) as err:
        encode(conversation(False), tokenizer, {})
    assert str(err.value) == "chat.jsonl, line 1: chat template failed: System role not supported"
    ids, labels, notes = encode(conversation(False)[1:], tokenizer, {})  # without: exact
    texts = [tokenizer.decode(ids[a:b]) for a, b in trained_runs(ids, labels)]
    assert texts == _answers("<end_of_turn>") and notes == []


def test_the_published_templates_are_the_files_named_in_the_readme():
    readme = (TEMPLATES / "README.md").read_text()
    files = sorted(p.name for p in TEMPLATES.glob("*.jinja"))
    assert len(files) == 14
    for name in files:
        assert f"`{name}`" in readme, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {CASES[c][0] + ".jinja" for c in CASES} | {"google-gemma-2-2b-it.jinja"} == set(
            files
        )


def test_train_says_in_one_line_which_turn_is_inexact_and_what_is_left_out(tmp_path):
    from helpers.data import data_section, write_jsonl

    from tunesmith.data import prepare_data

    tokenizer = tokenizer_for(
        MISTRAL, (TEMPLATES / "mistralai-Mistral-7B-Instruct-v0.3.jinja").read_text()
    )
    rows = [{"messages": conversation(False)}, {"messages": conversation(False)[1:]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.warns(UserWarning) as caught:
        prepare_data(data_section(tmp_path, [str(path)]), tokenizer)
    said = [str(w.message) for w in caught]
    assert f"{path}: in 1 of 2 conversations the chat template renders an assistant turn " in (
        "".join(said)
    )
    assert any(
        f"first: {path}, line 1, assistant turn 1); each such turn trains" in s for s in said
    )
    assert f"{path}: in 1 of 2 conversations the chat template leaves out a system or user " in (
        "".join(said)
    )
    assert any(f"(first: {path}, line 1, message 0 (system))" in s for s in said)
