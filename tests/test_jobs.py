"""Whole jobs (`tunesmith/jobs.py`): `train_job` is what `tunesmith train` runs, for the library
too: the printed header and summary, the end-of-training comparison, the torchrun relaunch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import make_config

from tunesmith import jobs
from tunesmith.config import load_config
from tunesmith.errors import ProcessesFailed, TunesmithError
from tunesmith.threads import default_threads


def test_train_job_trains_prints_and_compares_as_the_command_does(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, eval={"generate_samples": 3, "max_new_tokens": 4})
    printed: list[tuple[str, bool]] = []
    summary = jobs.train_job(config, echo=lambda text="", err=False: printed.append((text, err)))
    out = Path(config.output_dir)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    text = [line for line, err in printed if not err]
    assert any(line.startswith("model ") and "method lora" in line for line in text)
    assert f"done: 6 steps, {summary['tokens']:,} tokens" in "\n".join(text)
    assert any(line.startswith("--- sample 0: ") for line in text)  # the comparison ran
    rows = (out / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 3 and set(json.loads(rows[0])["answers"]) == {"base", "tuned"}


def test_a_relaunch_runs_torchrun_on_the_resolved_config_and_names_a_failure(
    tmp_path, tiny_dir, monkeypatch
):
    config = make_config(tmp_path, tiny_dir)
    seen = {}

    def fake_run(argv):
        seen["argv"] = argv
        seen["config"] = load_config(argv[8])
        return subprocess.CompletedProcess(argv, 3)

    monkeypatch.setattr(jobs.subprocess, "run", fake_run)
    with pytest.raises(ProcessesFailed) as err:
        jobs.train_job(config, nproc=2, resume="latest", overwrite=True)
    assert (str(err.value), err.value.returncode) == ("torchrun with 2 processes exited with 3", 3)
    argv = seen["argv"]
    assert argv[:8] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tunesmith",
        "train",
    ]
    # each process gets its share of the cores (torchrun alone would set OMP_NUM_THREADS=1)
    share = str(default_threads(share=2))
    assert argv[9:] == ["--resume", "latest", "--overwrite", "--threads", share]
    assert seen["config"] == config  # the same run, from a temporary file now removed
    assert not Path(argv[8]).exists()

    command = ["tunesmith", "train", "run.yaml", "train.lr=1e-3"]
    monkeypatch.setattr(
        jobs.subprocess, "run", lambda argv: subprocess.CompletedProcess(seen.update(argv=argv), 0)
    )
    assert jobs.train_job(config, nproc=2, use_cache=False, threads=3, command=command) is None
    expected = ["train", "run.yaml", "train.lr=1e-3", "--no-cache", "--threads", "3"]
    assert seen["argv"][7:] == expected


def test_a_relaunch_inside_torchrun_is_refused(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TunesmithError) as err:
        jobs.train_job(make_config(tmp_path, tiny_dir), nproc=2)
    assert str(err.value) == "--nproc: already running under torchrun; leave --nproc out"
