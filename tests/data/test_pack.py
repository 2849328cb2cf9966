"""Packing: rows hold every sample once and never overflow; the packed loss and gradients
equal the unpacked ones on every architecture (no attention across samples)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.data import chat_tokenizer, data_section, write_jsonl
from helpers.models import ARCHS, VOCAB, make_model

from tunesmith.data import collate, collate_packed, pack_groups, packing_efficiency, prepare_data
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.train import causal_lm_loss_sum


def random_samples(seed: int, count: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        n = int(rng.integers(3, max_len + 1))
        ids = rng.integers(3, VOCAB, size=n).tolist()
        prompt = int(rng.integers(1, n - 1))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        samples.append((ids, labels))
    return samples


def test_pack_groups_is_a_partition_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    rows = pack_groups(lengths, 64)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    lower_bound = int(np.ceil(lengths.sum() / 64))
    assert len(rows) <= lower_bound * 1.1 + 1  # best-fit decreasing is near optimal
    assert packing_efficiency(lengths, rows, 64) == pytest.approx(lengths.sum() / (len(rows) * 64))
    assert pack_groups(lengths, 64) == rows  # deterministic
    with pytest.raises(ValueError, match="sample 0 has 9 tokens, more than max_seq_len 8"):
        pack_groups([9], 8)


def test_collate_packed_layout():
    samples = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [IGNORE_INDEX, 9])]
    batch = collate_packed([samples, samples[:1]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 6, 7, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    padded = collate(samples, pad_id=0)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def loss_and_grads(model, batches):
    model.zero_grad()
    total, count = 0.0, 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        loss_sum, n = causal_lm_loss_sum(logits, batch["labels"])
        total, count = total + loss_sum, count + n
    loss = total / count
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_loss_and_gradients_equal_unpacked(arch):
    model = make_model(arch)  # eval mode: no dropout, so the comparison is exact
    samples = random_samples(seed=1, count=9, max_len=20)
    rows = pack_groups([len(ids) for ids, _ in samples], 32)
    assert len(rows) < len(samples)
    unpacked = [collate([s], pad_id=0) for s in samples]
    packed = [collate_packed([[samples[i] for i in row] for row in rows], pad_id=0)]
    loss_u, grads_u = loss_and_grads(model, unpacked)
    loss_p, grads_p = loss_and_grads(model, packed)
    assert loss_p == pytest.approx(loss_u, abs=1e-4)
    assert grads_u.keys() == grads_p.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-4, rtol=1e-3, msg=name)
    # Each packed sample's logits are its own; with positions not restarting (samples seeing
    # each other) they would not be.
    row = [samples[i] for i in rows[0]]
    batch = collate_packed([row], pad_id=0)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
        packed_logits = model(**inputs, use_cache=False).logits[0]
        leaky = torch.arange(width)[None]
        leaky_logits = model(batch["input_ids"], position_ids=leaky, use_cache=False).logits[0]
        at = len(row[0][0])
        ids = torch.tensor([row[1][0]])
        alone = model(ids).logits[0]
    second = slice(at, at + len(row[1][0]))
    torch.testing.assert_close(packed_logits[second], alone, atol=1e-5, rtol=1e-4)
    assert (leaky_logits[second] - alone).abs().max() > 1e-3


def test_packed_equals_padded_batch_with_sdpa():
    model = make_model("llama")
    model.config._attn_implementation = "sdpa"
    samples = random_samples(seed=2, count=6, max_len=16)
    rows = pack_groups([len(ids) for ids, _ in samples], 40)
    loss_u, grads_u = loss_and_grads(model, [collate(samples, pad_id=0)])
    loss_p, grads_p = loss_and_grads(
        model, [collate_packed([[samples[i] for i in r] for r in rows], 0)]
    )
    assert loss_p == pytest.approx(loss_u, abs=1e-4)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-4, rtol=1e-3, msg=name)


def test_prepare_reports_packing_efficiency(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{k} " * k},
                {"role": "assistant", "content": "a"},
            ]
        }
        for k in range(1, 30)
    ]
    path = str(write_jsonl(tmp_path / "c.jsonl", rows))
    prepared = prepare_data(
        data_section(tmp_path, [path], max_seq_len=128, packing=True), chat_tokenizer()
    )
    lengths = prepared.train.lengths
    assert sorted(i for row in prepared.train_rows for i in row) == list(range(len(lengths)))
    assert prepared.packing_efficiency == pytest.approx(
        lengths.sum() / (len(prepared.train_rows) * 128)
    )
    assert prepared.packing_efficiency > 0.8
