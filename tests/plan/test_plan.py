"""The memory planner: the traced peak of a training step against the same step run for real
(tensor accounting on CPU), the FLOPs model, the command and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.runs import run_cli
from transformers import AutoModelForCausalLM, LlamaConfig

from tunesmith.config import TrainSection, load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import (
    BottleneckConfig,
    FullConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoRAConfig,
)
from tunesmith.plan.estimate import estimate_step, skeleton
from tunesmith.plan.gpus import gpu
from tunesmith.plan.planner import flops_per_token
from tunesmith.plan.recommend import compare_methods, largest, methods_to_compare, workload
from tunesmith.plan.trace import MemoryTracker, trace_step
from tunesmith.train.loss import model_loss_sum

CONFIG = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
METHODS = {
    "lora": LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear"),
    "full": FullConfig(),
    "ia3": IA3Config(),
    "qlora": QLoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear"),
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
        from tunesmith.quantized.bnb import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(method.quant, compute_dtype=torch.float32))
    if not full:
        add_adapter(model, method)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    tracker = MemoryTracker()
    tracker.seed(list(model.parameters()) + list(model.buffers()))
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
    parts = (
        planned.weights_bytes
        + planned.trainable_bytes
        + planned.grads_bytes
        + planned.optimizer_bytes
        + planned.activations_bytes
    )
    assert parts == planned.peak_bytes
    if method == "full":
        # AdamW: m and v in fp32, and a 4-byte step counter per parameter tensor
        assert 0 < planned.optimizer_bytes - 2 * planned.trainable_bytes < 1024
        assert planned.weights_bytes < 1024  # only buffers (rotary frequencies) are frozen


def test_checkpointing_and_fused_attention_lower_the_peak():
    config = LlamaConfig(**CONFIG)
    lora = METHODS["lora"]
    on = trace_step(config, lora, TrainSection(gradient_checkpointing=True), 256, 4, torch.bfloat16)
    off = trace_step(
        config, lora, TrainSection(gradient_checkpointing=False), 256, 4, torch.bfloat16
    )
    eager = trace_step(
        config,
        lora,
        TrainSection(gradient_checkpointing=False),
        256,
        4,
        torch.bfloat16,
        attention="eager",
    )
    assert on.activations_bytes < off.activations_bytes < eager.activations_bytes
    assert on.weights_bytes == off.weights_bytes
    assert (
        on.trainable_params
        == off.trainable_params
        == 3
        * (
            8 * (128 + 128)
            + 8 * (128 + 64) * 2
            + 8 * (128 + 128)
            + 2 * 8 * (128 + 352)
            + 8 * (352 + 128)
        )
    )


def test_flops_per_token():
    config = LlamaConfig(**CONFIG)
    n = 3 * (128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 352) + 128 * 1000
    attention = 2 * 3 * 64 * 128
    assert flops_per_token(config, "full", 64, False) == 6 * n + 3 * attention
    assert flops_per_token(config, "lora", 64, False) == 4 * n + 3 * attention
    assert flops_per_token(config, "lora", 64, True) == 6 * n + 4 * attention


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
    assert run.returncode == 2
    assert "  does NOT fit in the GPU (0.000976562 GiB)" in run.stdout
    assert run.stderr == (
        "error: nothing fits in 0.000976562 GiB: the smallest setup, qlora with checkpointing "
        "on, adamw_8bit, offloaded activations, needs 2.7 MiB at micro-batch 1 × 128 tokens "
        "(0.8 MiB of it frozen weights); use a GPU with more memory (--gpu, --gpu-mem) or a "
        "smaller model (model.path)\n"
    )
    run = run_cli("plan", str(run_config), "--gpu", "5090")
    assert run.returncode == 2 and run.stderr == (
        "error: --gpu: '5090' is not a GPU the planner knows; known: h200, h100, a100, "
        "a100-40gb, l40s, a10g, 4090, 3090, t4. Give --gpu-mem (e.g. 24GiB) for another card\n"
    )
    run = run_cli("plan", str(run_config), f"model.path={tmp_path / 'none'}")
    assert run.returncode == 2 and run.stderr == (
        f"error: model.path: {tmp_path / 'none'}: no such folder\n"
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


WIDE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=3,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
ESTIMATED = {
    "lora": (LoRAConfig(), True),
    "lora-no-dropout": (LoRAConfig(dropout=0.0, targets=["q_proj", "v_proj"]), True),
    "dora": (LoRAConfig(use_dora=True), True),
    "qlora": (QLoRAConfig(), True),
    "full": (FullConfig(), True),
    "full-bf16": (FullConfig(), False),
    "ia3": (IA3Config(), True),
    "bottleneck": (BottleneckConfig(), True),
    "prompt": (PromptTuningConfig(), True),
    "prefix": (PrefixTuningConfig(), True),
}


@pytest.mark.parametrize("name", list(ESTIMATED))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_analytic_estimate_matches_the_trace(name, checkpointing):
    """The closed-form estimate against the traced peak, at two shapes, with real widths."""
    method, master = ESTIMATED[name]
    config = LlamaConfig(**WIDE)
    optimizer = "adamw_8bit" if name == "full-bf16" else "adamw"
    train = TrainSection(
        gradient_checkpointing=checkpointing, fp32_master_weights=master, optimizer=optimizer
    )
    sk = skeleton(config, method, torch.bfloat16, master and name.startswith("full"))
    for seq, batch in [(512, 1), (2048, 4)]:
        traced = trace_step(config, method, train, seq, batch, torch.bfloat16)
        estimated = estimate_step(sk, seq, batch, checkpointing, optimizer)
        assert abs(estimated.peak_bytes / traced.peak_bytes - 1) < 0.10, (seq, batch)
        assert estimated.trainable_params == traced.trainable_params
        assert estimated.total_params == traced.total_params
        assert estimated.weights_bytes == traced.weights_bytes
        assert estimated.optimizer_bytes == pytest.approx(traced.optimizer_bytes, rel=0.01)


def test_analytic_estimate_of_an_8b_model():
    """The README's example at full depth: Llama 3.1 8B, LoRA, 2 × 2048, checkpointing."""
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
    )
    method = LoRAConfig(r=16, alpha=32, dropout=0.05)
    traced = trace_step(
        config, method, TrainSection(gradient_checkpointing=True), 2048, 2, torch.bfloat16
    )
    estimated = estimate_step(skeleton(config, method, torch.bfloat16, False), 2048, 2, True)
    assert abs(estimated.peak_bytes / traced.peak_bytes - 1) < 0.05
    assert estimated.weights_bytes == traced.weights_bytes


def test_largest():
    assert largest(lambda n: n <= 37, 1, 1024) == 37
    assert largest(lambda n: n <= 5000, 1, 1024) == 1024
    assert largest(lambda n: False, 1, 1024) == 0


def quickstart(*overrides):
    return load_config("examples/quickstart.yaml", list(overrides))


def test_method_table_limits_are_the_largest_that_fit():
    """Each method's max micro-batch and sequence fit under the memory, one more does not."""
    cfg = quickstart("train.micro_batch_size=4")
    model_config = LlamaConfig.from_pretrained("examples/tiny-llama")
    memory = 200 * 2**20
    options = compare_methods(model_config, cfg, torch.float32, memory, None, None)
    labels = ["full", "lora", "dora", "qlora", "prompt", "prefix", "bottleneck", "ia3"]
    assert [o.method for o in options] == labels
    methods = dict(methods_to_compare(cfg.method))
    assert methods["lora"] is cfg.method and methods["dora"].r == cfg.method.r == 16
    for option in options:
        method = methods[option.method]
        master = option.method == "full" and option.setting.master
        sk = skeleton(model_config, method, torch.float32, master)

        def peak(b, s, sk=sk, setting=option.setting):
            return estimate_step(sk, s, b, setting.checkpointing, setting.optimizer).peak_bytes

        assert option.fits and option.peak_bytes == peak(4, 256) <= memory
        assert peak(option.max_micro_batch, 256) <= memory < peak(option.max_micro_batch + 1, 256)
        assert option.max_seq_len == 512  # the model's max_position_embeddings
    # the cheapest switches are kept: checkpointing stays off while it fits
    assert not options[1].setting.checkpointing


def test_workload_counts_what_the_trainer_batches():
    """Processed tokens (padding included) equal the trainer's own collated micro-batches."""
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.train.batches import BatchPlan

    for packing in ("true", "false"):
        cfg = quickstart(f"data.packing={packing}", "train.epochs=2", "train.micro_batch_size=4")
        tokenizer = load_tokenizer(cfg.model)
        work = workload(cfg, tokenizer)
        prepared = prepare_data(cfg.data, tokenizer, cfg.train.seed)
        plan = BatchPlan(prepared.train, prepared.train_rows, 4, 1, cfg.train.seed, 0)
        steps = plan.total_steps(2, None)
        batches = [b for step in range(steps) for b in plan.micro_batches(step)]
        assert work.steps == steps
        assert work.processed_tokens == sum(b["input_ids"].numel() for b in batches)
        assert work.tokens_per_epoch == sum(prepared.train.lengths)
        real = sum(int(b["labels"].numel() - (b["input_ids"] == -1).sum()) for b in batches)
        assert real == work.processed_tokens
        if packing == "false":
            assert work.packed_padding is not None and work.packed_padding < work.padding


def test_cli_plan_recommends_and_says_what_to_change():
    run = run_cli(
        "plan",
        "examples/quickstart.yaml",
        "train.micro_batch_size=64",
        "--gpu-mem",
        "300MiB",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["fits"] is False
    options = {o["method"]: o for o in plan["options"]}
    assert plan["recommended"] is None  # nothing fits 64 × 256 in 300 MiB
    assert plan["workload"]["samples"] == 1200 and plan["hours"] is None  # no --gpu: no speed
    lora = options["lora"]
    assert not lora["fits"] and lora["setting"] == {
        "checkpointing": True,
        "optimizer": "adamw_8bit",
        "master": True,
        "offload": True,
    }  # the most frugal setting, and what fits there
    note = plan["notes"][-1]
    assert note.startswith("to fit 0.292969 GiB: train.micro_batch_size 64 → ")
    assert (
        "; or train.gradient_checkpointing=true train.optimizer=adamw_8bit "
        f"train.offload_activations=true at micro-batch {lora['max_micro_batch']};" in note
    )
    own = int(note.split(" → ")[1].split(" ")[0])
    assert 1 <= own < lora["max_micro_batch"] < 64
    run = run_cli("plan", "examples/quickstart.yaml", "--gpu", "t4")
    assert run.returncode == 0, run.stderr
    assert "  dataset: 1,200 samples, " in run.stdout
    assert "  recommended: lora with checkpointing off, adamw" in run.stdout


def test_dropout_is_traced_with_the_gpus_one_byte_mask():
    """With dropout on q_proj's LoRA branch the plain layer's dropout keeps one mask element
    per input element in each layer after the first (whose input needs no gradient): 1 byte as
    on a GPU ("flash"), 2 (bf16) as the CPU kernel keeps it ("eager"). The fused LoRA step
    keeps its own 1-byte mask in all three layers, on either kernel."""
    config = LlamaConfig(**WIDE)
    cases = [(True, "flash", 3), (True, "eager", 3), (False, "flash", 2), (False, "eager", 4)]
    for fused, attention, masks in cases:
        train = TrainSection(gradient_checkpointing=False, fused_lora=fused)
        peaks = [
            trace_step(
                config,
                LoRAConfig(dropout=p, targets=["q_proj"]),
                train,
                512,
                2,
                torch.bfloat16,
                attention=attention,
            ).peak_bytes
            for p in (0.0, 0.1)
        ]
        assert peaks[1] - peaks[0] == masks * (2 * 512) * 1024, (fused, attention)


def test_method_table_leaves_out_a_method_the_model_cannot_take(monkeypatch):
    """A method that cannot attach to the model (prefix tuning on a backbone whose forward takes
    no KV cache) is left out of the table with a note; the plan itself still comes out."""
    import tunesmith.methods.prompt.layer as prompt

    monkeypatch.setattr(prompt, "cache_argument", lambda backbone: None)
    cfg = quickstart()
    model_config = LlamaConfig.from_pretrained("examples/tiny-llama")
    notes: list[str] = []
    options = compare_methods(model_config, cfg, torch.float32, 200 * 2**20, None, None, notes)
    assert [o.method for o in options] == [
        "full",
        "lora",
        "dora",
        "qlora",
        "prompt",
        "bottleneck",
        "ia3",
    ]
    assert notes == [
        "prefix left out of the method table: prefix tuning cannot be used with LlamaModel: its "
        "attention takes no past key/values (forward has neither a cache nor a past_key_values "
        "argument); use prompt tuning or LoRA"
    ]
    with pytest.raises(TunesmithError, match="^prefix tuning cannot be used with LlamaModel"):
        compare_methods(
            model_config,
            quickstart("method=prefix", "data.packing=false"),
            torch.float32,
            200 * 2**20,
            None,
            None,
        )


def test_analytic_estimate_of_offloading_matches_the_trace():
    """`estimate_step(offload=True)` (at most two checkpointed inputs on the device) against
    the trace of the same step under the simulated `ActivationOffload`."""
    config = LlamaConfig(**{**WIDE, "num_hidden_layers": 8})
    method = LoRAConfig()
    train = TrainSection(gradient_checkpointing=True, offload_activations=True)
    traced = trace_step(config, method, train, 2048, 2, torch.bfloat16)
    estimated = estimate_step(
        skeleton(config, method, torch.bfloat16, False), 2048, 2, True, offload=True
    )
    plain = estimate_step(skeleton(config, method, torch.bfloat16, False), 2048, 2, True)
    assert abs(estimated.peak_bytes / traced.peak_bytes - 1) < 0.10
    assert plain.peak_bytes - estimated.peak_bytes == 6 * (2 * 2048 * 1024 * 2)


def test_planning_several_gpus_per_gpu_for_ddp_and_fsdp():
    from tunesmith.plan.scaling import plan_scale
    from tunesmith.plan.trace import TracedStep

    gib = 2**30
    traced = TracedStep(
        peak_bytes=20 * gib,
        weights_bytes=15 * gib,
        trainable_bytes=gib // 4,
        grads_bytes=gib // 4,
        optimizer_bytes=gib // 2,
        activations_bytes=4 * gib,
        trainable_params=0,
        total_params=0,
    )
    scale = plan_scale(traced, gib // 2, 4, 1, 18 * gib, 10_000.0, 4096, True, True, 15 * gib)
    assert scale.ddp_peak_bytes == 20 * gib + gib // 4  # replicated, plus gradient buckets
    assert scale.fsdp_peak_bytes == 16 * gib // 4 + 4 * gib + gib  # 1/4 + activations + 2 layers
    assert (scale.pick, scale.why) == (
        "fsdp",
        "the frozen base does not fit one GPU; FSDP shards it",
    )
    assert scale.fsdp_comm_s_per_step == pytest.approx(0.75 * (3 * 15 + 0.25) * gib / 200e9)
    assert scale.tokens_per_s == pytest.approx(
        4 * 4096 / max(4096 / 10_000, scale.fsdp_comm_s_per_step)
    )
    roomy = plan_scale(traced, gib // 2, 8, 2, 80 * gib, None, 4096, True, True, 15 * gib)
    assert roomy.pick == "ddp" and roomy.bandwidth_bytes_per_s == 20e9 and roomy.world == 16
    full = plan_scale(traced, gib // 2, 2, 1, 80 * gib, None, 4096, False, True, 15 * gib)
    assert full.pick == "fsdp"


def test_cli_plan_for_several_gpus():
    run = run_cli(
        "plan", "examples/quickstart.yaml", "--gpu", "h100", "--gpus", "4", "--nodes", "2"
    )
    assert run.returncode == 0, run.stderr
    assert "Several GPUs: 4 GPU(s) × 2 machine(s) = 8 (per GPU):" in run.stdout
    assert "  pick: ddp (the model fits one GPU, and DDP communicates only the gradients)" in (
        run.stdout
    )
    assert "assuming 20 GB/s per GPU" in run.stdout


def measured_objective_peak(method, objective, train, seq, pairs) -> int:
    """Two real steps of a preference objective (tunesmith's own loss module), counted by the
    same tensor accounting as the trace."""
    import copy

    from tunesmith.adapters import add_adapter
    from tunesmith.objectives import objective_of
    from tunesmith.train.objective import UnitLoss

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    full = method.name == "full"
    if not full:
        add_adapter(model, method)
    model.config.use_cache = False
    model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if full else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    tracker = MemoryTracker()
    tensors = list(model.parameters()) + list(model.buffers())
    if reference is not None:
        tensors += list(reference.parameters()) + list(reference.buffers())
    tracker.seed(tensors)
    ids = torch.randint(0, 1000, (2 * pairs, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss = UnitLoss(objective_of(objective), objective, reference, 2)
    with tracker:
        for step in range(2):
            if step == 1:
                tracker.reset_peak()
            total, count, _ = loss(model, batch)
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


@pytest.mark.parametrize("method", ["lora", "full"])
def test_traced_peak_of_a_preference_objective_matches_a_real_step(method):
    """DPO's step: 2 × micro-batch sequences, the reference pass without gradients, and for
    full fine-tuning the frozen copy's weights."""
    from tunesmith.objectives.dpo import DPOConfig

    train = TrainSection(lr=1e-4, gradient_checkpointing=False)
    dpo = DPOConfig()
    planned = trace_step(
        LlamaConfig(**CONFIG), METHODS[method], train, 64, 2, torch.float32, "eager", dpo
    )
    real = measured_objective_peak(METHODS[method], dpo, train, 64, 2)
    assert abs(planned.peak_bytes / real - 1) < 0.10, (planned.peak_bytes, real)
    sft = trace_step(LlamaConfig(**CONFIG), METHODS[method], train, 64, 4, torch.float32, "eager")
    if method == "full":  # the frozen copy: every weight once more
        copy = sum(
            p.numel() * 4
            for p in AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).parameters()
        )
        assert planned.weights_bytes >= copy
        assert planned.peak_bytes > sft.peak_bytes + 0.9 * copy
    else:  # the adapter switched off: no second copy, about the peak of 4 rows of sft
        assert planned.weights_bytes == sft.weights_bytes
        assert abs(planned.peak_bytes / sft.peak_bytes - 1) < 0.15
