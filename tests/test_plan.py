"""The memory planner: the traced peak of a training step against the same step run for real
(tensor accounting on CPU), the FLOPs model, the command and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tunesmith.config import FullMethod, IA3Method, LoRAMethod, QLoRAMethod, TrainSection
from tunesmith.errors import TunesmithError
from tunesmith.plan.gpus import gpu
from tunesmith.plan.run import flops_per_token
from tunesmith.plan.trace import MemoryTracker, trace_step
from tunesmith.train.loss import model_loss_sum

CONFIG = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
METHODS = {
    "lora": LoRAMethod(r=8, alpha=16, dropout=0.0, targets="all-linear"),
    "full": FullMethod(),
    "ia3": IA3Method(),
    "qlora": QLoRAMethod(r=8, alpha=16, dropout=0.0, targets="all-linear"),
}


def measured_peak(method, train, seq, batch) -> int:
    """The same two steps on real CPU tensors, counted by the same tensor accounting."""
    from tunesmith.adapters import add_adapter

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    full = method.name == "full"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if method.name == "qlora":
        from tunesmith.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(method.quant, compute_dtype=torch.float32))
    if not full:
        add_adapter(model, method.to_adapter_config())
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    tracker = MemoryTracker()
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    tracker.seed(storages)
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    with tracker:
        for step in range(2):
            if step == 1:
                tracker.reset_peak()
            total, count = model_loss_sum(model, {"input_ids": ids, "labels": ids})
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_traced_peak_matches_a_real_step(method, checkpointing):
    train = TrainSection(lr=1e-4, gradient_checkpointing=checkpointing)
    planned = trace_step(
        LlamaConfig(**CONFIG), METHODS[method], train, 128, 2, torch.float32, attention="eager"
    )
    real = measured_peak(METHODS[method], train, 128, 2)
    assert abs(planned.peak_bytes / real - 1) < 0.10, (planned.peak_bytes, real)
    parts = (planned.weights_bytes + planned.trainable_bytes + planned.grads_bytes
             + planned.optimizer_bytes + planned.activations_bytes)  # fmt: skip
    assert parts == planned.peak_bytes
    if method == "full":
        # AdamW: m and v in fp32, and a 4-byte step counter per parameter tensor
        assert 0 < planned.optimizer_bytes - 2 * planned.trainable_bytes < 1024
        assert planned.weights_bytes < 1024  # only buffers (rotary frequencies) are frozen


def test_checkpointing_and_fused_attention_lower_the_peak():
    config = LlamaConfig(**CONFIG)
    lora = METHODS["lora"]
    on = trace_step(config, lora, TrainSection(gradient_checkpointing=True), 256, 4, torch.bfloat16)
    off = trace_step(config, lora, TrainSection(gradient_checkpointing=False), 256, 4,
                     torch.bfloat16)  # fmt: skip
    eager = trace_step(config, lora, TrainSection(gradient_checkpointing=False), 256, 4,
                       torch.bfloat16, attention="eager")  # fmt: skip
    assert on.activations_bytes < off.activations_bytes < eager.activations_bytes
    assert on.weights_bytes == off.weights_bytes
    assert on.trainable_params == off.trainable_params == 3 * (
        8 * (128 + 128) + 8 * (128 + 64) * 2 + 8 * (128 + 128) + 2 * 8 * (128 + 352)
        + 8 * (352 + 128)
    )  # fmt: skip


def test_flops_per_token():
    config = LlamaConfig(**CONFIG)
    n = 3 * (128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 352) + 128 * 1000
    attention = 2 * 3 * 64 * 128
    assert flops_per_token(config, "full", 64, False) == 6 * n + 3 * attention
    assert flops_per_token(config, "lora", 64, False) == 4 * n + 3 * attention
    assert flops_per_token(config, "lora", 64, True) == 6 * n + 4 * attention


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_cli_plan(tmp_path):
    LlamaConfig(**CONFIG).save_pretrained(tmp_path / "m")
    run_config = tmp_path / "run.yaml"
    run_config.write_text(
        f"model:\n  path: {tmp_path / 'm'}\nmethod:\n  name: lora\n  r: 8\n"
        "data:\n  datasets:\n    - path: x.jsonl\n  max_seq_len: 128\n"
        "train:\n  micro_batch_size: 2\n"
    )
    run = run_cli("plan", str(run_config), "--gpu", "4090", "--json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["fits"] is True and plan["gpu"] == "NVIDIA RTX 4090 24GB"
    assert plan["micro_batch"] == 2 and plan["seq_len"] == 128 and plan["method"] == "lora"
    assert plan["traced"]["peak_bytes"] > plan["traced"]["weights_bytes"] > 0
    run = run_cli("plan", str(run_config), "--gpu-mem", "1MiB")
    assert run.returncode == 0, run.stderr
    assert "  does NOT fit in the GPU (0.000976562 GiB)" in run.stdout
    assert "note: to fit: lower train.micro_batch_size or data.max_seq_len" in run.stdout
    run = run_cli("plan", str(run_config), "--gpu", "5090")
    assert run.returncode == 2 and run.stderr == (
        "error: --gpu: '5090' is not a GPU the planner knows; known: h200, h100, a100, "
        "a100-40gb, l40s, a10g, 4090, 3090, t4. Give --gpu-mem (e.g. 24GiB) for another card\n"
    )
    run = run_cli("plan", str(run_config), f"model.path={tmp_path / 'none'}")
    assert run.returncode == 2 and run.stderr == (
        f"error: model.path: {tmp_path / 'none'}: no config.json there (no such model folder)\n"
    )
    lora = plan["traced"]
    run = run_cli("plan", str(run_config), "method.name=qlora", "--json")
    assert run.returncode == 0, run.stderr
    qlora = json.loads(run.stdout)["traced"]
    assert qlora["trainable_params"] == lora["trainable_params"]
    assert (
        qlora["weights_bytes"] < lora["weights_bytes"] and qlora["peak_bytes"] < lora["peak_bytes"]
    )


def test_known_gpus():
    assert gpu("H100").memory_gib == 80 and gpu("rtx4090").memory_gib == 24
    with pytest.raises(TunesmithError, match="known: h200, h100"):
        gpu("mi300x")
