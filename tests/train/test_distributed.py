"""Several processes on CPU (gloo), launched by torchrun as a user launches them: DDP and FSDP
give one process's losses and adapter (LoRA dropout on: its masks are keyed by sample), only
rank 0 writes or prints, FSDP's sharded checkpoints resume on the same and on another number of
processes, a failing rank stops the job with its message, and two "machines" (two torchrun
launches with --nnodes 2) train over loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.data import write_jsonl
from helpers.runs import ROOT, losses, run_cli, toy_pairs, toy_rows
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.registry import method_named
from tunesmith.train.distributed import World, strategy_for

TIMEOUT = 240
pytestmark = pytest.mark.slow  # .ci/run runs these once, at the newest transformers


def _config(tmp_path: Path, tiny_dir: Path, name: str, **train) -> Path:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, toy_rows(48))
        write_jsonl(tmp_path / "val.jsonl", toy_rows(8, seed=1))
    raw = {
        "model": {"path": str(tiny_dir), "dtype": "fp32", "device": "cpu"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # keyed: same masks
        "data": {
            "datasets": [{"path": str(data)}],
            "validation": [{"path": str(tmp_path / "val.jsonl")}],
            "max_seq_len": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "lr": 5e-3,
            "log_every_steps": 1,
            **train,
        },
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _dpo_config(tmp_path: Path, tiny_dir: Path, name: str, **train) -> Path:
    """`_config` with objective dpo on preference pairs."""
    path = _config(tmp_path, tiny_dir, name, **train)
    raw = yaml.safe_load(path.read_text())
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_jsonl(pairs, toy_pairs(24))
        write_jsonl(tmp_path / "pairs_val.jsonl", toy_pairs(6, seed=1))
    raw["objective"] = {"name": "dpo", "beta": 0.5}
    raw["data"]["datasets"] = [{"path": str(pairs)}]
    raw["data"]["validation"] = [{"path": str(tmp_path / "pairs_val.jsonl")}]
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(*args: str, nproc: int = 2, script: list[str] | None = None, **kwargs):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *(script or ["-m", "tunesmith"]),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, **kwargs)


def _adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _resume_elsewhere(run, config: Path, keep: Path, out: Path, said: str, straight: list):
    """Resume from `keep` with `run`, on another number of processes than wrote it: the run
    must say `said` and give the straight run's losses within 1e-5."""
    resumed = run("train", str(config), "--resume", str(keep))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert said in resumed.stderr
    assert losses(out) == pytest.approx(straight, abs=1e-5)


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= atol, key


@pytest.mark.parametrize(
    ("strategy", "atol", "accum"), [("ddp", 1e-5, 3), ("fsdp", 1e-4, 2)]
)  # ddp with 3 micro-batches a step: one rank takes two, the other one and a zero-weight pass
def test_two_processes_train_like_one(tmp_path, tiny_dir, strategy, atol, accum):
    one = _config(tmp_path, tiny_dir, "one", grad_accum_steps=accum)
    two = _config(tmp_path, tiny_dir, "two", grad_accum_steps=accum, distributed=strategy)
    single = run_cli("train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    if strategy == "ddp":  # the convenience wrapper
        double = run_cli("train", str(two), "--nproc", "2", timeout=TIMEOUT)
    else:
        double = _torchrun("train", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=atol)
    _assert_same_adapter(_adapter(tmp_path / "two"), _adapter(tmp_path / "one"), atol)
    # only rank 0 speaks and writes: one header, one summary, one line per step
    out = double.stdout + double.stderr
    assert out.count(f"processes: 2 ({strategy}), rank 0 reporting") == 1
    assert out.count("done: 4 steps") == 1
    assert len(losses(tmp_path / "two")) == 4
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"]) == (2, strategy)
    assert (
        summary["tokens"] == json.loads((tmp_path / "one" / "summary.json").read_text())["tokens"]
    )


@pytest.mark.parametrize(("strategy", "atol"), [("ddp", 1e-5), ("fsdp", 1e-4)])
def test_two_processes_train_dpo_like_one(tmp_path, tiny_dir, strategy, atol):
    """A preference objective under DDP and FSDP: each rank scores its pairs against the
    reference (the adapter switched off, through the wrapped module), and the step's loss is
    normalised by the pairs of all ranks: the same losses, metrics and adapter as one process."""
    one = _dpo_config(tmp_path, tiny_dir, "one", grad_accum_steps=3)
    two = _dpo_config(tmp_path, tiny_dir, "two", grad_accum_steps=3, distributed=strategy)
    single = run_cli("train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun("train", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=atol)
    _assert_same_adapter(_adapter(tmp_path / "two"), _adapter(tmp_path / "one"), atol)
    read = lambda name: [  # noqa: E731
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    for a, b in zip(read("one"), read("two"), strict=True):
        for key in ("reward_accuracy", "reward_margin", "val_reward_accuracy", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), key


def _objective_config(tmp_path: Path, tiny_dir: Path, name: str, objective: str, **train):
    """`_config` with objective grpo on prompts (two rewards, KL, two passes a round) or
    distill from a teacher (a second random tiny model with the same tokenizer)."""
    path = _config(tmp_path, tiny_dir, name, **train)
    raw = yaml.safe_load(path.read_text())
    if objective == "grpo":
        prompts = tmp_path / "prompts.jsonl"
        rows = [{"prompt": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
                for r in toy_rows(16)]  # fmt: skip
        write_jsonl(prompts, rows)
        write_jsonl(tmp_path / "prompts_val.jsonl", rows[:4])
        raw["objective"] = {
            "name": "grpo",
            "num_generations": 4,
            "max_completion_tokens": 6,
            "temperature": 1.5,
            "beta": 0.1,
            "num_iterations": 2,
            "rewards": [{"function": "exact_match"}, {"function": "length", "limit": 3}],
        }
        raw["data"]["datasets"] = [{"path": str(prompts)}]
        raw["data"]["validation"] = [{"path": str(tmp_path / "prompts_val.jsonl")}]
    else:
        teacher = tmp_path / "teacher"
        if not teacher.exists():
            shutil.copytree(tiny_dir, teacher)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(teacher)
            for p in model.parameters():
                p.data.mul_(1.5)
            model.save_pretrained(teacher)
        raw["objective"] = {"name": "distill", "teacher": str(teacher), "loss": "jsd"}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("objective", ["grpo", "distill"])
def test_two_processes_train_grpo_and_distill_like_one(tmp_path, tiny_dir, objective):
    """GRPO: each process generates its own micro-batches (a sample's seed does not depend on
    the process); distillation: each runs the teacher on its own. The same losses, metrics
    and adapter as one process."""
    one = _objective_config(tmp_path, tiny_dir, "one", objective)
    two = _objective_config(tmp_path, tiny_dir, "two", objective, distributed="ddp")
    single = run_cli("train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun("train", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    _assert_same_adapter(_adapter(tmp_path / "two"), _adapter(tmp_path / "one"), 1e-5)
    read = lambda name: [  # noqa: E731
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    keys = ("reward", "reward_std", "completion_length", "kl", "clip_ratio", "val_reward",
            "agreement", "val_kl", "val_agreement", "tokens")  # fmt: skip
    for a, b in zip(read("one"), read("two"), strict=True):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), key


def test_fsdp_checkpoints_resume_exactly_and_on_another_number_of_processes(tmp_path, tiny_dir):
    config = _config(tmp_path, tiny_dir, "run", distributed="fsdp", save_every_steps=2)
    first = _torchrun("train", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    step2 = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (step2 / ".metadata").is_file() and len(list(step2.glob("*.distcp"))) == 2
    assert json.loads((step2 / "trainer_state.json").read_text())["format"] == "dcp"
    straight = losses(tmp_path / "run")
    keep = tmp_path / "step2"
    shutil.copytree(step2, keep)
    again = _torchrun("train", str(config), "--resume", str(keep))
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(tmp_path / "run") == straight  # bit-identical on CPU
    _resume_elsewhere(
        run_cli,
        config,
        keep,
        tmp_path / "run",
        "the checkpoint was written by 2 process(es) and this run has 1: its shards are "
        "resharded to this run's processes",
        straight,
    )


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path, tiny_dir):
    config = _config(tmp_path, tiny_dir, "run", distributed="ddp", dist_timeout_s=60)
    run = _torchrun("train", str(config), script=[str(ROOT / "tests/helpers/failing_rank.py")])
    assert run.returncode != 0
    assert "error: rank 1: step 2: a planted failure on this rank" in run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_over_loopback(tmp_path, tiny_dir):
    one = _config(tmp_path, tiny_dir, "one")
    two = _config(tmp_path, tiny_dir, "two", distributed="ddp")
    assert run_cli("train", str(one)).returncode == 0
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=tunesmith-test",
                "-m",
                "tunesmith",
                "train",
                str(two),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_a_sharded_qlora_base_is_refused_with_what_to_use():
    with pytest.raises(TunesmithError) as err:
        strategy_for("fsdp", method_named("qlora"), World(0, 2, 0))
    assert str(err.value).startswith(
        "train.distributed: fsdp cannot shard method qlora's base: bitsandbytes keeps each 4-bit "
        "weight as one packed tensor"
    )
    assert strategy_for("auto", method_named("qlora"), World(0, 2, 0)) == "ddp"
    assert strategy_for("auto", method_named("full"), World(0, 2, 0)) == "fsdp"
    assert strategy_for("fsdp", method_named("lora"), World()) == "none"
    # auto shards an adapter run's base when it does not fit one GPU (QLoRA's cannot be)
    assert strategy_for("auto", method_named("lora"), World(0, 2, 0), fits=False) == "fsdp"
    assert strategy_for("auto", method_named("qlora"), World(0, 2, 0), fits=False) == "ddp"


def test_fsdp_shards_every_decoder_layer_and_the_loss_module_with_the_policies(monkeypatch):
    """What `wrap` asks of FSDP2: one unit per decoder layer and the loss module as the root,
    fp32 master weights through a bf16 mixed-precision policy, and the CPU offload policy only
    for GPU processes that ask for it."""
    import torch
    from helpers.models import make_model

    from tunesmith.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "fully_shard", lambda module, **kw: calls.append((module, kw)))
    model = make_model("llama")
    root = distributed.wrap(
        model,
        "fsdp",
        World(0, 2, 0),
        "cuda:0",
        torch.bfloat16,
        True,
        lambda m, b: None,
        cpu_offload=True,
    )
    assert [m for m, _ in calls] == [*model.model.layers, root] and root.model is model
    policy = calls[0][1]["mp_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert type(calls[0][1]["offload_policy"]).__name__ == "CPUOffloadPolicy"
    calls.clear()
    distributed.wrap(
        model,
        "fsdp",
        World(0, 2, 0),
        "cpu",
        torch.float32,
        True,
        lambda m, b: None,
        cpu_offload=True,
    )
    assert "offload_policy" not in calls[0][1]  # CPU processes have nothing to offload to


def test_ddp_resumes_a_one_process_checkpoint_on_two_processes(tmp_path, tiny_dir):
    """Under DDP the state is replicated: rank 0 writes the usual checkpoint, and a run on
    another number of processes loads it whole on every rank."""
    config = _config(tmp_path, tiny_dir, "run", distributed="ddp", save_every_steps=2)
    single = run_cli("train", str(config))
    assert single.returncode == 0, single.stderr[-3000:]
    straight, straight_adapter = losses(tmp_path / "run"), _adapter(tmp_path / "run")
    keep = tmp_path / "step2"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-000002", keep)
    _resume_elsewhere(
        _torchrun,
        config,
        keep,
        tmp_path / "run",
        "the checkpoint was written by 1 process(es) and this run has 2: the checkpoint holds "
        "the whole state and every process loads it",
        straight,
    )
    _assert_same_adapter(_adapter(tmp_path / "run"), straight_adapter, 1e-5)
