"""tunesmith merge (`combine/merge.py`): streamed merged checkpoints equal base + adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.adapters import BUNDLED, ROOT, adapter_folder, randomize_ia3, save_base
from helpers.models import llama_config, lora_config, make_model, randomize_adapter
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tunesmith.adapters import load_adapter, merge_and_unload, save_adapter
from tunesmith.combine import compare_logits, merge_checkpoint
from tunesmith.errors import TunesmithError
from tunesmith.methods import IA3Config, PromptTuningConfig
from tunesmith.methods.ia3.impl import add_ia3
from tunesmith.methods.lora.impl import add_lora
from tunesmith.methods.prompt.impl import add_prompt_tuning
from tunesmith.shards import CheckpointReader, parse_size


# --- tunesmith merge -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "ia3"])
def test_merged_checkpoint_equals_base_plus_adapter(tmp_path, arch, kind):
    base = save_base(arch, tmp_path / "base")
    adapter = adapter_folder(tmp_path, base, kind)
    report = merge_checkpoint(str(base), [str(adapter)], tmp_path / "merged", max_shard_size="40KB")
    assert len(report.files) > 1  # sharded, with an index
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == report.files
    diff = compare_logits(str(base), [str(adapter)], tmp_path / "merged")
    assert diff < 1e-4, diff
    # the same as merging in memory
    model = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(model, adapter)
    expected = merge_and_unload(model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5, msg=key)


def test_merge_stacked_adapters_and_modules_to_save(tmp_path):
    base = save_base("llama", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    add_ia3(model, IA3Config(targets=["down_proj"], feedforward=["down_proj"]), "b")
    randomize_ia3(model, "b")
    save_adapter(model, tmp_path / "ia3", names=["b"])
    model = AutoModelForCausalLM.from_pretrained(base)
    add_lora(model, lora_config(targets=["q_proj"], modules_to_save=["lm_head"]), "c")
    randomize_adapter(model, "c")
    with torch.no_grad():
        model.lm_head.modules_to_save["c"].weight.mul_(1.5)
    save_adapter(model, tmp_path / "saved", names=["c"])
    # a LoRA (q_proj, with its own lm_head) and an IA3 (down_proj) stacked
    lora_q = tmp_path / "saved" / "c"
    merge_checkpoint(str(base), [str(lora_q), str(tmp_path / "ia3" / "b")], tmp_path / "m1")
    diff = compare_logits(str(base), [str(lora_q), str(tmp_path / "ia3" / "b")], tmp_path / "m1")
    assert diff < 1e-4, diff
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1")
    torch.testing.assert_close(merged.lm_head.weight, model.lm_head.modules_to_save["c"].weight)


def test_merge_refuses_a_copy_of_a_tied_head(tmp_path):
    base = save_base("gpt2", tmp_path / "base")  # GPT-2 ties lm_head to wte
    model = AutoModelForCausalLM.from_pretrained(base)
    add_lora(model, lora_config(modules_to_save=["lm_head"]), "c")
    save_adapter(model, tmp_path / "a", names=["c"])
    with pytest.raises(TunesmithError) as err:
        merge_checkpoint(str(base), [str(tmp_path / "a" / "c")], tmp_path / "m")
    assert str(err.value) == (
        "--adapter: the adapter trains its own copy of lm_head (modules_to_save), which the "
        "base ties to the embeddings; a merged checkpoint cannot untie them. Keep the adapter "
        "separate, or train without lm_head in modules_to_save"
    )


def test_merge_qlora_adapter_onto_its_dequantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tunesmith.quantized.bnb import QuantConfig, load_quantized

    base = save_base("llama", tmp_path / "base")
    model = load_quantized(str(base), QuantConfig("nf4"))
    add_lora(model, lora_config(), "a")
    randomize_adapter(model, "a")
    save_adapter(model, tmp_path / "adapter", names=["a"])
    adapter = str(tmp_path / "adapter" / "a")
    quant = QuantConfig("nf4")
    report = merge_checkpoint(str(base), [adapter], tmp_path / "m", quantized_base="nf4")
    assert report.quantized_base == "nf4"
    assert compare_logits(str(base), [adapter], tmp_path / "m", quant) < 1e-4
    # Merging the same adapter into the 16-bit weights is a different model.
    merge_checkpoint(str(base), [adapter], tmp_path / "m16", quantized_base="none")
    assert compare_logits(str(base), [adapter], tmp_path / "m16", quant) > 1e-3


def test_merge_detects_a_qlora_run(tmp_path):
    from tunesmith.combine.merge import resolve_quantized_base

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(
        "model: {path: x, dtype: auto}\nmethod: {name: qlora, quant: fp4, blocksize: 128}\n"
    )
    quant, as_stored = resolve_quantized_base("auto", [str(run / "adapter")])
    assert (quant.quant, quant.blocksize, quant.double_quant, as_stored) == ("fp4", 128, True, True)
    (run / "config.yaml").write_text("method: {name: lora}\n")
    assert resolve_quantized_base("auto", [str(run / "adapter")]) == (None, False)


def test_merge_dtype_tokenizer_and_chat_template(tmp_path):
    adapter = adapter_folder(tmp_path, BUNDLED, "lora")
    report = merge_checkpoint(str(BUNDLED), [str(adapter)], tmp_path / "m", dtype="bf16")
    assert report.dtype == "bfloat16"
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tokenizer.chat_template == original.chat_template
    assert tokenizer("hello world").input_ids == original("hello world").input_ids
    assert (tmp_path / "m" / "generation_config.json").is_file()


def test_merge_fp16_overflow_is_refused(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(1e6)
    model.save_pretrained(tmp_path / "base")
    adapter = adapter_folder(tmp_path, tmp_path / "base", "lora")
    with pytest.raises(TunesmithError) as err:
        merge_checkpoint(str(tmp_path / "base"), [str(adapter)], tmp_path / "m", dtype="fp16")
    assert str(err.value) == (
        "tensor model.norm.weight overflows torch.float16 (largest |value| 1e+06); "
        "use --dtype bf16 or fp32"
    )
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_merge_dry_run_overwrite_and_interrupt(tmp_path, monkeypatch):
    base = save_base("llama", tmp_path / "base")
    adapter = adapter_folder(tmp_path, base, "lora")
    report = merge_checkpoint(str(base), [str(adapter)], tmp_path / "m", dry_run=True)
    assert report.dry_run and not (tmp_path / "m").exists()
    assert report.lines()[0].startswith(f"would write {tmp_path / 'm'}: 21 tensors (14 modules")
    merge_checkpoint(str(base), [str(adapter)], tmp_path / "m")
    with pytest.raises(TunesmithError, match="already exists; choose a new path or pass"):
        merge_checkpoint(str(base), [str(adapter)], tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    from tunesmith.combine import merge as merge_module

    calls = {"n": 0}
    original = merge_module._Resolver.tensor

    def failing(self, key):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("No space left on device")
        return original(self, key)

    monkeypatch.setattr(merge_module._Resolver, "tensor", failing)
    with pytest.raises(
        TunesmithError,
        match=rf"^{tmp_path / 'm'}: no space left on the disk while writing it \(.* free in "
        rf"{tmp_path}(/m)?; it needs about [0-9.]+ KB\); nothing half-written was kept",
    ):
        merge_checkpoint(str(base), [str(adapter)], tmp_path / "m", overwrite=True)
    # the earlier output is intact and no partial folder is left behind
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "m"]


def test_merge_bad_input(tmp_path):
    base = save_base("llama", tmp_path / "base")
    other = save_base("gpt2", tmp_path / "other")
    adapter = adapter_folder(tmp_path, other, "lora")
    with pytest.raises(TunesmithError) as err:
        merge_checkpoint(str(base), [str(adapter)], tmp_path / "m")
    assert str(err.value) == (
        f"--adapter {adapter}: LoRA targets ['c_attn', 'c_fc', 'c_proj'] match no linear module "
        "of LlamaForCausalLM; linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj, lm_head"
    )
    model = make_model("llama")
    add_prompt_tuning(model, PromptTuningConfig(4, init="random"), "p")
    save_adapter(model, tmp_path / "p", names=["p"])
    with pytest.raises(TunesmithError) as err:
        merge_checkpoint(str(base), [str(tmp_path / "p" / "p")], tmp_path / "m")
    assert str(err.value) == (
        f"--adapter {tmp_path / 'p' / 'p'}: adapter 'p' (prompt) cannot be merged: it adds "
        "virtual input tokens, not weights; merge LoRA or IA3 adapters only, and keep this one "
        "loaded at inference"
    )
    with pytest.raises(TunesmithError, match="--max-shard-size: '5 parsecs' is not a size"):
        merge_checkpoint(str(base), [str(adapter)], tmp_path / "m", max_shard_size="5 parsecs")
    with pytest.raises(TunesmithError, match="--dtype: 'int4' is not one of auto, bf16"):
        merge_checkpoint(str(base), [str(adapter)], tmp_path / "m", dtype="int4")
    with pytest.raises(TunesmithError, match="--base: /nonexistent: no such folder"):
        merge_checkpoint("/nonexistent", [str(adapter)], tmp_path / "m")
    assert parse_size("2GiB") == 2**31 and parse_size("500MB") == 500 * 10**6


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import psutil
    from tunesmith.combine import merge_checkpoint, merge_models
    base, adapter, out, verb = sys.argv[1:5]

    def peak_rss():  # VmHWM: this process's peak resident memory (not inherited from the parent)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    # a dry run first: it imports the modelling code and builds the skeleton (not measured)
    if verb == "merge":
        merge_checkpoint(base, [adapter], out, dry_run=True)
    else:
        merge_models(base, [adapter, adapter], out, dry_run=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident size
    before = psutil.Process().memory_info().rss
    if verb == "merge":
        merge_checkpoint(base, [adapter], out, max_shard_size="64MB")
    else:
        merge_models(base, [adapter, adapter], out, method="ties", weights=[0.5, 0.5])
    print(json.dumps({"before": before, "peak": peak_rss()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_merge_memory_stays_near_one_tensor(tmp_path):
    """A 340 MB model merges (and model-merges) with peak host memory far below its size."""

    config = llama_config(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=20,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="100MB")
    size = CheckpointReader(tmp_path / "base").nbytes()
    largest = max(p.numel() * 4 for p in model.parameters())
    add_lora(model, lora_config(r=16))
    randomize_adapter(model, "default")
    save_adapter(model, tmp_path / "adapter")
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    del model
    assert size > 300e6
    results = {}
    for verb, other in (("merge", tmp_path / "adapter"), ("models", tmp_path / "base")):
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_SCRIPT,
                str(tmp_path / "base"),
                str(other),
                str(tmp_path / f"out-{verb}"),
                verb,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        results[verb] = measured["peak"] - measured["before"]
    print(
        f"model {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, adapter "
        f"{adapter_bytes / 1e6:.1f} MB, peak growth {results}"
    )
    # merge: the adapter (read and held in fp32) plus a few copies of one tensor
    assert results["merge"] < 2 * adapter_bytes + 8 * largest + 40e6, results
    # merge-models: base + two models' copies of one tensor, their task vectors and the result
    assert results["models"] < 12 * largest + 40e6, results
    assert max(results.values()) < size / 3, results
