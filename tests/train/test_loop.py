"""The training loop: learning, accumulation equivalence, exact resume, atomic checkpoints,
NaN handling, schedules, the chunked loss, and generation with an adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.data import chat_tokenizer
from helpers.models import ARCHS, make_model
from helpers.runs import make_config, quiet
from transformers import LlamaForCausalLM

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as checkpoint_module
from tunesmith.train import loop as loop_module
from tunesmith.train.loop import Run, TrainingError, TrainingInterrupted, train
from tunesmith.train.loss import causal_lm_loss_sum, model_loss_sum
from tunesmith.train.optim import lr_factor


def test_lora_training_lowers_the_loss_and_writes_the_run(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 30, "lr": 2e-2})
    losses = []
    summary = train(config, on_step=lambda s, e: losses.append(e["loss"]), progress=quiet())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    out = Path(config.output_dir)
    assert summary["steps"] == 30 and summary["method"] == "lora"
    assert summary["final_val_loss"] is not None and summary["final_val_ppl"] == pytest.approx(
        math.exp(summary["final_val_loss"])
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer.json").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "method:" in (out / "config.yaml").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [10, 20, 30]
    assert [m["step"] for m in metrics if "val_loss" in m] == [30]
    # the saved adapter reproduces the trained model
    base = LlamaForCausalLM.from_pretrained(tiny_dir)
    tunesmith.load_adapter(base, out / "adapter")
    assert summary["trainable_parameters"] == tunesmith.trainable_parameters(base).total - sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_dir).parameters()
    )


def test_full_fine_tuning_lowers_the_loss_and_saves_a_loadable_model(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, method="full", train={"max_steps": 20, "lr": 3e-3})
    losses = []
    train(config, on_step=lambda s, e: losses.append(e["loss"]), progress=quiet())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    model = LlamaForCausalLM.from_pretrained(Path(config.output_dir) / "model")
    assert isinstance(model, LlamaForCausalLM)


def _one_step(tmp_path: Path, tiny_dir: Path, micro: int, accum: int, dropout: float = 0.0):
    name = f"{micro}x{accum}-{dropout}"
    config = make_config(
        tmp_path / name,
        tiny_dir,
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": dropout},
        train={
            "max_steps": 1,
            "micro_batch_size": micro,
            "grad_accum_steps": accum,
            "max_grad_norm": None,
        },
    )
    config = config.model_copy(update={"output_dir": str(tmp_path / f"out{name}")})
    run = Run(config, progress=quiet())
    run.setup()
    result = run.train_step(0)
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return run, result, weights


@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_is_exact_with_dropout_too(tmp_path, tiny_dir, fused, monkeypatch):
    """Each sample's dropout mask is keyed by the sample, not drawn in batch order: 2x4
    micro-batches and one batch of 8 drop the same elements (with and without the fused
    LoRA step), and a run without keys (dropout 0) differs from both."""
    from tunesmith.methods.lora.layer import LoRALayer

    if not fused:
        monkeypatch.setattr(LoRALayer, "fusable", lambda self: None)
    _, big, big_weights = _one_step(tmp_path, tiny_dir, micro=8, accum=1, dropout=0.3)
    _, small, small_weights = _one_step(tmp_path, tiny_dir, micro=2, accum=4, dropout=0.3)
    _, _, plain_weights = _one_step(tmp_path, tiny_dir, micro=8, accum=1, dropout=0.0)
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-6)
    for name in big_weights:
        torch.testing.assert_close(small_weights[name], big_weights[name], rtol=1e-5, atol=1e-7)
    # B's first update is g·(dropout(x)·A): the dropout did drop something
    b = next(n for n in big_weights if "lora_B" in n)
    assert (plain_weights[b] - big_weights[b]).abs().max() > 1e-4


def test_accumulation_gives_the_gradient_of_one_big_batch(tmp_path, tiny_dir):
    big_run, big, big_weights = _one_step(tmp_path, tiny_dir, micro=8, accum=1)
    small_run, small, small_weights = _one_step(tmp_path, tiny_dir, micro=2, accum=4)
    assert big["trained_tokens"] == small["trained_tokens"]
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-6)
    for name in big_weights:
        torch.testing.assert_close(small_weights[name], big_weights[name], rtol=1e-5, atol=1e-7)
    # The common bug, averaging per-micro-batch means, gives a different loss on this data.
    micro = small_run.plan.micro_batches(0)
    means = []
    with torch.no_grad():
        for batch in micro:
            s, c = model_loss_sum(small_run.model, batch)
            means.append(float(s) / c)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert len(set(counts)) > 1  # micro-batches with different trained-token counts
    naive = sum(means) / len(means)
    weighted = sum(m * c for m, c in zip(means, counts, strict=True)) / sum(counts)
    assert abs(naive - weighted) > 1e-3


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_kill_gives_the_same_losses(tmp_path, tiny_dir, method):
    settings = {"max_steps": 8, "save_every_steps": 4, "micro_batch_size": 2}
    if method == "full":
        settings["lr"] = 1e-3
    straight_cfg = make_config(tmp_path / "a", tiny_dir, method=method, train=settings)
    straight = []
    train(straight_cfg, on_step=lambda s, e: straight.append(e["loss"]), progress=quiet())

    cfg = make_config(tmp_path / "b", tiny_dir, method=method, train=settings)

    class Killed(Exception):
        pass

    def kill_at_4(step, entry):
        first.append(entry["loss"])
        if step == 4:
            raise Killed

    first: list[float] = []
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_4, progress=quiet())
    assert [p.name for p in checkpoint_module.list_checkpoints(cfg.output_dir)] == ["step-000004"]
    resumed: list[float] = []
    train(cfg, resume="latest", on_step=lambda s, e: resumed.append(e["loss"]), progress=quiet())
    assert first + resumed == straight  # exact, not approximately
    steps = [json.loads(x)["step"] for x in (Path(cfg.output_dir) / "metrics.jsonl").open()]
    assert steps == sorted(steps)


def test_a_run_refuses_to_overwrite_an_earlier_one(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 1})
    train(config, progress=quiet())
    with pytest.raises(
        TunesmithError,
        match=r"already holds a run \(checkpoints/step-000001, adapter, .*\); continue it",
    ):
        train(config, progress=quiet())
    train(config, overwrite=True, progress=quiet())
    with pytest.raises(TunesmithError, match="is not a checkpoint folder"):
        train(config, resume=str(tmp_path), progress=quiet())


def test_a_crash_while_writing_a_checkpoint_leaves_no_partial_checkpoint(
    tmp_path, tiny_dir, monkeypatch
):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 4, "save_every_steps": 2})
    real = checkpoint_module.atomic_write_safetensors
    calls = {"n": 0}

    def crash_on_second_checkpoint(tensors, path):
        if Path(path).name == "rng.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint_module, "atomic_write_safetensors", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        train(config, progress=quiet())
    root = Path(config.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    # a hard kill (no cleanup) leaves a hidden temp folder: ignored and removed on resume
    (root / ".tmp-step-000004-abc").mkdir()
    monkeypatch.setattr(checkpoint_module, "atomic_write_safetensors", real)
    summary = train(config, resume="latest", progress=quiet())
    assert summary["steps"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


def test_keep_last_deletes_older_checkpoints(tmp_path, tiny_dir):
    config = make_config(
        tmp_path, tiny_dir, train={"max_steps": 6, "save_every_steps": 1, "keep_last": 2}
    )
    train(config, progress=quiet())
    names = [p.name for p in checkpoint_module.list_checkpoints(config.output_dir)]
    assert names == ["step-000005", "step-000006"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_dir, monkeypatch
):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 6, "save_every_steps": 2})
    real = loop_module.model_loss_sum
    seen = {"n": 0}

    def poisoned(model, batch):
        seen["n"] += 1
        total, count = real(model, batch)
        return (total * float("nan") if seen["n"] > 6 else total), count  # step 4's batches

    monkeypatch.setattr(loop_module, "model_loss_sum", poisoned)
    with pytest.raises(TrainingError) as info:
        train(config, progress=quiet())
    good = Path(config.output_dir) / "checkpoints" / "step-000002"
    assert str(info.value) == (
        f"step 4: the loss is nan; stopping without updating the weights. Last good checkpoint: "
        f"{good}. Lower train.lr, use dtype bf16 or fp32, or check the data; then --resume"
    )
    assert [p.name for p in checkpoint_module.list_checkpoints(config.output_dir)] == [
        "step-000002"
    ]


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
        (
            "cosine",
            [
                1 / 3,
                2 / 3,
                1.0,
                (1 + math.cos(math.pi / 4)) / 2,
                0.5,
                (1 + math.cos(3 * math.pi / 4)) / 2,
            ],
        ),
    ],
)
def test_schedules_warm_up_then_decay(schedule, expected):
    got = [lr_factor(schedule, step, warmup=2, total=6) for step in range(6)]
    assert got == pytest.approx(expected)


def test_weight_decay_skips_vectors_and_lr_follows_the_schedule(tmp_path, tiny_dir):
    config = make_config(
        tmp_path,
        tiny_dir,
        method="full",
        train={"max_steps": 4, "weight_decay": 0.1, "warmup_steps": 1, "schedule": "linear"},
    )
    run = Run(config, progress=quiet())
    run.setup()
    decays = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in run.optimizer.param_groups}
    assert decays == {0.1: {2}, 0.0: {1}}
    lrs = [run.train_step(s)["lr"] for s in range(4)]
    assert lrs == pytest.approx([config.train.lr * f for f in (0.5, 1.0, 2 / 3, 1 / 3)])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_equals_the_full_logits_loss(arch, monkeypatch):
    model = make_model(arch)  # eval mode: no dropout, so the two passes are comparable
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    monkeypatch.setattr("tunesmith.train.loss.CHUNK_ELEMENTS", 96 * 5)  # several chunks
    total, count = model_loss_sum(model, batch)
    total.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref, ref_count = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    ref.backward()
    assert count == ref_count == 2 * 11 - 4
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, rtol=1e-4, atol=1e-6)


def test_greedy_generation_with_an_adapter_equals_the_merged_model(tiny_dir):
    from tunesmith.generation import Sampling, generate_batch, prompt_ids

    tokenizer = chat_tokenizer()
    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    torch.manual_seed(3)
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    template = tokenizer.chat_template
    prompts = [
        prompt_ids([{"role": "user", "content": text}], template, tokenizer, add_bos=False)
        for text in ("after red", "after teal and more", "hello")
    ]
    sampling = Sampling(max_new_tokens=12)
    with_adapter = generate_batch(model, tokenizer, prompts, sampling)
    with tunesmith.disabled(model):
        base = generate_batch(model, tokenizer, prompts, sampling)
    merged = generate_batch(tunesmith.merge_and_unload(model), tokenizer, prompts, sampling)
    assert with_adapter == merged
    assert with_adapter != base
    assert any(text for text in with_adapter)


def test_prompt_ids_match_the_training_encoding():
    from tunesmith.data import EncodeSettings, encode_examples
    from tunesmith.data.formats import Conversation
    from tunesmith.generation import prompt_ids

    tokenizer = chat_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    settings = EncodeSettings(
        max_seq_len=128,
        truncation="truncate",
        train_on_inputs=False,
        add_eos=True,
        template=tokenizer.chat_template,
        add_bos=False,
    )
    from collections import Counter

    [(ids, labels)] = encode_examples(
        [(Conversation([*messages, {"role": "assistant", "content": "yo"}]), "x")],
        tokenizer,
        settings,
        Counter(),
    )
    prompt = prompt_ids(messages, tokenizer.chat_template, tokenizer, add_bos=False)
    first_trained = next(i for i, v in enumerate(labels) if v != -100)
    assert list(ids[:first_trained]) == prompt


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_train_and_resume_exactly(tmp_path, tiny_dir, optimizer):
    pytest.importorskip("bitsandbytes")  # a dev dependency: CI installs it
    settings = {"max_steps": 4, "save_every_steps": 2, "optimizer": optimizer, "lr": 2e-2}
    straight: list[float] = []
    train(
        make_config(tmp_path / "a", tiny_dir, train=settings),
        on_step=lambda s, e: straight.append(e["loss"]),
        progress=quiet(),
    )
    assert straight[-1] < straight[0]
    cfg = make_config(tmp_path / "b", tiny_dir, train={**settings, "max_steps": 4})
    first: list[float] = []

    def stop_at_2(step, entry):
        first.append(entry["loss"])
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(
        TrainingInterrupted, match="^interrupted after step 2; last checkpoint: .*step-000002$"
    ):
        train(cfg, on_step=stop_at_2, progress=quiet())
    rest: list[float] = []
    train(cfg, resume="latest", on_step=lambda s, e: rest.append(e["loss"]), progress=quiet())
    assert first + rest == straight


def test_a_missing_bitsandbytes_is_a_clear_error(tmp_path, tiny_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = make_config(tmp_path, tiny_dir, train={"optimizer": "adamw_8bit"})
    with pytest.raises(TunesmithError) as info:
        train(config, progress=quiet())
    assert str(info.value) == (
        "train.optimizer: adamw_8bit needs bitsandbytes; pip install bitsandbytes, or use "
        "optimizer: adamw"
    )
