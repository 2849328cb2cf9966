"""Keyed dropout: a sample's mask is a function of (seed, step, sample, position, site,
feature), so it does not depend on padding, the micro-batch, the process or a recomputation,
and it keeps 1 - p of the elements, scaled as nn.Dropout scales them."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.adapters.dropout import (
    KeyedDropout,
    dropout_keys,
    hash32,
    keep_mask,
    number_sites,
    token_keys,
)


def test_hash32_matches_the_reference_values_of_lowbias32():
    # lowbias32 written with Python's unbounded ints, as its author gives it
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0xFFFFFFFF, 0x80000000, 2**31 - 1]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [reference(v) for v in values]


def test_a_samples_keys_do_not_depend_on_padding_or_its_row():
    alone = token_keys(7, 3, [[(5, 4)]], width=4)
    padded = token_keys(7, 3, [[(9, 6)], [(5, 4)]], width=6)
    assert torch.equal(padded[1, :4], alone[0])
    packed = token_keys(7, 3, [[(9, 6), (5, 4)]], width=12)  # padding-free: one long row
    assert torch.equal(packed[0, 6:10], alone[0])
    assert not torch.equal(token_keys(7, 4, [[(5, 4)]], 4), alone)  # another step
    assert not torch.equal(token_keys(8, 3, [[(5, 4)]], 4), alone)  # another seed
    assert len(set(padded.flatten().tolist())) == 12  # every token its own key


def test_masks_keep_one_minus_p_and_differ_by_site_and_token():
    keys = token_keys(0, 0, [[(i, 64)] for i in range(8)], width=64)
    with dropout_keys(keys):
        mask = keep_mask(torch.Size((8, 64, 256)), 0.25, 11, "cpu")
        other_site = keep_mask(torch.Size((8, 64, 256)), 0.25, 12, "cpu")
        flat = keep_mask(torch.Size((8 * 64, 256)), 0.25, 11, "cpu")  # the fused step's view
    kept = mask.float().mean().item()
    assert abs(kept - 0.75) < 0.005  # 131,072 draws: 5 standard deviations is 0.006
    assert torch.equal(flat, mask.reshape(-1, 256))
    assert (mask != other_site).float().mean() > 0.3
    rows = mask.reshape(-1, 256).float()
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]  # no two tokens alike
    assert keep_mask(torch.Size((8, 64, 256)), 0.25, 11, "cpu") is None  # no keys: none


def test_keyed_dropout_scales_like_nn_dropout_and_falls_back_without_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), KeyedDropout(0.5))
    assert number_sites(model) == 1 and model[1].site is not None
    x = torch.ones(2, 3, 4)
    keys = token_keys(1, 0, [[(0, 3)], [(1, 3)]], width=3)
    with dropout_keys(keys):
        first = model[1](x)
        again = model[1](x)
    assert torch.equal(first, again)  # a recomputation draws the same mask
    assert set(first.unique().tolist()) <= {0.0, 2.0}
    model.eval()
    assert torch.equal(model[1](x), x)
    model.train()
    fallback = model[1](torch.ones(1000, 4))  # no keys: torch's generator, as nn.Dropout
    assert set(fallback.unique().tolist()) == {0.0, 2.0}
