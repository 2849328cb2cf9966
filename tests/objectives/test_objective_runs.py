"""Training with an objective: the reference is the base with the adapter off (a frozen copy
for full fine-tuning, or precomputed), gradients reach only trained parameters, resume is
bit-exact, every objective runs and logs its metrics, reward models load in transformers and
PEFT, and the bundled DPO task raises held-out reward accuracy well above the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.runs import ROOT, losses, preference_config, quiet

from tunesmith.config import ConfigError, load_config
from tunesmith.errors import TrainingError
from tunesmith.train.loop import Run, train


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def validations(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "val_loss" in m]


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "kto", "reward"])
def test_every_objective_trains_and_logs_its_metrics(tmp_path, tiny_dir, name):
    cfg = preference_config(tmp_path, tiny_dir, name, train={"max_steps": 3, "log_every_steps": 1})
    summary = train(cfg, progress=quiet())
    assert summary["objective"] == name
    steps = [m for m in metrics(tmp_path / "out") if "loss" in m]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    expected = {
        "dpo": "reward_accuracy",
        "simpo": "reward_margin",
        "orpo": "nll",
        "kto": "kl",
        "reward": "reward_chosen",
    }[name]
    assert expected in steps[-1]
    start, end = validations(tmp_path / "out")[0], validations(tmp_path / "out")[-1]
    assert (start["step"], end["step"]) == (0, 3)
    assert f"val_{expected}" in end and f"final_val_{expected}" in summary
    assert end["val_units"] == 6  # whole units: 6 pairs (or 6 KTO examples with their KL rows)


def test_the_reference_is_the_base_with_the_adapter_off(tmp_path, tiny_dir):
    """Before any step the policy is the reference: every implicit reward is 0, so the margin is
    exactly 0, the accuracy 0 (ties lose) and the DPO loss log 2."""
    cfg = preference_config(tmp_path, tiny_dir, train={"max_steps": 1})
    train(cfg, progress=quiet())
    start = validations(tmp_path / "out")[0]
    assert start["val_reward_margin"] == 0.0 and start["val_reward_accuracy"] == 0.0
    assert start["val_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_gradient_flows_only_into_trained_parameters(tmp_path, tiny_dir):
    cfg = preference_config(tmp_path, tiny_dir, train={"max_steps": 1, "grad_accum_steps": 1})
    run = Run(cfg, progress=quiet())
    run.setup()
    try:
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        run.train_step(0)
        changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
        trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    finally:
        run.close()
    assert changed and changed <= trained
    assert all("lora_" in n for n in trained)


def test_precomputed_reference_gives_the_same_run_and_is_kept_in_the_data_cache(tmp_path, tiny_dir):
    steps = {"max_steps": 3, "log_every_steps": 1}
    live = preference_config(tmp_path / "a", tiny_dir, train=steps)
    train(live, progress=quiet())
    objective = {"name": "dpo", "precompute_reference": True}
    pre = preference_config(tmp_path / "b", tiny_dir, objective, train=steps)
    said: list[str] = []
    progress = quiet()
    progress.log = said.append
    train(pre, progress=progress)
    assert losses(tmp_path / "b" / "out") == pytest.approx(losses(tmp_path / "a" / "out"), abs=1e-5)
    cached = list((tmp_path / "b" / "cache").glob("reference-*.safetensors"))
    assert len(cached) == 1
    assert any(line.startswith("reference log-probabilities: computed for 60") for line in said)
    again = preference_config(tmp_path / "b", tiny_dir, objective, train=steps)
    said.clear()
    train(again.model_copy(update={"output_dir": str(tmp_path / "b" / "again")}), progress=progress)
    assert said[0] == f"reference log-probabilities: read from {cached[0]}"
    assert losses(tmp_path / "b" / "again") == losses(tmp_path / "b" / "out")


def test_resume_is_bit_exact_with_an_objective(tmp_path, tiny_dir):
    steps = {"max_steps": 4, "log_every_steps": 1, "save_every_steps": 2}
    straight: list[float] = []
    cfg = preference_config(tmp_path / "a", tiny_dir, train=steps)
    train(cfg, on_step=lambda s, e: straight.append(e["loss"]), progress=quiet())

    class Killed(Exception):
        pass

    def kill_at_2(step, entry):
        first.append(entry["loss"])
        if step == 2:
            raise Killed

    first: list[float] = []
    cfg = preference_config(tmp_path / "b", tiny_dir, train=steps)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_2, progress=quiet())
    resumed: list[float] = []
    summary = train(
        cfg, resume="latest", on_step=lambda s, e: resumed.append(e["loss"]), progress=quiet()
    )
    assert first + resumed == straight  # exact
    a = json.loads((tmp_path / "a" / "out" / "summary.json").read_text())
    assert summary["final_val_reward_accuracy"] == a["final_val_reward_accuracy"]
    steps = [m["step"] for m in metrics(tmp_path / "b" / "out")]
    assert steps == sorted(steps) and steps.count(0) == 1  # the start is logged once


def test_full_fine_tuning_keeps_a_frozen_reference_copy(tmp_path, tiny_dir):
    cfg = preference_config(
        tmp_path, tiny_dir, method={"name": "full"}, train={"max_steps": 2, "lr": 1e-3}
    )
    run = Run(cfg, progress=quiet())
    run.setup()
    frozen = {n: p.detach().clone() for n, p in run.reference_model.named_parameters()}
    summary = run.run()
    assert all(not p.requires_grad for p in run.reference_model.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in run.reference_model.named_parameters())
    assert validations(tmp_path / "out")[0]["val_reward_margin"] == 0.0
    assert summary["final_val_reward_margin"] != 0.0
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_reward_models_load_as_sequence_classifiers(tmp_path, tiny_dir):
    """A LoRA reward model loads with AutoModelForSequenceClassification + PEFT, a full one
    with AutoModelForSequenceClassification alone; both give tunesmith score's scores."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.judge.score import RewardModel

    steps = {"max_steps": 3, "lr": 1e-2}
    lora = preference_config(tmp_path / "lora", tiny_dir, "reward", train=steps)
    train(lora, progress=quiet())
    full = preference_config(
        tmp_path / "full", tiny_dir, "reward", method={"name": "full"}, train=steps
    )
    train(full, progress=quiet())
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = [tokenizer(text)["input_ids"] for text in ("after red green", "after blue cyan cyan")]
    pad = tokenizer.pad_token_id
    width = max(map(len, ids))
    batch = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = (torch.arange(width)[None] < torch.tensor([[len(i)] for i in ids])).long()

    adapter = tmp_path / "lora" / "out" / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        peft_scores = peft_model(input_ids=batch, attention_mask=mask).logits[:, 0]
    ours = RewardModel.load(str(adapter), device="cpu").score_ids(ids)
    assert ours == pytest.approx(peft_scores.tolist(), abs=1e-5)
    assert peft_scores[0] != peft_scores[1]

    folder = tmp_path / "full" / "out" / "model"
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        hf_scores = hf(input_ids=batch, attention_mask=mask).logits[:, 0]
    assert RewardModel.load(str(folder), device="cpu").score_ids(ids) == pytest.approx(
        hf_scores.tolist(), abs=1e-5
    )


def test_bad_combinations_are_one_line_errors(tmp_path, tiny_dir):
    with pytest.raises(ConfigError) as err:
        preference_config(tmp_path, tiny_dir, data={"packing": True})
    assert "data.packing cannot be used with objective dpo: each pair is scored as two whole " in (
        str(err.value)
    )
    with pytest.raises(ConfigError) as err:
        preference_config(tmp_path, tiny_dir, data={"truncation": "split"})
    assert "a pair is never split; use truncate or drop" in str(err.value)
    with pytest.raises(ConfigError) as err:
        preference_config(
            tmp_path, tiny_dir, data={"datasets": [{"path": "x.jsonl", "format": "chat"}]}
        )
    assert "data.datasets.0.format is chat, but objective dpo trains on preference data" in str(
        err.value
    )
    cfg = preference_config(tmp_path, tiny_dir, "reward", method={"name": "bottleneck"})
    with pytest.raises(TrainingError, match="objective reward trains a score head beside the "):
        train(cfg, progress=quiet())


def test_sft_on_preference_data_names_the_objectives_to_use(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata:\n  datasets: [{path: p.jsonl, format: preference}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).endswith(
        "data.datasets.0.format is preference, which the sft objective cannot train on; set "
        "objective.name to dpo, simpo, orpo or reward"
    )


@pytest.fixture(scope="module")
def bundled_dpo(tmp_path_factory):
    """DPO on the bundled preference task, as examples/dpo.yaml runs it (40 s)."""
    out = tmp_path_factory.mktemp("dpo")
    cfg = load_config(
        ROOT / "examples/dpo.yaml", [f"output_dir={out}", f"data.cache_dir={out / 'cache'}"]
    )
    summary = train(cfg, progress=quiet())
    return out, summary


@pytest.mark.slow
def test_dpo_raises_held_out_reward_accuracy_well_above_the_bases(bundled_dpo):
    out, summary = bundled_dpo
    start = validations(out)[0]
    # the base (step 0) prefers the right answer in under half the held-out pairs; the tuned
    # model in about three of four (0.75 and 0.72 here)
    assert start["val_logps_accuracy"] <= 0.5
    assert summary["final_val_reward_accuracy"] >= 0.65
    assert summary["final_val_logps_accuracy"] >= start["val_logps_accuracy"] + 0.15


@pytest.mark.slow
def test_peft_loads_the_dpo_adapter_unchanged(bundled_dpo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.builder import load_for_inference

    out, _ = bundled_dpo
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1024]])
    ours, _, _ = load_for_inference(str(ROOT / "examples/tiny-llama"), [str(out / "adapter")])
    base = AutoModelForCausalLM.from_pretrained(ROOT / "examples/tiny-llama")
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_the_run_report_draws_reward_accuracy_and_margin(tmp_path, tiny_dir):
    from tunesmith.judge.run_report import render_report

    cfg = preference_config(
        tmp_path, tiny_dir, train={"max_steps": 4, "log_every_steps": 1}, eval={"every_steps": 2}
    )
    train(cfg, progress=quiet())
    page = render_report(tmp_path / "out")
    for series in (
        "train reward accuracy",
        "validation reward accuracy",
        "train reward margin",
        "validation reward margin",
    ):
        assert series in page
    assert "final_val_reward_accuracy" in page and ">dpo<" in page


def test_eval_compares_base_and_tuned_on_preference_pairs(tmp_path, tiny_dir):
    """`tunesmith eval` on preference data: how often each model prefers the chosen answer,
    the same figure as training's validation at the start (base) and the end (tuned)."""
    from tunesmith.judge.evaluate import evaluate_models, format_table

    cfg = preference_config(tmp_path, tiny_dir, train={"max_steps": 4, "lr": 1e-2})
    summary = train(cfg, progress=quiet())
    columns, n = evaluate_models(cfg, [str(tmp_path / "out" / "adapter")], samples=3)
    base, tuned = columns
    start = validations(tmp_path / "out")[0]
    assert base.preference["pairs"] == tuned.preference["pairs"] == 6
    assert base.preference["prefers_chosen"] == pytest.approx(start["val_logps_accuracy"])
    assert tuned.preference["prefers_chosen"] == pytest.approx(summary["final_val_logps_accuracy"])
    assert n == 3 and len(tuned.predictions) == 3  # generation against the chosen answers
    assert "prefers chosen (n=6 pairs)" in format_table(columns, n)


def test_detected_formats_must_match_the_objective(tmp_path, tiny_dir):
    """format: auto passes the config check; the data's detected format is checked when it
    is read, naming the file."""
    from helpers.runs import make_config

    cfg = make_config(tmp_path, tiny_dir, objective="dpo")  # chat data, format auto
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=quiet())
    assert str(err.value) == (
        f"{tmp_path / 'train.jsonl'} (train) is chat data, but objective dpo trains on "
        "preference data; set objective.name or give data of that format"
    )
