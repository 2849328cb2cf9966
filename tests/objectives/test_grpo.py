"""GRPO: the advantages and the clipped loss against hand computation, the reward functions
(built-ins, a user function from a file, the one-line errors), prompt data, and runs: the
logged metrics and completions, a mid-round checkpoint that resumes exactly, and (slow) a run
on the bundled model that raises the held-out exact match."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import write_jsonl
from helpers.runs import WORDS, make_config, quiet
from pydantic import ValidationError
from safetensors.torch import load_file

from tunesmith.config import ConfigError, config_from_dict
from tunesmith.data.sources import DataError
from tunesmith.errors import TrainingError
from tunesmith.objectives.grpo import GRPOConfig, RewardSpec
from tunesmith.objectives.grpo.impl import advantages, grpo_loss
from tunesmith.objectives.grpo.rewards import Rewards
from tunesmith.objectives.rows import ADVANTAGES
from tunesmith.train.loop import train
from tunesmith.train.objective import GRPOLoss


def config(**fields) -> GRPOConfig:
    return GRPOConfig(rewards=[{"function": "exact_match"}], **fields)


def test_advantages_are_normalised_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, unbiased std sqrt(0.25) = 0.5; group 2: all equal, no signal
    got = advantages(rewards, 4, "group")
    want = [0.75 / (0.5 + 1e-4), -0.25 / (0.5 + 1e-4), -0.25 / (0.5 + 1e-4)]
    assert got[:3] == pytest.approx(want)
    assert got[4:] == pytest.approx([0, 0, 0, 0])
    assert advantages(rewards, 4, "none") == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    batch_std = np.std(rewards, ddof=1)
    assert advantages(rewards, 4, "batch")[0] == pytest.approx(0.75 / (batch_std + 1e-4))


# two completions: row 0 has 3 tokens, row 1 has 2 (then padding)
LOGPS = [-1.0, -0.5, -2.0, -0.2, -1.5]
OLD = [-1.3, -0.5, -1.8, -0.6, -1.4]
REF = [-1.1, -0.7, -2.2, -0.3, -1.0]
ADV = [1.5, -0.8]
ROWS = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([3, 2])  # each token's row; the lengths


def hand_loss(loss_type: str, beta: float, eps: float = 0.2, eps_high: float | None = None):
    """The GRPO loss written out token by token with `math`."""
    rows = [0, 0, 0, 1, 1]
    per_row = {0: [], 1: []}
    clipped = 0
    for lp, old, ref, r in zip(LOGPS, OLD, REF, rows, strict=True):
        a = ADV[r]
        ratio = math.exp(lp - old)
        low, high = 1 - eps, 1 + (eps_high or eps)
        bounded = min(max(ratio, low), high)
        loss = -min(ratio * a, bounded * a)
        clipped += (ratio < low and a < 0) or (ratio > high and a > 0)
        kl = math.exp(ref - lp) - (ref - lp) - 1
        per_row[r].append(loss + beta * kl)
    if loss_type == "grpo":
        total = sum(sum(v) / len(v) for v in per_row.values()) / 2
    elif loss_type == "dr_grpo":
        total = sum(sum(v) for v in per_row.values()) / (2 * 8)  # max_completion_tokens 8
    else:
        total = sum(sum(v) for v in per_row.values()) / 5
    return total, clipped / 5


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, None), (0.04, 0.28)])
def test_the_loss_equals_its_hand_computed_value(loss_type, beta, eps_high):
    cfg = config(loss_type=loss_type, beta=beta, epsilon_high=eps_high, max_completion_tokens=8)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    total, metrics = grpo_loss(t(LOGPS), t(OLD), t(REF), t(ADV), *ROWS, cfg)
    batch = {"input_ids": torch.zeros(2, 4), "labels": torch.tensor([[0] * 4, [0, 0, 0, -100]])}
    units = GRPOLoss(cfg).units(batch)
    want, clip = hand_loss(loss_type, beta, 0.2, eps_high)
    assert float(total) / units == pytest.approx(want, rel=1e-12)
    assert float(metrics["clip_ratio"][0]) / metrics["clip_ratio"][1] == pytest.approx(clip)
    kl = sum(math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(LOGPS, REF, strict=True)) / 5
    assert float(metrics["kl"][0]) / metrics["kl"][1] == pytest.approx(kl)


def test_on_fresh_samples_the_gradient_is_the_advantage_times_the_score():
    """First pass: old = current (detached), ratio 1, so ∂loss/∂logp = −A per token (grpo:
    divided by the completion's length)."""
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    cfg = config(loss_type="grpo")
    total, _ = grpo_loss(logps, logps.detach(), None, torch.tensor(ADV), *ROWS, cfg)
    total.backward()
    want = [-1.5 / 3] * 3 + [0.8 / 2] * 2
    assert logps.grad.tolist() == pytest.approx(want)


def reward_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return f"{path}:score"


def test_built_in_rewards():
    specs = [
        RewardSpec(function="exact_match"),
        RewardSpec(function="numeric_match", column="n"),
        RewardSpec(function="regex", pattern=r"There are \d+ words\."),
        RewardSpec(function="length", limit=2, weight=0.5),
    ]
    rewards = Rewards(specs)
    completions = ["there are 4 words", "There are 5 words.", "It is 1,000.5"]
    columns = {
        "answer": ["There are 4 words.", "There are 4 words.", "x"],
        "n": ["4", "4", "1000.5"],
        "completion_ids": [[1, 2], [1, 2, 3], [1, 2, 3, 4, 5, 6]],
    }
    scores = rewards.score(["p"] * 3, completions, columns)
    assert scores[:, 0].tolist() == [1, 0, 0]  # case, spaces, surrounding punctuation ignored
    assert scores[:, 1].tolist() == [1, 0, 1]  # the last number, commas dropped
    assert scores[:, 2].tolist() == [0, 1, 0]  # the whole completion must match
    assert scores[:, 3].tolist() == [0, -0.5, -1]  # 0 up to 2 tokens, -1 per 2 over, floor -1
    assert rewards.total(scores).tolist() == pytest.approx([2, 0.75, 0.5])


def test_a_user_function_from_a_file_gets_prompts_completions_and_columns(tmp_path):
    name = reward_file(
        tmp_path,
        "def score(prompts, completions, answer, completion_ids, bonus=0, **kw):\n"
        "    return [len(c[0]['content']) + bonus if a == 'x' else None\n"
        "            for c, a in zip(completions, answer)]\n",
    )
    rewards = Rewards([RewardSpec(function=name, weight=2.0, kwargs={"bonus": 1})])
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "abc"}]] * 2
    columns = {"answer": ["x", "y"], "completion_ids": [[1], [2]]}
    scores = rewards.score(prompts, completions, columns)
    assert scores[0, 0] == 4 and math.isnan(scores[1, 0])  # None: not scored
    assert rewards.total(scores).tolist() == [8, 0]  # weighted; None counts 0
    assert rewards.labels == ["score"]


def test_a_reward_that_raises_or_miscounts_stops_with_one_line(tmp_path):
    raising = reward_file(tmp_path, "def score(prompts, completions, **kw):\n    1 / 0\n")
    with pytest.raises(TrainingError) as err:
        Rewards([RewardSpec(function=raising)]).score(["p"], ["c"], {})
    assert str(err.value) == (
        f"reward {raising} raised ZeroDivisionError: division by zero; fix the function (it is "
        "called as f(prompts, completions, **columns))"
    )
    short = tmp_path / "short.py"
    short.write_text("def score(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(TrainingError) as err:
        Rewards([RewardSpec(function=f"{short}:score")]).score(["p"] * 2, ["a", "b"], {})
    assert str(err.value) == (
        f"reward {short}:score returned 1 values for 2 completions; it must return one float "
        "(or None) per completion"
    )
    with pytest.raises(TrainingError, match=r"reward exact_match: the data has no column 'ans'"):
        Rewards([RewardSpec(function="exact_match", column="ans")]).score(["p"], ["c"], {"x": [1]})
    with pytest.raises(TrainingError, match=r"no function 'nope'"):
        Rewards([RewardSpec(function=f"{short}:nope")])


def test_reward_and_data_settings_are_checked_before_the_run(tmp_path, tiny_dir):
    with pytest.raises(ValidationError, match="unknown reward 'exact'"):
        RewardSpec(function="exact")
    with pytest.raises(ValidationError, match="function regex needs pattern"):
        RewardSpec(function="regex")
    with pytest.raises(ValidationError, match="num_generations"):
        config(num_generations=1)
    raw = {
        "model": {"path": str(tiny_dir)},
        "data": {"datasets": [{"path": "p.jsonl", "format": "prompt"}], "packing": True},
        "objective": {"name": "grpo", "rewards": [{"function": "exact_match"}]},
    }
    with pytest.raises(ConfigError, match="data.packing cannot be used with objective grpo"):
        config_from_dict(raw)
    raw["objective"] = "sft"
    raw["data"]["packing"] = False
    with pytest.raises(ConfigError, match="set objective.name to grpo"):
        config_from_dict(raw)


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        i = int(torch.randint(0, len(WORDS) - 1, (1,), generator=g))
        rows.append({"prompt": f"after {WORDS[i]}", "answer": WORDS[i + 1], "i": i})
    return rows


def grpo_config(tmp_path, tiny_dir, name="out", **objective):
    write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))
    write_jsonl(tmp_path / "prompts_val.jsonl", prompt_rows(4, seed=1))
    return make_config(
        tmp_path,
        tiny_dir,
        data={
            "datasets": [{"path": str(tmp_path / "prompts.jsonl")}],
            "validation": [{"path": str(tmp_path / "prompts_val.jsonl")}],
        },
        objective={
            "name": "grpo",
            "num_generations": 4,
            "max_completion_tokens": 6,
            "rewards": [
                {"function": "exact_match"},
                {"function": "length", "limit": 3, "weight": 0.5},
            ],
            **objective,
        },
        train={
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "log_every_steps": 1,
            "save_every_steps": 1,
            "lr": 1e-2,
        },
        eval={"every_steps": 2, "show_samples": 2},
        output_dir=str(tmp_path / name),
    )


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_dir):
    """A GRPO run with two passes per round (old log-probabilities), a KL term and two
    rewards, checkpointing every step."""
    tmp = tmp_path_factory.mktemp("grpo")
    cfg = grpo_config(tmp, tiny_dir, num_iterations=2, beta=0.1, temperature=1.5)
    return tmp, cfg, train(cfg, progress=quiet())


def test_a_run_logs_rewards_lengths_clipping_kl_and_completions(grpo_run):
    tmp, cfg, summary = grpo_run
    out = Path(cfg.output_dir)
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        for key in (
            "reward",
            "reward_std",
            "reward_exact_match",
            "reward_length",
            "reward_length_std",
            "completion_length",
            "completion_clipped",
            "clip_ratio",
            "kl",
        ):
            assert key in e, key
        assert 0 < e["completion_length"] <= 6
        assert -1 <= e["reward_length"] <= 0
    assert steps[0]["kl"] == 0  # the adapter starts at zero: the policy is the reference
    assert steps[0]["reward"] == steps[1]["reward"]  # a round of two passes: one generation
    assert steps[1]["clip_ratio"] >= 0
    vals = [e for e in entries if "val_reward" in e]
    assert [e["step"] for e in vals] == [0, 2, 4]
    assert {"val_reward_exact_match", "val_reward_length", "val_completion_length"} <= set(vals[0])
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert samples[0]["prompt"] == prompt_rows(4, seed=1)[0]["prompt"]
    assert set(samples[0]["rewards"]) == {"exact_match", "length"}
    assert summary["objective"] == "grpo" and summary["final_val_loss"] is None
    assert summary["final_val_reward"] == vals[-1]["val_reward"]
    assert (out / "checkpoints/step-000003/rollout.safetensors").is_file()  # inside a round
    assert not (out / "checkpoints/step-000004/rollout.safetensors").exists()


def test_a_run_resumed_inside_a_round_trains_on_the_same_samples(grpo_run, tiny_dir):
    tmp, cfg, _ = grpo_run
    out = Path(cfg.output_dir)
    again = tmp / "again"
    shutil.copytree(out, again)
    for name in ("step-000004", "step-000002"):
        shutil.rmtree(again / "checkpoints" / name, ignore_errors=True)
    shutil.rmtree(again / "adapter")
    resumed = cfg.model_copy(update={"output_dir": str(again)})
    train(resumed, resume=str(again / "checkpoints/step-000003"), progress=quiet())
    first = load_file(out / "adapter/adapter_model.safetensors")
    second = load_file(again / "adapter/adapter_model.safetensors")
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_max_seq_len_without_room_for_a_prompt_is_refused(tmp_path, tiny_dir):
    cfg = grpo_config(tmp_path, tiny_dir)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_len": 6})})
    with pytest.raises(DataError) as err:
        train(cfg, progress=quiet())
    assert str(err.value) == (
        "data.max_seq_len (6) leaves no room for a prompt beside "
        "objective.max_completion_tokens (6); raise max_seq_len"
    )


def test_the_batch_holds_prompt_and_completion_with_only_the_completion_labelled(grpo_run):
    from tunesmith.train.loop import make_run

    tmp, cfg, _ = grpo_run
    run = make_run(cfg.model_copy(update={"output_dir": str(tmp / "peek")}), progress=quiet())
    run.setup()
    try:
        batches = run.plan.micro_batches(0)
        assert len(batches) == 2
        batch = batches[0]
        assert batch["input_ids"].shape[0] == 2 * 4  # 2 prompts x 4 completions
        assert batch[ADVANTAGES].shape == (8,)
        (_, micro) = run.plan.round_of(0)
        prompt = run.prepared.train[micro[0][0]].ids
        assert batch["labels"][0, : len(prompt)].tolist() == [-100] * len(prompt)
        assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
        assert (batch["labels"][0, len(prompt) :] != -100).sum() >= 1
    finally:
        run.close()


@pytest.mark.slow  # .ci/run runs it once, at the newest transformers: about a minute
def test_grpo_raises_the_held_out_exact_match_of_a_briefly_supervised_adapter(tmp_path):
    """The README's GRPO example, shortened: the quickstart for one epoch (31% exact on the
    100 held-out questions), then 10 GRPO steps of 32 prompts x 8 completions with an
    exact-match reward; the greedy held-out exact match goes up."""
    import yaml
    from helpers.runs import ROOT

    def load(name: str, **changes) -> dict:
        raw = yaml.safe_load((ROOT / "examples" / name).read_text())
        raw["model"]["path"] = str(ROOT / raw["model"]["path"])
        for key in ("datasets", "validation"):
            for source in raw["data"][key]:
                source["path"] = str(ROOT / source["path"])
        raw["data"]["cache_dir"] = str(tmp_path / "cache")
        for section, values in changes.items():
            if isinstance(values, dict):
                raw[section] = {**raw.get(section, {}), **values}
            else:
                raw[section] = values
        return raw

    sft = load(
        "quickstart.yaml",
        train={"epochs": 1, "save_every_steps": 1000},
        eval={"generate_samples": 0, "every_steps": 1000},
        output_dir=str(tmp_path / "sft"),
    )
    train(config_from_dict(sft), progress=quiet())
    grpo = load(
        "grpo.yaml",
        model={"adapter": str(tmp_path / "sft/adapter")},
        train={"max_steps": 10, "save_every_steps": 10},
        eval={"every_steps": 100},
        output_dir=str(tmp_path / "grpo"),
    )
    summary = train(config_from_dict(grpo), progress=quiet())
    first = json.loads((tmp_path / "grpo/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    assert first["val_reward_exact_match"] == pytest.approx(0.31, abs=0.05)
    assert summary["final_val_reward_exact_match"] >= first["val_reward_exact_match"] + 0.04


def test_the_planner_traces_a_grpo_step_of_prompts_times_completions(tmp_path, tiny_dir):
    from tunesmith.plan.planner import plan_run

    grpo = plan_run(grpo_config(tmp_path, tiny_dir, beta=0.1, num_iterations=2))
    sft = plan_run(make_config(tmp_path, tiny_dir, train={"micro_batch_size": 8}))
    note = next(n for n in grpo.notes if n.startswith("objective grpo"))
    assert "2 prompts x 4 completions (8 sequences of up to max_seq_len" in note
    assert "the sampling policy's log-probabilities and the reference's" in note
    assert note.endswith("time × 1.50 at least")  # 1 + (1/3 x 3 passes) / 2 iterations
    assert grpo.traced.peak_bytes >= sft.traced.peak_bytes * 0.9  # 8 sequences each


def test_trackers_get_the_rewards(tmp_path, tiny_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = grpo_config(tmp_path, tiny_dir)
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"max_steps": 2, "report_to": ["tensorboard"]})
        }
    )
    train(cfg, progress=quiet())
    out = Path(cfg.output_dir)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("train/reward_exact_match")]
    want = [(m["step"], m["reward_exact_match"]) for m in logged if "reward_exact_match" in m]
    assert rewards == [(s, pytest.approx(v, abs=1e-6)) for s, v in want]
    assert [e.step for e in events.Scalars("val/reward")] == [0, 2]
