"""The serving engine's slot cache: chunked, batched prefill and decoding in place give the
tokens that the left-padded DynamicCache path and transformers' own generate give."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers.adapters import BUNDLED, adapter_folder
from helpers.data import chat_tokenizer
from helpers.models import ARCHS, lora_config, make_model, randomize_adapter
from transformers import MistralConfig

import tunesmith
from tunesmith.builder import load_for_inference
from tunesmith.serve.engine import Engine, Params, Sequence
from tunesmith.serve.slots import mask_decode, mask_prefill, supports_slots

PROMPTS = [
    list(range(5, 45)),  # 40 tokens: several chunks at a small budget
    [7, 450, 3483],
    list(range(100, 123)),
    [9] * 11,
    list(range(300, 302)),
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    folders = [
        adapter_folder(root, BUNDLED, "lora", name=name, seed=seed, b_scale=3)
        for name, seed in (("a", 1), ("b", 2))
    ]
    model, tokenizer, _ = load_for_inference(
        str(BUNDLED), [str(f) for f in folders], names=["a", "b"]
    )
    return model, tokenizer


def _run(engine: Engine, jobs: list[tuple[list[int], str | None]], tokens: int = 12, one=False):
    done = threading.Semaphore(0)
    sequences = [
        Sequence(
            prompt, adapter, Params(max_tokens=tokens), lambda k, v: k != "text" and done.release()
        )
        for prompt, adapter in jobs
    ]
    engine.start()
    try:
        if one:  # one request each: more than --max-running may queue
            for seq in sequences:
                engine.submit([seq])
        else:  # together: the first turn admits them all (a schedule that does not vary)
            engine.submit(sequences)
        for _ in sequences:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert all(s.finish_reason in ("stop", "length") for s in sequences)
    return [s.tokens for s in sequences]


def test_chunked_batched_prefill_and_slots_equal_the_padded_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    jobs = [(p, [None, "a", "b"][i % 3]) for i, p in enumerate(PROMPTS)]
    jobs += [(PROMPTS[0], "b"), (PROMPTS[1], None)]
    legacy = Engine(model, tokenizer)
    legacy.slotted = False  # every group on the left-padded DynamicCache
    expected = _run(legacy, jobs)
    whole = Engine(model, tokenizer)  # every prompt in one prefill pass
    assert whole.slotted
    assert _run(whole, jobs) == expected
    chunked = Engine(model, tokenizer, prefill_tokens=7)  # 40 tokens: 6 chunks, between steps
    assert chunked.packed  # chunks ride in the decode pass, one token per row
    assert _run(chunked, jobs) == expected
    apart = Engine(model, tokenizer, prefill_tokens=7)
    apart.packed = False  # a prefill pass, then a decode pass
    assert _run(apart, jobs) == expected
    passes = {}
    for name in ("packed", "apart"):
        engine = Engine(model, tokenizer, prefill_tokens=7)  # fresh: nothing in its prefix cache
        engine.packed = name == "packed"
        hook = model.base_model.register_forward_hook(
            lambda *a, name=name: passes.__setitem__(name, passes.get(name, 0) + 1)
        )
        try:
            _run(engine, jobs)
        finally:
            hook.remove()
        generated = engine.stats.generated_tokens
    # the same tokens in fewer passes over the weights (prefill chunks ride in decode passes)
    assert passes["packed"] < passes["apart"] and generated == 84
    assert chunked.stats.prompt_tokens == sum(len(p) for p, _ in jobs)
    # two slots for seven sequences: they queue, and a finished one's slot is reused
    two = Engine(model, tokenizer, max_running=2, prefill_tokens=16)
    assert _run(two, jobs, one=True) == expected
    assert chunked.cached_tokens() == 0  # idle: no column in use
    assert chunked._cache.held_bytes() == 0  # stopped: the buffers are dropped


def test_the_base_rows_equal_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    jobs = [(p, None) for p in PROMPTS]
    got = _run(Engine(model, tokenizer, prefill_tokens=16), jobs, tokens=10)
    from tunesmith.adapters.activation import set_active

    set_active(model, [])
    for (prompt, _), tokens in zip(jobs, got, strict=True):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10
        )
        assert tokens == out[0, len(prompt) :].tolist()[: len(tokens)]


def test_masks_show_each_row_its_own_columns():
    m = mask_decode([2, 0, 3], torch.float32, "cpu")
    assert m.shape == (3, 1, 1, 4)
    assert (m[:, 0, 0] == 0).tolist() == [
        [True, True, True, False],
        [True, False, False, False],
        [True, True, True, True],
    ]
    m = mask_prefill([0, 4], [3, 2], torch.float32, "cpu")
    assert m.shape == (2, 1, 3, 6)
    assert (m[1, 0] == 0).tolist() == [  # row 1: positions 4, 5 (and a padded query, 6)
        [True, True, True, True, True, False],
        [True, True, True, True, True, True],
        [True, True, True, True, True, True],
    ]
    assert m.min() == torch.finfo(torch.float32).min


def test_a_sliding_window_keeps_the_padded_path(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert supports_slots(model)

    class Windowed:
        config = MistralConfig(sliding_window=64)

    assert not supports_slots(Windowed())
    Windowed.config = MistralConfig(sliding_window=None)
    assert supports_slots(Windowed())


SYSTEM = list(range(500, 548))  # 48 tokens: three blocks


def test_a_shared_prefix_is_computed_once_per_adapter(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first, second = SYSTEM + [60, 61, 62], SYSTEM + [70, 71]
    plain = Engine(model, tokenizer, prefix_cache_bytes=0)
    expected = [_run(plain, [(p, a)]) for p in (first, second) for a in (None, "a")]
    engine = Engine(model, tokenizer)
    got = [_run(engine, [(first, None)]), _run(engine, [(second, None)])]
    assert engine.stats.cached_prompt_tokens == 48  # the second reused all three blocks
    assert engine.stats.prompt_tokens == len(first) + len(second) - 48
    got += [_run(engine, [(first, "a")]), _run(engine, [(second, "a")])]
    # adapter a's keys differ: its first request computes the prefix, its second reuses it
    assert engine.stats.cached_prompt_tokens == 96
    assert got == [expected[0], expected[2], expected[1], expected[3]]
    # the same prompt again: all but the last token's block (its logits are needed)
    _run(engine, [(SYSTEM, None)])
    assert engine.stats.cached_prompt_tokens == 96 + 32
    engine.prefix.drop("a")
    assert all(key[0] is None for key in engine.prefix._blocks)


def test_the_prefix_cache_keeps_to_its_bytes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    _run(engine, [(SYSTEM, None)], tokens=1)
    block = engine.prefix.bytes // len(engine.prefix)
    assert len(engine.prefix) == 3 and engine.prefix.bytes == 3 * block
    engine.prefix.max_bytes = 2 * block
    _run(engine, [(list(range(600, 616)) + [1], None)], tokens=1)  # one new block
    assert len(engine.prefix) == 2 and engine.prefix.bytes == 2 * block


@pytest.mark.parametrize("arch", ARCHS)
def test_every_test_architecture_gives_the_padded_paths_tokens(arch):
    """Packed passes (or, with a sliding window, the left-padded path) on the six test
    architectures, base and a LoRA adapter mixed: the tokens of each sequence run alone."""
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(), "a")
    randomize_adapter(model, "a")
    tokenizer = chat_tokenizer()  # ids below the models' 96 decode as they would anywhere
    prompts = [list(range(3, 30)), [5, 6, 7], list(range(40, 52)), [9] * 5]
    jobs = [(p, [None, "a"][i % 2]) for i, p in enumerate(prompts)]
    alone = [_run(_legacy(model, tokenizer), [job], tokens=10)[0] for job in jobs]
    engine = Engine(model, tokenizer, prefill_tokens=8)
    assert engine.packed == (arch != "mistral")  # Mistral's config has a 4096-token window
    assert _run(engine, jobs, tokens=10) == alone


def _legacy(model, tokenizer) -> Engine:
    engine = Engine(model, tokenizer)
    engine.slotted = engine.packed = False
    return engine
