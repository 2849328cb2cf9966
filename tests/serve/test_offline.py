"""`tunesmith generate`, `chat` and evaluation's generation metrics decode on the serving engine
(`tunesmith.serve.offline`): greedy texts equal transformers' `generate` (through
`tunesmith.generation.generate_batch`, the reference) for the base, LoRA, prompt- and
prefix-tuning adapters and on every test architecture; the model comes back as it was given."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.adapters import BUNDLED, adapter_folder
from helpers.data import chat_tokenizer
from helpers.models import ARCHS, lora_config, make_model, randomize_adapter

import tunesmith
from tunesmith.adapters import disabled, load_adapter, merge, save_adapter, set_active, unmerge
from tunesmith.adapters.state import adapter_state
from tunesmith.builder import load_for_inference
from tunesmith.errors import TunesmithError
from tunesmith.generation import Sampling, chat_template_of, generate_batch, prompt_ids
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from tunesmith.methods.prompt.impl import add_prefix_tuning, add_prompt_tuning
from tunesmith.serve import offline
from tunesmith.serve.offline import generate_texts, stream_text, why_not

GREEDY = Sampling(max_new_tokens=16)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The bundled model with LoRA adapters a and b, a prompt- and a prefix-tuning adapter; the
    quickstart's first 24 held-out prompts."""
    root = tmp_path_factory.mktemp("offline")
    folders = [
        adapter_folder(root, BUNDLED, "lora", name=name, seed=seed, b_scale=3)
        for name, seed in (("a", 1), ("b", 2))
    ]
    model, tokenizer, _ = load_for_inference(
        str(BUNDLED), [str(f) for f in folders], names=["a", "b"]
    )
    for kind, add, config in (
        ("prompt", add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=16)),
        ("prefix", add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=8)),
    ):
        other = type(model).from_pretrained(BUNDLED)
        add(other, config, kind)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in other.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 3)
        save_adapter(other, root / kind, names=[kind])
        load_adapter(model, str(root / kind), name=kind)
    set_active(model, "a")
    lines = (BUNDLED.parent / "data" / "quickstart_val.jsonl").read_text().splitlines()[:24]
    template = chat_template_of(tokenizer)
    prompts = []
    for line in lines:
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        prompts.append(prompt_ids(messages, template, tokenizer, False))
    return model.eval(), tokenizer, prompts


@pytest.mark.parametrize("active", [[], ["a"], ["b"], ["prompt"], ["prefix"]])
def test_greedy_texts_equal_transformers_generate(loaded, active):
    model, tokenizer, prompts = loaded
    set_active(model, active)
    expected = generate_batch(model, tokenizer, prompts, GREEDY, batch_size=8)
    assert why_not(model) is None
    assert generate_texts(model, tokenizer, prompts, GREEDY, batch_size=8) == expected
    assert adapter_state(model).active == active  # as it was
    assert len(set(expected)) > 3  # the prompts give different answers


def test_the_base_inside_disabled_is_the_base(loaded):
    model, tokenizer, prompts = loaded
    set_active(model, "prefix")  # virtual tokens too: disabled() switches them off
    with disabled(model):
        got = generate_texts(model, tokenizer, prompts[:6], GREEDY)
    set_active(model, [])
    assert got == generate_batch(model, tokenizer, prompts[:6], GREEDY)


def test_streamed_pieces_make_the_text(loaded):
    model, tokenizer, prompts = loaded
    set_active(model, "b")
    pieces: list[str] = []
    text = stream_text(model, tokenizer, prompts[1], Sampling(max_new_tokens=24), pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == text
    assert text == generate_batch(model, tokenizer, [prompts[1]], Sampling(max_new_tokens=24))[0]


def test_a_seed_gives_the_same_sample_alone_or_batched(loaded):
    model, tokenizer, prompts = loaded
    set_active(model, "a")
    hot = Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=3)
    batched = generate_texts(model, tokenizer, prompts[:4], hot)
    alone = [generate_texts(model, tokenizer, [p], hot)[0] for p in prompts[:4]]
    assert batched == alone
    other = generate_texts(model, tokenizer, prompts[:4], Sampling(**{**hot.__dict__, "seed": 4}))
    assert other != batched


def test_the_model_comes_back_in_training_mode(loaded):
    model, tokenizer, prompts = loaded
    set_active(model, "a")
    model.train()
    try:
        generate_texts(model, tokenizer, prompts[:2], GREEDY)
        assert model.training
    finally:
        model.eval()


def test_stacked_or_merged_adapters_take_transformers_generate(loaded, monkeypatch):
    model, tokenizer, prompts = loaded
    calls = []
    monkeypatch.setattr(offline, "_run", lambda *a: calls.append(a))
    set_active(model, ["a", "b"])
    assert why_not(model) == "several adapters are active (stacked)"
    stacked = generate_texts(model, tokenizer, prompts[:3], GREEDY)
    set_active(model, "a")
    merge(model, ["a"])
    try:
        assert why_not(model) == "adapters are merged into the weights"
        merged = generate_texts(model, tokenizer, prompts[:3], GREEDY)
    finally:
        unmerge(model)
    assert calls == []  # neither reached the engine
    assert stacked != merged and merged == generate_batch(model, tokenizer, prompts[:3], GREEDY)


def test_an_empty_prompt_is_a_one_line_error(loaded):
    model, tokenizer, _ = loaded
    set_active(model, [])
    with pytest.raises(TunesmithError, match=r"^the prompt is empty: it gives no tokens"):
        stream_text(model, tokenizer, [], GREEDY, print)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_test_architecture(arch):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(), "a")
    randomize_adapter(model, "a")
    tokenizer = chat_tokenizer()
    prompts = [list(range(3, 30)), [5, 6, 7], list(range(40, 52)), [9] * 5]
    sampling = Sampling(max_new_tokens=10)
    for active in ([], ["a"]):
        set_active(model, active)
        expected = generate_batch(model, tokenizer, prompts, sampling)
        assert generate_texts(model, tokenizer, prompts, sampling) == expected
