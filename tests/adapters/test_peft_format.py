"""PEFT is the oracle: adapters made by either side give the same logits on the other."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers.models import VARIANTS, logits, lora_config, make_model, randomize_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import tunesmith
from tunesmith.methods.lora.impl import PEFT_LORA_DEFAULTS, lora_layers

ATOL = 1e-5


def peft_adapter(arch: str, variant: str, directory, **overrides) -> torch.Tensor:
    """Make a PEFT adapter with non-trivial weights, save it, return its logits."""
    fields = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **VARIANTS[variant],
    )
    fields.update(overrides)
    model = get_peft_model(make_model(arch), LoraConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    model.save_pretrained(directory)
    return logits(model)


def test_we_load_what_peft_saves(arch, variant, tmp_path):
    expected = peft_adapter(arch, variant, tmp_path)
    model = make_model(arch)
    tunesmith.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    assert tunesmith.trainable_parameters(model).trainable == 0  # loaded for inference


def test_peft_loads_what_we_save(arch, variant, tmp_path):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(variant))
    randomize_adapter(model, "default")
    expected = logits(model)
    tunesmith.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=0)


def test_saved_files_match_peft_byte_layout(tmp_path):
    peft_adapter(
        "llama",
        "dora",
        tmp_path / "peft",
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
    )
    model = make_model("llama")
    config = lora_config("dora", targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    tunesmith.add_lora(model, config)
    tunesmith.save_adapter(model, tmp_path / "ours")
    ours_cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert set(ours_cfg) | {"peft_version"} == set(peft_cfg)
    assert set(ours_cfg) == set(PEFT_LORA_DEFAULTS)
    for key in ("r", "lora_alpha", "rank_pattern", "use_dora", "peft_type", "modules_to_save"):
        assert ours_cfg[key] == peft_cfg[key], key
    assert set(ours_cfg["target_modules"]) == set(peft_cfg["target_modules"])  # PEFT: a set
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector" in ours


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_rank_pattern_and_modules_to_save(direction, tmp_path):
    if direction == "peft_to_ours":
        expected = peft_adapter(
            "llama",
            "lora",
            tmp_path,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            modules_to_save=["lm_head"],
        )
        model = make_model("llama")
        tunesmith.load_adapter(model, tmp_path)
        assert model.model.layers[0].self_attn.v_proj.adapters["default"].r == 2
        torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    else:
        model = make_model("llama")
        config = lora_config(
            targets=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            modules_to_save=["lm_head"],
        )
        tunesmith.add_lora(model, config)
        randomize_adapter(model, "default")
        with torch.no_grad():
            model.lm_head.modules_to_save["default"].weight.mul_(1.3)
        expected = logits(model)
        tunesmith.save_adapter(model, tmp_path)
        theirs = PeftModel.from_pretrained(make_model("llama"), tmp_path)
        torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=0)


def test_several_adapters_in_subfolders_both_ways(tmp_path):
    model = make_model("mistral")
    tunesmith.add_lora(model, lora_config(), name="default")
    tunesmith.add_lora(model, lora_config("dora", targets=["q_proj", "k_proj"]), name="math")
    randomize_adapter(model, "default", seed=3)
    randomize_adapter(model, "math", seed=4)
    expected = {}
    for name in ("default", "math"):
        tunesmith.set_active(model, name)
        expected[name] = logits(model)
    folders = tunesmith.save_adapter(model, tmp_path / "ours")
    assert folders == [tmp_path / "ours", tmp_path / "ours" / "math"]

    theirs = PeftModel.from_pretrained(make_model("mistral"), tmp_path / "ours")
    theirs.load_adapter(tmp_path / "ours" / "math", adapter_name="math")
    for name in ("default", "math"):
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs), expected[name], atol=ATOL, rtol=0)

    theirs.save_pretrained(tmp_path / "peft")  # PEFT writes math/ as a sub-folder too
    back = make_model("mistral")
    tunesmith.load_adapter(back, tmp_path / "peft", name="default")
    tunesmith.load_adapter(back, tmp_path / "peft", name="math")
    for name in ("default", "math"):
        tunesmith.set_active(back, name)
        torch.testing.assert_close(logits(back), expected[name], atol=ATOL, rtol=0)


def test_save_load_round_trip_pissa(tmp_path):
    model = make_model("qwen2")
    tunesmith.add_lora(model, lora_config(init="pissa"))
    randomize_adapter(model, "default")  # stands in for training
    expected = logits(model)
    tunesmith.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == (
        "pissa"
    )
    fresh = make_model("qwen2")  # the clean base: loading re-derives PiSSA's residual
    tunesmith.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=ATOL, rtol=0)
    theirs = PeftModel.from_pretrained(make_model("qwen2"), tmp_path)  # PEFT does the same
    torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=0)


def test_hot_swap_replaces_weights_in_place(tmp_path):
    for seed, folder in ((5, "a"), (6, "b")):
        model = make_model("llama")
        tunesmith.add_lora(model, lora_config(alpha=16 if folder == "b" else 8))
        randomize_adapter(model, "default", seed=seed)
        tunesmith.save_adapter(model, tmp_path / folder)
    fresh_b = make_model("llama")
    tunesmith.load_adapter(fresh_b, tmp_path / "b")
    expected_b = logits(fresh_b)

    model = make_model("llama")
    tunesmith.load_adapter(model, tmp_path / "a")
    modules_before = [(n, id(m)) for n, m in model.named_modules()]
    params_before = [(n, id(p)) for n, p in model.named_parameters()]
    tunesmith.load_adapter(model, tmp_path / "b")  # same name: hot swap
    assert [(n, id(m)) for n, m in model.named_modules()] == modules_before
    assert [(n, id(p)) for n, p in model.named_parameters()] == params_before
    torch.testing.assert_close(logits(model), expected_b, atol=ATOL, rtol=0)


def test_hot_swap_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    for seed, folder, alpha in ((5, "a", 8), (6, "b", 16)):
        model = make_model("llama")
        tunesmith.add_lora(model, lora_config(alpha=alpha))
        randomize_adapter(model, "default", seed=seed)
        tunesmith.save_adapter(model, tmp_path / folder)
    reference = make_model("llama")
    tunesmith.load_adapter(reference, tmp_path / "b")
    model = make_model("llama")
    tunesmith.load_adapter(model, tmp_path / "a")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    logits(compiled)
    assert counters["stats"]["unique_graphs"] == 1
    tunesmith.load_adapter(model, tmp_path / "b")  # other weights and alpha, same rank
    torch.testing.assert_close(logits(compiled), logits(reference), atol=ATOL, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_hot_swap_to_another_rank(tmp_path):
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(r=8, targets=["q_proj", "v_proj"]))
    randomize_adapter(model, "default")
    expected = logits(model)
    tunesmith.save_adapter(model, tmp_path)
    target = make_model("llama")
    tunesmith.add_lora(target, lora_config(r=2, targets=["q_proj", "v_proj"]))
    modules_before = [n for n, _ in target.named_modules()]
    tunesmith.load_adapter(target, tmp_path)
    assert [n for n, _ in target.named_modules()] == modules_before
    assert target.model.layers[0].self_attn.q_proj.adapters["default"].r == 8
    torch.testing.assert_close(logits(target), expected, atol=ATOL, rtol=0)


def test_unknown_config_keys_warn(tmp_path):
    peft_adapter("llama", "lora", tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw["some_future_option"] = 3
    path.write_text(json.dumps(raw))
    model = make_model("llama")
    with pytest.warns(UserWarning, match="ignoring keys unknown to tunesmith: some_future_option"):
        tunesmith.load_adapter(model, tmp_path)
    assert len(list(lora_layers(model))) == 14


def test_peft_version_is_the_tested_one():
    assert peft.__version__.startswith("0.21")
