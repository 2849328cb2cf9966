"""Generation: prompts encoded as training encodes them, sampling settings, stop tokens and
one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.generation import (
    Sampling,
    chat_template_of,
    generate_batch,
    prompt_ids,
    stop_token_ids,
    stream_reply,
)
from tunesmith.models import load_tokenizer


def test_sampling_settings():
    assert Sampling().generate_kwargs() == {"do_sample": False}
    assert Sampling(temperature=0.7, top_p=0.9).generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


def test_prompt_ids_end_with_the_generation_prompt(tiny_dir):
    tokenizer = load_tokenizer(ModelSection(path=str(tiny_dir)))
    template = chat_template_of(tokenizer)
    ids = prompt_ids([{"role": "user", "content": "hi"}], template, tokenizer, add_bos=False)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text


def test_stop_tokens_and_generation(tiny_dir):
    tokenizer = load_tokenizer(ModelSection(path=str(tiny_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    prompts = [[5, 6, 7], [8, 9]]
    torch.manual_seed(0)
    batched = generate_batch(model, tokenizer, prompts, Sampling(max_new_tokens=4))
    alone = [generate_batch(model, tokenizer, [p], Sampling(max_new_tokens=4))[0] for p in prompts]
    assert batched == alone  # left padding changes nothing
    assert not model.training


def test_empty_prompt_and_missing_template_are_one_line_errors(tiny_dir):
    tokenizer = load_tokenizer(ModelSection(path=str(tiny_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(TunesmithError, match="^the prompt is empty: it gives no tokens"):
        stream_reply(model, tokenizer, [], Sampling(), print)
    tokenizer.chat_template = None
    with pytest.raises(TunesmithError) as err:
        chat_template_of(tokenizer)
    assert str(err.value) == (
        "the tokenizer has no chat template; use --raw to complete plain text"
    )
