"""Prompt and prefix tuning (`methods/prompt/`): text init, the KV cache in generation, the
loss alignment, a prefix trained through an MLP, and the attention a prefix needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.methods import (
    ATOL,
    N,
    WordTokenizer,
    ours,
    peft_logits,
    perturb,
)
from helpers.models import input_ids, logits, make_model
from peft import PeftModel
from safetensors.torch import load_file

import tunesmith
from tunesmith.train.loss import causal_lm_loss_sum, model_loss_sum


def test_prefix_trained_through_an_mlp_saves_flat_and_resumes_exactly(tmp_path):
    model = make_model("llama")
    tunesmith.add_prefix_tuning(model, ours("prefix", projection=True, init="random"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("transform" in n for n in trainable)
    ids = input_ids()
    expected = logits(model, ids)
    tunesmith.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (N, 2 * 2 * 2 * 8)  # layers·2·kv_heads·head_dim
    theirs = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(peft_logits(theirs, ids, "prefix"), expected, atol=ATOL, rtol=0)
    again = make_model("llama")  # tunesmith reloads the MLP itself (training can continue)
    tunesmith.load_adapter(again, tmp_path, trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(logits(again, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_text_init_behaves_exactly_like_prepending_the_text(arch, kind):
    model = make_model(arch)
    text = [5, 9, 11]
    ids = input_ids(batch=1, seq=6)
    with torch.no_grad():
        expected = model(input_ids=torch.cat([torch.tensor([text]), ids], 1)).logits[:, len(text) :]
    config = ours(kind, init="text", init_text="5 9 11")
    tunesmith.add_adapter(model, config, tokenizer=WordTokenizer())
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(with_mask, expected, atol=ATOL, rtol=0)


def greedy_without_cache(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a full forward per token (no generate(), no KV cache); rows that
    have produced EOS continue with padding, as generate() does."""
    config = model.generation_config
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new_tokens):
            next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            next_ids = next_ids.masked_fill(done, config.pad_token_id)
            done |= next_ids == config.eos_token_id
            ids = torch.cat([ids, next_ids], 1)
    return ids


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_with_the_kv_cache(kind):
    model = make_model("llama")
    tunesmith.add_adapter(model, ours(kind, init="random"))
    perturb(model)
    ids = input_ids(batch=2, seq=5)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # PEFT, given our adapter, decodes the same tokens. Its forward is the oracle: PEFT 0.21's
    # generate() looks for `past_key_values` and `cache_position`, which transformers 5.24
    # renamed (`cache`) or dropped, so from 5.24 on it re-inserts the virtual tokens each step.
    folder = Path(__import__("tempfile").mkdtemp())
    tunesmith.save_adapter(model, folder)
    theirs = PeftModel.from_pretrained(make_model("llama"), folder).eval()
    assert torch.equal(greedy_without_cache(theirs, ids, 8), cached)
    # a left-padded batch decodes each row as it would alone
    short = ids[1, 2:]
    padded = torch.stack([ids[0], torch.cat([torch.zeros(2, dtype=torch.long), short])])
    mask = (torch.arange(5) >= torch.tensor([[0], [2]])).long()
    batch = model.generate(
        padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    alone = model.generate(short[None], max_new_tokens=6, do_sample=False)
    assert torch.equal(batch[1, 5:], alone[0, 3:])


def test_prompt_tuning_loss_is_aligned_with_the_callers_tokens():
    model = make_model("llama")
    tunesmith.add_prompt_tuning(model, ours("prompt", init="random"))
    ids = input_ids(batch=2, seq=8)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    chunked, n = model_loss_sum(model, batch)
    full, m = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    assert n == m == 2 * 5
    torch.testing.assert_close(chunked, full)
