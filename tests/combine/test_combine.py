"""Combine: streaming merged checkpoints, adapter arithmetic and model merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers.models import input_ids, logits, lora_config, make_model, randomize_adapter
from helpers.runs import run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.adapters import load_adapter, merge_and_unload, save_adapter, set_active
from tunesmith.combine import combine_adapters, compare_logits, merge_checkpoint, merge_models
from tunesmith.combine.adapter_arithmetic import combine_adapter_folders
from tunesmith.combine.tasks import combine_tasks
from tunesmith.errors import TunesmithError
from tunesmith.methods import IA3Config, PromptTuningConfig
from tunesmith.methods.ia3.impl import add_ia3, ia3_layers
from tunesmith.methods.lora.impl import add_lora, lora_layers
from tunesmith.methods.prompt.impl import add_prompt_tuning
from tunesmith.shards import CheckpointReader, parse_size

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"


def save_base(arch: str, folder: Path, seed: int = 0) -> Path:
    make_model(arch, seed).save_pretrained(folder)
    return folder


@torch.no_grad()
def randomize_ia3(model, name: str, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in ia3_layers(model):
        if name in layer.adapters:
            v = layer.adapters[name].weight
            v.copy_(1 + 0.5 * torch.randn(v.shape, generator=gen))


def adapter_folder(
    tmp_path: Path, base: Path, kind: str, name: str = "a", seed: int = 1, b_scale: float = 1.0
) -> Path:
    """An adapter of `kind` with random weights (B scaled by `b_scale`), saved under
    tmp_path/name."""
    model = AutoModelForCausalLM.from_pretrained(base)
    if kind == "ia3":
        add_ia3(model, IA3Config(), name)
        randomize_ia3(model, name, seed)
    else:
        variant = {"lora": "lora", "rslora": "rslora", "dora": "dora"}[kind]
        add_lora(model, lora_config(variant, r=4 + seed % 3, alpha=8 + seed), name)
        randomize_adapter(model, name, seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.adapters[name].lora_B.mul_(b_scale)
    out = tmp_path / name
    save_adapter(model, out, names=[name])
    return out / name if (out / name).is_dir() else out


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
    from tunesmith.qlora_base import QuantConfig, load_quantized

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
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=20,
        num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
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
            [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "base"), str(other),
             str(tmp_path / f"out-{verb}"), verb],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        results[verb] = measured["peak"] - measured["before"]
    print(f"model {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, adapter "
          f"{adapter_bytes / 1e6:.1f} MB, peak growth {results}")  # fmt: skip
    # merge: the adapter (read and held in fp32) plus a few copies of one tensor
    assert results["merge"] < 2 * adapter_bytes + 8 * largest + 40e6, results
    # merge-models: base + two models' copies of one tensor, their task vectors and the result
    assert results["models"] < 12 * largest + 40e6, results
    assert max(results.values()) < size / 3, results


# --- adapter arithmetic ----------------------------------------------------------------------
def two_adapters(kinds=("lora", "rslora"), arch="llama"):
    """A model with adapters a (r=4, alpha=8) and b (r=8, alpha=32), random weights."""
    model = make_model(arch)
    add_lora(model, lora_config(kinds[0], r=4, alpha=8), "a")
    randomize_adapter(model, "a", 1)
    add_lora(model, lora_config(kinds[1], r=8, alpha=32), "b")
    randomize_adapter(model, "b", 2)
    return model


def effective_delta(layer, name: str) -> torch.Tensor:
    """What adapter `name` adds to the layer's weight, through the layer's merge code."""
    weight = layer.base_weight().float()
    return layer.merged_linear([name], torch.float32).weight - weight


def reference_ties(tasks, weights, density, majority="total"):
    """TIES written out entry by entry on flattened tensors (independent of the library)."""
    flat = [t.flatten() for t in tasks]
    pruned = []
    for t in flat:
        k = int(density * t.numel())
        keep = set(torch.argsort(t.abs(), descending=True)[:k].tolist())
        pruned.append(torch.tensor([v if i in keep else 0.0 for i, v in enumerate(t.tolist())]))
    weighted = [w * p for w, p in zip(weights, pruned, strict=True)]
    out = torch.zeros_like(flat[0])
    for j in range(out.numel()):
        values = [float(x[j]) for x in weighted]
        votes = sum(values) if majority == "total" else sum((v > 0) - (v < 0) for v in values)
        sign = 1.0 if votes >= 0 else -1.0
        agree = [v for v in values if v != 0 and (v > 0) == (sign > 0)]
        out[j] = sum(agree) / max(len(agree), 1)
    return out.reshape(tasks[0].shape)


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
                                    "magnitude_prune"])  # fmt: skip
def test_every_method_matches_a_direct_computation_on_delta_w(method):
    kinds = ("lora", "lora") if method == "linear" else ("lora", "rslora")
    model = two_adapters(kinds)
    if method == "linear":  # linear needs equal ranks
        model = make_model("llama")
        add_lora(model, lora_config(r=4, alpha=8), "a")
        randomize_adapter(model, "a", 1)
        add_lora(model, lora_config(r=4, alpha=32), "b")
        randomize_adapter(model, "b", 2)
    weights = [0.7, -0.4]
    result = combine_adapters(model, ["a", "b"], weights, method, "c", rank=32, density=0.3, seed=5)
    generator = torch.Generator().manual_seed(5)
    for module_name, layer in lora_layers(model):
        a, b = layer.adapters["a"], layer.adapters["b"]
        deltas = [effective_delta(layer, "a"), effective_delta(layer, "b")]
        if method == "linear":
            sa, sb = float(a.scaling), float(b.scaling)
            left = (0.7 * sa) ** 0.5 * a.lora_B + (0.4 * sb) ** 0.5 * b.lora_B
            right = (0.7 * sa) ** 0.5 * a.lora_A - (0.4 * sb) ** 0.5 * b.lora_A
            expected = left @ right
        elif method in ("cat", "svd"):
            expected = 0.7 * deltas[0] - 0.4 * deltas[1]
        elif method == "ties":
            expected = reference_ties(deltas, weights, 0.3)
        elif method == "magnitude_prune":
            expected = sum(
                w * reference_ties([d], [1.0], 0.3) for w, d in zip(weights, deltas, strict=True)
            )
        else:  # DARE: the same draws as the library's (one (2 × numel) draw per module)
            draw = torch.rand((2, deltas[0].numel()), generator=generator) < 0.3
            kept = [d * k.reshape(d.shape) / 0.3 for d, k in zip(deltas, draw, strict=True)]
            if method == "dare_linear":
                expected = 0.7 * kept[0] - 0.4 * kept[1]
            else:
                expected = reference_ties(kept, weights, 1.0)
        # rank 32 = the layer's full rank: the SVD re-factorisation is exact
        got = layer.adapters["c"].delta_weight()
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-5, msg=module_name)
        full = min(32, *layer.adapters["a"].lora_B.shape[:1], layer.in_features)
        expected_rank = {"cat": 12, "linear": 4, "svd": 12}.get(method, full)
        assert layer.adapters["c"].r == expected_rank
    assert min(result.kept.values()) > 1 - 1e-6


def test_svd_truncates_to_the_best_low_rank_approximation():
    model = two_adapters()
    result = combine_adapters(model, ["a", "b"], [1.0, 1.0], "svd", "c", rank=6)
    for module_name, layer in lora_layers(model):
        target = effective_delta(layer, "a") + effective_delta(layer, "b")
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
        torch.testing.assert_close(layer.adapters["c"].delta_weight(), best, rtol=0, atol=1e-4)
        assert layer.adapters["c"].r == 6
        assert result.kept[module_name] == pytest.approx(float((s[:6] ** 2).sum() / (s**2).sum()))


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_equal_stacking(method):
    """Weights 1, 1: the combined adapter alone gives the logits of both adapters stacked."""
    model = two_adapters(("rslora", "lora"), arch="gpt2")
    set_active(model, ["a", "b"])
    stacked = logits(model)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], method, "c", rank=12)
    assert tunesmith.active_adapters(model) == ["a", "b"]  # unchanged
    set_active(model, "c")
    torch.testing.assert_close(logits(model), stacked, rtol=0, atol=1e-5)


IDENTITY_CASES = [
    (kind, method)
    for kind in ("lora", "rslora", "dora")
    for method in ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    if not (kind == "dora" and method in ("linear", "cat"))  # refused: test_combine_errors
]


@pytest.mark.parametrize(("kind", "method"), IDENTITY_CASES)
def test_one_adapter_with_weight_one_is_the_identity(kind, method):
    model = make_model("qwen2")
    add_lora(model, lora_config(kind), "a")
    randomize_adapter(model, "a")
    expected = logits(model)
    combine_adapters(model, ["a"], [1.0], method, "c", rank=32, density=1.0)
    set_active(model, "c")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_dora_and_rslora_combine_on_their_effective_delta_w():
    model = two_adapters(("dora", "rslora"))
    weights = [0.6, 0.5]
    reference = make_model("llama")
    with torch.no_grad():
        for module_name, layer in lora_layers(model):
            delta = sum(w * effective_delta(layer, n) for n, w in zip("ab", weights, strict=True))
            reference.get_submodule(module_name).weight.add_(delta)
    combine_adapters(model, ["a", "b"], weights, "svd", "c", rank=32)
    set_active(model, "c")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


def test_cat_and_svd_agree_with_peft_for_plain_lora(tmp_path):
    """PEFT's add_weighted_adapter is the oracle where it is right: plain LoRA, different ranks
    and alphas. (For rsLoRA PEFT applies alpha/r to the result; measured relative logit error
    0.38 against the exact ΔW sum, so it is not compared.)"""
    peft = pytest.importorskip("peft")
    model = two_adapters(("lora", "lora"))
    save_adapter(model, tmp_path, names=["a", "b"])
    peft_model = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "a", "a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    for method in ("cat", "svd"):
        combine_adapters(model, ["a", "b"], [0.7, 0.3], method, method, rank=12)
        extra = {"svd_rank": 12} if method == "svd" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], method, method, **extra)
        set_active(model, method)
        peft_model.set_adapter(method)
        torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=1e-4)


def test_combined_adapter_is_an_ordinary_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = two_adapters(("dora", "rslora"))
    combine_adapters(model, ["a", "b"], [0.5, 0.5], "ties", "c", rank=6, density=0.5)
    set_active(model, "c")
    expected = logits(model)
    save_adapter(model, tmp_path, names=["c"])
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (6, 6, False)
    fresh = make_model("llama")
    load_adapter(fresh, tmp_path / "c")
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-6)
    peft_model = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "c")
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(merge_and_unload(fresh)), expected, rtol=0, atol=1e-5)


def test_combine_adapter_folders_with_different_ranks_and_dora(tmp_path):
    base = save_base("llama", tmp_path / "base")
    a = adapter_folder(tmp_path, base, "dora", "a", seed=1)  # r=5
    b = adapter_folder(tmp_path, base, "rslora", "b", seed=2)  # r=6
    result = combine_adapter_folders(
        [str(a), str(b)], [0.7, 0.3], tmp_path / "c", "svd", str(base), rank=11,
    )  # fmt: skip
    assert result.config.r == 11
    model = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(model, a, name="a")
    load_adapter(model, b, name="b")
    reference = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for module_name, layer in lora_layers(model):
            delta = 0.7 * effective_delta(layer, "a") + 0.3 * effective_delta(layer, "b")
            reference.get_submodule(module_name).weight.add_(delta)
    combined = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(combined, tmp_path / "c")
    # rank 11 cannot hold DoRA's full-rank ΔW exactly; the loss is what `kept` reports
    diff = (logits(combined) - logits(reference)).abs().max()
    assert 0 < min(result.kept.values()) < 1
    assert diff < 0.5
    full = combine_adapter_folders([str(a), str(b)], [0.7, 0.3], tmp_path / "d", "svd",
                                   str(base), rank=64)  # fmt: skip
    combined = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(combined, tmp_path / "d")
    torch.testing.assert_close(logits(combined), logits(reference), rtol=0, atol=1e-5)
    assert min(full.kept.values()) > 1 - 1e-6


def test_combine_errors():
    model = two_adapters(("lora", "dora"))
    add_lora(model, lora_config(r=8), "c")

    def error(*args, **kwargs) -> str:
        with pytest.raises(TunesmithError) as err:
            combine_adapters(model, *args, **kwargs)
        return str(err.value)

    assert error(["a", "c"], [1, 1], "linear") == (
        "method 'linear' needs adapters of one rank; a, c have ranks 4, 8; use 'cat' (exact) "
        "or 'svd'"
    )
    assert error(["a", "b"], [1, 1], "cat").startswith(
        "adapter 'b' is DoRA, whose ΔW = k(W + sBA) − W is not a product of its factors; "
        "method 'cat' cannot combine it"
    )
    assert error(["a", "b"], [1], "svd") == "2 adapters but 1 weights; give one weight each"
    assert error(["a", "zz"], [1, 1], "svd") == (
        "unknown adapter 'zz'; adapters on this model: a, b, c"
    )
    assert error(["a"], [1], "mean") == (
        "method 'mean' is not one of linear, cat, svd, ties, dare_linear, dare_ties, "
        "magnitude_prune"
    )
    assert error(["a"], [1], "ties", density=0) == "density must be in (0, 1], got 0"
    assert error(["a"], [1], "svd", rank=0) == "rank must be a positive integer, got 0"
    assert error(["a"], [1], "svd", name="b") == (
        "an adapter named 'b' already exists; pick another name"
    )
    other = make_model("llama")
    add_ia3(other, IA3Config(), "x")
    with pytest.raises(TunesmithError, match="adapter 'x' is ia3; combine_adapters combines LoRA"):
        combine_adapters(other, ["x"], [1.0], "svd")
    saved = make_model("llama")
    add_lora(saved, lora_config(modules_to_save=["lm_head"]), "s")
    with pytest.raises(TunesmithError, match="trains a full copy of lm_head"):
        combine_adapters(saved, ["s"], [1.0], "svd")


def test_task_vector_methods():
    tasks = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -2.0, 0.25, 4.0])]
    # magnitude prune at density 0.5 keeps each task's two largest entries
    got = combine_tasks(tasks, [1.0, 1.0], "magnitude_prune", 0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0, 0.0, 2.0]))
    # ties: sign of the sum elects (+, -, +, +); the disjoint mean of agreeing entries
    got = combine_tasks(tasks, [1.0, 1.0], "ties", 1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, -1.5, 0.375, 4.0]))
    got = combine_tasks(tasks, [1.0, 1.0], "ties", 1.0, majority_sign="frequency")
    torch.testing.assert_close(got, torch.tensor([3.0, -1.5, 0.375, 4.0]))
    # DARE keeps the expectation
    big = [torch.ones(200_000)]
    mean = combine_tasks(big, [1.0], "dare_linear", 0.25, torch.Generator().manual_seed(0)).mean()
    assert abs(float(mean) - 1.0) < 0.02


# --- model merging ---------------------------------------------------------------------------
def tuned(base: Path, folder: Path, seed: int, scale: float = 0.05) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {n: reader.read(n) for n in reader.names}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear",
                                    "magnitude_prune"])  # fmt: skip
def test_merging_identical_models_returns_the_input(tmp_path, method):
    base = save_base("llama", tmp_path / "base")
    x = tuned(base, tmp_path / "x", seed=1)
    weights = [0.5, 0.5] if method in ("task_arithmetic", "dare_linear", "magnitude_prune") else [
        1.0, 1.0]  # fmt: skip
    merge_models(str(base), [str(x), str(x)], tmp_path / "m", method, weights, density=1.0)
    expected, got = tensors_of(x), tensors_of(tmp_path / "m")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    merge_models(str(base), [str(base)], tmp_path / "b", method, density=0.3)
    for key, value in tensors_of(base).items():
        assert torch.equal(tensors_of(tmp_path / "b")[key], value), key


def test_model_merging_matches_task_vector_formulas(tmp_path):
    base = save_base("gpt2", tmp_path / "base")
    x, y = tuned(base, tmp_path / "x", 1), tuned(base, tmp_path / "y", 2)
    b, tx, ty = tensors_of(base), tensors_of(x), tensors_of(y)
    merge_models(str(base), [str(x), str(y)], tmp_path / "ta", "task_arithmetic", [0.3, 0.6])
    merge_models(str(base), [str(x), str(y)], tmp_path / "ties", "ties", [1.0, 0.5], density=0.4)
    ta, ties = tensors_of(tmp_path / "ta"), tensors_of(tmp_path / "ties")
    key = "transformer.h.0.attn.c_attn.weight"
    expected = b[key] + 0.3 * (tx[key] - b[key]) + 0.6 * (ty[key] - b[key])
    torch.testing.assert_close(ta[key], expected, rtol=0, atol=1e-6)
    small = "transformer.h.1.ln_1.weight"
    expected = b[small] + reference_ties(
        [tx[small] - b[small], ty[small] - b[small]], [1.0, 0.5], 0.4
    )
    torch.testing.assert_close(ties[small], expected, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ties")
    assert torch.isfinite(logits(merged, input_ids())).all()


def test_model_merging_mismatch_errors(tmp_path):
    from transformers import LlamaConfig

    base = save_base("llama", tmp_path / "base")
    gpt2 = save_base("gpt2", tmp_path / "gpt2")
    wider = LlamaConfig(**{**make_model("llama").config.to_dict(), "intermediate_size": 48})
    AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wider")

    def error(*models) -> str:
        with pytest.raises(TunesmithError) as err:
            merge_models(str(base), [str(m) for m in models], tmp_path / "m")
        return str(err.value)

    assert error(gpt2) == (
        f"--model {gpt2} (model 1): model_type is 'gpt2' but the base {base} has 'llama'; merge "
        "models of one architecture"
    )
    assert error(base, tmp_path / "wider") == (
        f"--model {tmp_path / 'wider'} (model 2): tensor model.layers.0.mlp.down_proj.weight has "
        "shape [32, 48] but the base has [32, 64]; the models differ in structure"
    )
    assert not (tmp_path / "m").exists()
    with pytest.raises(TunesmithError, match="--weights: 1 models but 2 weights"):
        merge_models(str(base), [str(base)], tmp_path / "m", weights=[1, 2])


# --- the command line ------------------------------------------------------------------------


def test_cli_merge_combine_and_merge_models(tmp_path):
    a = adapter_folder(tmp_path, BUNDLED, "lora", "a", seed=1, b_scale=0.1)
    b = adapter_folder(tmp_path, BUNDLED, "rslora", "b", seed=2, b_scale=0.1)
    run = run_cli("merge", "--adapter", str(a), "--base", str(BUNDLED), "--out",
                  str(tmp_path / "m"), "--verify", "--max-shard-size", "6MB")  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'm'}: ")
    diff = float(lines[-1].split(": ")[1])
    assert lines[-1].startswith("max |logit difference| vs base + adapter: ") and diff < 1e-4
    run = run_cli("combine", "--adapter", str(a), "--adapter", str(b), "--weights", "0.7,0.3",
                  "--method", "ties", "--density", "0.5", "--rank", "8", "--base", str(BUNDLED),
                  "--out", str(tmp_path / "c"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {tmp_path / 'c'}: ties of 2 adapter(s), rank 8; ")
    assert (tmp_path / "c" / "adapter_config.json").is_file()
    run = run_cli("merge-models", "--base", str(BUNDLED), "--model", str(tmp_path / "m"),
                  "--model", str(tmp_path / "m"), "--method", "ties", "--out",
                  str(tmp_path / "mm"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    generated = run_cli("generate", "--model", str(tmp_path / "mm"), "--raw", "hello",
                        "--max-new-tokens", "4")  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    run = run_cli("combine", "--adapter", str(a), "--weights", "1,2", "--out", str(tmp_path / "x"))
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --weights: 2 weights for 1 inputs; give one each"
