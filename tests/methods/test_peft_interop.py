"""IA3, prompt and prefix tuning against PEFT: each side loads what the other saves, with
the same logits, and the saved configs carry PEFT's keys."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.methods import (
    ATOL,
    PEFT_ARCHS,
    ours,
    peft_config,
    peft_logits,
    perturb,
)
from helpers.models import input_ids, logits, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import tunesmith


@pytest.mark.parametrize("kind", ["ia3", "prompt", "prefix"])
@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_we_load_what_peft_saves_and_peft_loads_what_we_save(arch, kind, tmp_path):
    torch.manual_seed(5)
    theirs = get_peft_model(make_model(arch), peft_config(kind)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids = input_ids()
    expected = peft_logits(theirs, ids, kind)
    assert (expected - logits(make_model(arch), ids)).abs().max() > 1e-3  # not the base model

    model = make_model(arch)
    tunesmith.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)

    # ours, made fresh by tunesmith and trained (perturbed), loads in PEFT
    model = make_model(arch)
    tunesmith.add_adapter(model, ours(kind))
    perturb(model)
    mine = logits(model, ids)
    tunesmith.save_adapter(model, tmp_path / "ours")
    back = PeftModel.from_pretrained(make_model(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_logits(back, ids, kind), mine, atol=ATOL, rtol=0)


def test_saved_configs_have_peft_keys(tmp_path):
    for kind in ("ia3", "prompt", "prefix"):
        torch.manual_seed(5)
        get_peft_model(make_model("llama"), peft_config(kind)).save_pretrained(tmp_path / kind)
        model = make_model("llama")
        tunesmith.add_adapter(model, ours(kind))
        tunesmith.save_adapter(model, tmp_path / f"ours_{kind}")
        theirs = json.loads((tmp_path / kind / "adapter_config.json").read_text())
        mine = json.loads((tmp_path / f"ours_{kind}" / "adapter_config.json").read_text())
        assert set(mine) == set(theirs) - {"peft_version"}, kind
        for key in (
            "peft_type",
            "num_virtual_tokens",
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "target_modules",
            "feedforward_modules",
        ):
            a, b = mine.get(key), theirs.get(key)
            if isinstance(a, list):
                a, b = sorted(a), sorted(b)
            assert a == b, (kind, key)
        their_shapes = {
            k: v.shape for k, v in load_file(tmp_path / kind / "adapter_model.safetensors").items()
        }  # noqa: E501
        my_file = tmp_path / f"ours_{kind}" / "adapter_model.safetensors"
        assert {k: v.shape for k, v in load_file(my_file).items()} == their_shapes
