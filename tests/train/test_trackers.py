"""train.report_to: TensorBoard's event files, a W&B offline run and an MLflow store read back
after a real `tunesmith train`, each holding what metrics.jsonl holds, the config and the
evaluation table."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from helpers.runs import make_config, run_cli

from tunesmith.config import config_yaml

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(path):
    """The records of a .wandb file (a LevelDB-style log: a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header: CRC-32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize(
    "tracker, env, expected",
    [
        (
            "mlflow",
            {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
            "error: train.report_to: mlflow could not start: MlflowException: API request to "
            "http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name failed",
        ),
        (
            "mlflow",
            {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/a-file/mlflow.db"},  # under a file
            "error: train.report_to: mlflow could not start: ",
        ),
        (
            "wandb",
            {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": ""},
            "error: train.report_to: wandb could not start: UsageError: No API key configured",
        ),
    ],
)
def test_a_tracker_that_cannot_start_stops_the_run_in_one_line(
    tmp_path, tiny_dir, monkeypatch, tracker, env, expected
):
    """Before the model loads, and nothing is left behind: output_dir did not exist, and does
    not now."""
    port = _closed_port()
    cfg = make_config(tmp_path, tiny_dir, train={"report_to": [tracker], "max_steps": 2})
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("not a folder")
    env = {k: v.format(port=port, tmp=tmp_path) for k, v in env.items()}
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(expected.format(port=port)), line
    assert line.endswith(f", or remove {tracker} from train.report_to")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # another tool's run: once in .ci/run, at the newest transformers
def test_trackers_get_the_metrics_config_and_evaluation(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(
        tmp_path,
        tiny_dir,
        train={
            "max_steps": 4,
            "log_every_steps": 1,
            "report_to": ["tensorboard", "wandb", "mlflow"],
        },
        eval={"every_steps": 2, "generate_samples": 3, "max_new_tokens": 4},
    )
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    result = run_cli("train", str(config), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m for m in metrics if "loss" in m}
    val = {m["step"]: m for m in metrics if "val_loss" in m}
    evaluation = json.loads((out / "eval.json").read_text())
    assert sorted(train) == [1, 2, 3, 4] and sorted(val) == [2, 4]

    # TensorBoard: scalars as float32, the config and the table as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(s, pytest.approx(train[s]["loss"], rel=1e-6)) for s in (1, 2, 3, 4)]
    assert [e.step for e in events.Scalars("val/ppl")] == [2, 4]
    tuned = events.Scalars("eval/tuned/rouge_l")[0].value
    assert tuned == pytest.approx(evaluation["columns"]["tuned"]["rouge_l"], rel=1e-6)
    assert set(events.Tags()["tensors"]) >= {"config/text_summary", "evaluation/text_summary"}

    # W&B offline: the run's config, every history row and the evaluation summary
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in row:
                history[row["_step"]] = row
    assert {s: h["train/loss"] for s, h in history.items()} == pytest.approx(
        {s: m["loss"] for s, m in train.items()}
    )
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config_items = {_key(i): json.loads(i.value_json) for i in runs[0].config.update}
    assert config_items["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["eval/base/exact_match"] == evaluation["columns"]["base"]["exact_match"]

    # MLflow: a local store in output_dir with params, metric history and artifacts
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    history = client.get_metric_history(run_id, "train.loss")
    assert [(m.step, m.value) for m in history] == [(s, train[s]["loss"]) for s in (1, 2, 3, 4)]
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "4"
    assert run.data.metrics["eval.tuned.contains"] == evaluation["columns"]["tuned"]["contains"]
    artifacts = out / "mlartifacts"
    (saved,) = artifacts.rglob("eval.json")
    assert json.loads(saved.read_text()) == evaluation
    (saved_config,) = artifacts.rglob("config.yaml")
    assert yaml.safe_load(saved_config.read_text())["train"]["max_steps"] == 4


def test_a_missing_tracker_library_is_named(tmp_path, tiny_dir):
    cfg = make_config(tmp_path, tiny_dir, train={"report_to": ["wandb"]})
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    code = (
        "import sys; sys.modules['wandb'] = None; from tunesmith.cli import main; "
        f"sys.argv = ['tunesmith', 'train', {str(config)!r}]; main()"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.report_to: wandb needs its client library (wandb is missing): "
        'pip install -e ".[wandb]", or remove wandb from train.report_to'
    )
    assert not (tmp_path / "out").exists()  # stopped before output_dir held anything


@pytest.mark.slow  # another tool's run: once in .ci/run, at the newest transformers
def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, tiny_dir, monkeypatch):
    """Killed after logging step 5, resumed from the step-4 checkpoint: TensorBoard drops the
    first step 5 and holds each step once; MLflow continues the same run."""
    import mlflow
    from helpers.runs import quiet
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunesmith.train.loop import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = {
        "max_steps": 8,
        "save_every_steps": 4,
        "micro_batch_size": 2,
        "log_every_steps": 1,
        "report_to": ["tensorboard", "mlflow"],
    }
    cfg = make_config(tmp_path, tiny_dir, train=settings)
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def kill_at_5(step, entry):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_5, progress=quiet())
    first_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    train(cfg, resume="latest", progress=quiet())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(loss) == list(range(1, 9))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s, pytest.approx(loss[s], rel=1e-6)) for s in range(1, 9)]
    assert json.loads((out / "trackers.json").read_text())["mlflow_run_id"] == first_id
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(first_id, "train.loss")
    assert {m.step: m.value for m in history} == loss  # step 5 twice, the same value (exact resume)
    assert client.get_run(first_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(first_id).info.experiment_id])) == 1
