"""Bad input gets an error that names the thing and the fix."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.models import logits, lora_config, make_model, randomize_adapter
from safetensors.torch import load_file, save_file

import tunesmith
from tunesmith import AdapterError


def test_target_matching_nothing_lists_linear_modules():
    model = make_model("llama")
    with pytest.raises(AdapterError) as err:
        tunesmith.add_lora(model, lora_config(targets=["qproj"]))
    assert str(err.value) == (
        "LoRA targets ['qproj'] match no linear module of LlamaForCausalLM; linear modules are: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    )


def test_target_on_non_linear_module_says_so():
    model = make_model("llama")
    with pytest.raises(
        AdapterError,
        match=r"it matches non-linear modules model.embed_tokens "
        r"\(Embedding\)",
    ):
        tunesmith.add_lora(model, lora_config(targets=["embed_tokens"]))


def test_filters_that_leave_nothing():
    model = make_model("llama")
    with pytest.raises(AdapterError, match="after exclude/layers/modules_to_save filtering"):
        tunesmith.add_lora(model, lora_config(targets=["q_proj"], layers=[7]))


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_rank_must_be_positive(r):
    with pytest.raises(AdapterError, match=re.escape(f"r must be a positive integer, got {r!r}")):
        tunesmith.LoRAConfig(r=r)


def test_rank_larger_than_layer():
    model = make_model("llama")
    with pytest.raises(AdapterError) as err:
        tunesmith.add_lora(model, lora_config(r=20, targets=["k_proj"]))
    assert str(err.value) == (
        "r=20 is larger than model.layers.0.self_attn.k_proj allows (in_features=32, "
        "out_features=16); use r <= 16 or a rank_pattern entry for this module"
    )
    assert not hasattr(model, "tunesmith_adapters") or not tunesmith.adapter_names(model)


def test_bad_config_values():
    with pytest.raises(AdapterError, match=r'bias=\'all\' is not supported: only "none"'):
        tunesmith.LoRAConfig(bias="all")
    with pytest.raises(AdapterError, match=r"init must be one of default, gaussian, pissa"):
        tunesmith.LoRAConfig(init="olora")
    with pytest.raises(AdapterError, match=r"dropout must be in \[0, 1\), got 1.5"):
        tunesmith.LoRAConfig(dropout=1.5)
    with pytest.raises(AdapterError, match=r"rank_pattern\['v_proj'\] must be a positive"):
        tunesmith.LoRAConfig(rank_pattern={"v_proj": 0})


def _saved(tmp_path, arch="llama", **config):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(**config))
    randomize_adapter(model, "default")
    tunesmith.save_adapter(model, tmp_path)
    return tmp_path


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    folder = _saved(tmp_path, targets=["q_proj"])
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, path)
    model = make_model("llama")
    before = logits(model)
    with pytest.raises(AdapterError) as err:
        tunesmith.load_adapter(model, folder)
    assert str(err.value) == (
        f"{path}: tensor {key} has shape (4, 48) but the model expects (4, 32); the adapter was "
        "made for another base model or config"
    )
    assert not tunesmith.adapter_names(model)  # nothing half-loaded
    torch.testing.assert_close(logits(model), before)


def test_tensor_for_unknown_module(tmp_path):
    folder = _saved(tmp_path, targets=["q_proj"])
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    with pytest.raises(
        AdapterError,
        match=r"tensor base_model.model.model.layers.0.self_attn."
        r"zz_proj.lora_A.weight has no matching module",
    ):
        tunesmith.load_adapter(make_model("llama"), folder)


def test_pickle_refused_without_opt_in(tmp_path):
    folder = _saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(AdapterError) as err:
        tunesmith.load_adapter(make_model("llama"), folder)
    assert str(err.value) == (
        f"{folder} has only adapter_model.bin, a pickle file that can run code when loaded; "
        "convert it to adapter_model.safetensors, or pass allow_pickle=True if you trust it"
    )
    model = make_model("llama")
    tunesmith.load_adapter(model, folder, allow_pickle=True)
    assert tunesmith.adapter_names(model) == ["default"]


def test_missing_weights_and_missing_config(tmp_path):
    folder = _saved(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(
        AdapterError, match="has no adapter_model.safetensors; the adapter's weights are missing"
    ):
        tunesmith.load_adapter(make_model("llama"), folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match=r"no adapter_config.json in .*empty"):
        tunesmith.load_adapter(make_model("llama"), empty)
    with pytest.raises(AdapterError, match=r"adapter folder .*nowhere does not exist"):
        tunesmith.load_adapter(make_model("llama"), tmp_path / "nowhere")


def test_unsupported_peft_features_are_refused(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw["lora_bias"] = True
    path.write_text(json.dumps(raw))
    with pytest.raises(
        AdapterError,
        match=r"lora_bias=True is a PEFT feature tunesmith does not "
        r"support",
    ):
        tunesmith.load_adapter(make_model("llama"), folder)
    raw.update(lora_bias=False, peft_type="LOHA")
    path.write_text(json.dumps(raw))
    with pytest.raises(
        AdapterError,
        match="peft_type 'LOHA' is not supported; tunesmith loads LORA, PROMPT_TUNING, "
        "PREFIX_TUNING, BOTTLENECK, IA3$",
    ):
        tunesmith.load_adapter(make_model("llama"), folder)


def test_unknown_adapter_name_in_set_active():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(), name="a")
    tunesmith.add_lora(model, lora_config(), name="b")
    with pytest.raises(AdapterError) as err:
        tunesmith.set_active(model, ["a", "c"])
    assert str(err.value) == "unknown adapter 'c'; adapters on this model: a, b"
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        with tunesmith.route(model, ["a", "zz"]):
            pass


def test_duplicate_name_and_merged_guards():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(), name="a")
    with pytest.raises(AdapterError, match="an adapter named 'a' already exists"):
        tunesmith.add_lora(model, lora_config(), name="a")
    tunesmith.add_lora(model, lora_config(), name="b")
    tunesmith.set_active(model, "a")
    tunesmith.merge(model)
    with pytest.raises(
        AdapterError,
        match=r"adapter\(s\) a are merged into .*; call "
        r"unmerge\(model\) before deactivating them",
    ):
        tunesmith.set_active(model, "b")
    with pytest.raises(
        AdapterError,
        match=r"has merged adapters; call unmerge\(model\) before "
        r"route\(\)",
    ):
        with tunesmith.route(model, ["a"]):
            pass


def test_bad_modules_to_save_changes_nothing():
    model = make_model("llama")
    with pytest.raises(AdapterError) as err:
        tunesmith.add_lora(model, lora_config(modules_to_save=["score"]))
    assert str(err.value) == "modules_to_save entry 'score' matches no module of LlamaForCausalLM"
    assert not any(type(m).__module__.startswith("tunesmith") for m in model.modules())
