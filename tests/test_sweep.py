"""`tunesmith sweep`: Optuna searches a run config's `sweep.space`, each trial a normal run. A
6-trial search beats a bad learning rate and writes trials.csv, best.yaml and the plots; two
workers on one sqlite study run each trial once; a killed worker's trial is marked failed and
the study goes on; the planner skips a trial that would not fit; an invalid combination is
recorded, not run; a PostgreSQL study (Debian's server, started here) serves two workers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers.data import write_jsonl
from helpers.runs import ROOT, toy_pairs, toy_rows

from tunesmith.config import ConfigError, load_config
from tunesmith.config.load import read_config_file
from tunesmith.errors import TunesmithError
from tunesmith.jobs import train_job
from tunesmith.judge.run_report import render_report
from tunesmith.sweep import _Trial, metric_value, sweep_job


def _write(tmp_path: Path, tiny_dir: Path, sweep: dict, objective="sft", **train) -> Path:
    """A run config file around the tiny model and the toy task (preference pairs for dpo),
    with `sweep`."""
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        rows = toy_pairs if objective == "dpo" else toy_rows
        write_jsonl(data / "train.jsonl", rows(48))
        write_jsonl(data / "val.jsonl", rows(8, seed=1))
    raw = {
        "model": {"path": str(tiny_dir), "dtype": "fp32", "device": "cpu"},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "objective": objective,
        "data": {
            "datasets": [{"path": str(data / "train.jsonl")}],
            "validation": [{"path": str(data / "val.jsonl")}],
            "max_seq_len": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 1e-6, "log_every_steps": 4} | train,
        "eval": {"every_steps": 4},
        "output_dir": str(tmp_path / "out"),
        "sweep": sweep,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep(path: Path, lines: list[str] | None = None, overrides: list[str] | None = None):
    raw, where = read_config_file(path)
    config = load_config(path, overrides or [])
    echo = (lambda text="", **_: lines.append(text)) if lines is not None else lambda *a, **k: None
    kwargs = {"source": str(path), "lines": where, "overrides": overrides or []}
    return sweep_job(config, raw, echo=echo, **kwargs)


def _rows(path: Path) -> list[dict]:
    with open(path / "out" / "sweep" / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_sweep_finds_a_better_learning_rate_than_a_bad_start(tmp_path, tiny_dir):
    space = {"train.lr": {"low": 1e-4, "high": 5e-2, "log": True}, "method.r": [2, 4, 8]}
    path = _write(tmp_path, tiny_dir, {"trials": 6, "seed": 0, "pruner": "none", "space": space})
    bad = train_job(load_config(path, [f"output_dir={tmp_path / 'bad'}"]), echo=lambda *a, **k: 0)
    lines: list[str] = []
    result = _sweep(path, lines)
    rows = _rows(tmp_path)
    assert [r["trial"] for r in rows] == [str(i) for i in range(6)]
    assert {r["state"] for r in rows} == {"complete"}
    assert result.best["val_loss"] < bad["final_val_loss"] - 0.5  # 1e-6 barely moves it
    for r in rows:  # each trial is a normal run in its own folder, its metric read from it
        folder = tmp_path / "out" / "sweep" / "trials" / f"{int(r['trial']):03d}"
        assert float(r["val_loss"]) == metric_value(folder, "val_loss")
        assert float(r["planned_peak_gib"]) > 0
        assert load_config(folder / "config.yaml").train.lr == float(r["train.lr"])
    best = load_config(tmp_path / "out" / "sweep" / "best.yaml")  # what tunesmith train takes
    assert best.train.lr == result.best["train.lr"] and best.method.r == result.best["method.r"]
    assert best.sweep is None and best.output_dir == str(tmp_path / "out" / "best")
    for name in ("history", "importances", "parallel"):
        assert (tmp_path / "out" / "sweep" / f"{name}.png").stat().st_size > 5000
    assert lines[-1].startswith("sweep done: 6 complete; best trial")
    page = render_report(tmp_path / "out")  # the sweep's folder alone makes a report
    assert '<h2 id="sweep">Sweep</h2>' in page and page.count("data:image/png;base64,") == 3
    assert "6 complete" in page
    again = _sweep(path)  # the study is full: a rerun trains nothing
    assert len(again.trials) == 6


def test_an_invalid_combination_is_recorded_and_not_run(tmp_path, tiny_dir):
    space = {"train.micro_batch_size": [0, 2]}
    path = _write(tmp_path, tiny_dir, {"trials": 1, "sampler": "grid", "space": space})
    # the command line's overrides: the sweep's to the sweep, the others to every trial; a
    # grid of two runs two trials, however many are asked for
    lines: list[str] = []
    _sweep(path, lines, overrides=["sweep.trials=5", "train.max_steps=4"])
    assert "sweep.trials: the grid has 2 combinations; 2 trials it is" in lines
    rows = {r["train.micro_batch_size"]: r for r in _rows(tmp_path)}
    assert rows["0"]["state"] == "invalid"
    assert "train.micro_batch_size: must be > 0" in rows["0"]["note"]
    assert rows["2"]["state"] == "complete"
    folder = next((tmp_path / "out" / "sweep" / "trials").iterdir())
    assert json.loads((folder / "summary.json").read_text())["steps"] == 4
    trials = sorted(p.name for p in (tmp_path / "out" / "sweep" / "trials").iterdir())
    assert len(trials) == 1  # the invalid one made no folder


def test_the_planner_skips_a_trial_that_would_not_fit(tmp_path, tiny_dir):
    from tunesmith.plan.planner import plan_run

    path = _write(tmp_path, tiny_dir, {"trials": 2, "space": {"train.micro_batch_size": [1]}})
    peaks = [
        plan_run(load_config(path, [f"train.micro_batch_size={b}"])).traced.peak_bytes
        for b in (1, 16)
    ]
    assert peaks[1] > peaks[0]
    budget = f"{(peaks[0] + peaks[1]) // 2}B"
    space = {"train.micro_batch_size": [1, 16]}
    path = _write(
        tmp_path, tiny_dir, {"trials": 2, "sampler": "grid", "gpu_mem": budget, "space": space}
    )
    _sweep(path)
    rows = {r["train.micro_batch_size"]: r for r in _rows(tmp_path)}
    assert rows["16"]["state"] == "skipped" and rows["16"]["seconds"] == ""
    assert "does not fit" in rows["16"]["note"]
    assert float(rows["16"]["planned_peak_gib"]) == pytest.approx(peaks[1] / 2**30, rel=1e-3)
    assert rows["1"]["state"] == "complete"
    assert len(list((tmp_path / "out" / "sweep" / "trials").iterdir())) == 1


def test_a_preference_objective_is_swept_on_its_own_metric(tmp_path, tiny_dir):
    space = {"objective.beta": [0.05, 0.5]}
    sweep = {"trials": 2, "sampler": "grid", "metric": "val_reward_accuracy", "space": space}
    path = _write(tmp_path, tiny_dir, sweep, objective="dpo", lr=5e-3)
    result = _sweep(path)
    assert not load_config(path).sweep.minimize  # an accuracy: higher is better
    rows = _rows(tmp_path)
    assert {r["state"] for r in rows} == {"complete"}
    for r in rows:
        folder = tmp_path / "out" / "sweep" / "trials" / f"{int(r['trial']):03d}"
        summary = json.loads((folder / "summary.json").read_text())
        assert float(r["val_reward_accuracy"]) == summary["final_val_reward_accuracy"]
        assert load_config(folder / "config.yaml").objective.beta == float(r["objective.beta"])
    best = max(rows, key=lambda r: float(r["val_reward_accuracy"]))
    assert result.best["val_reward_accuracy"] == float(best["val_reward_accuracy"])


@pytest.mark.slow
def test_each_trial_can_run_on_several_processes(tmp_path, tiny_dir):
    path = _write(tmp_path, tiny_dir, {"trials": 1, "space": {"train.lr": [5e-3]}})
    run = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "sweep", str(path), "--nproc", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out/sweep/trials/000/summary.json").read_text())
    assert summary["processes"] == 2
    assert _rows(tmp_path)[0]["state"] == "complete"


def test_an_unknown_space_key_is_named(tmp_path, tiny_dir):
    path = _write(tmp_path, tiny_dir, {"space": {"train.lrr": [1e-3]}})
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.lrr: not a config key"):
        _sweep(path)
    path = _write(tmp_path, tiny_dir, {"gpu": "5090ti", "space": {"train.lr": [1e-3]}})
    with pytest.raises(TunesmithError, match=r"^sweep.gpu: '5090ti' is not a GPU the planner"):
        _sweep(path)
    path = _write(tmp_path, tiny_dir, {"gpu_mem": "lots", "space": {"train.lr": [1e-3]}})
    with pytest.raises(TunesmithError, match=r"^sweep.gpu_mem: 'lots' is not a size"):
        _sweep(path)


def test_the_pruner_stops_a_trial_behind_the_others():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (1.0, 1.2):
        trial = study.ask()
        trial.report(value, 4)
        study.tell(trial, value)
    trial = study.ask()

    class Sweep:
        metric, pruner = "val_loss", "median"

    hook = _Trial.__new__(_Trial)
    hook.sweep = Sweep()
    report = hook._pruning(trial)
    report(4, {"val_loss": 0.9})  # ahead of the median: goes on
    trial2 = study.ask()
    with pytest.raises(optuna.TrialPruned):
        hook._pruning(trial2)(4, {"val_loss": 5.0})


def test_the_metric_comes_from_summary_eval_or_validation(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"final_val_loss": 0.5, "steps": 3}))
    (tmp_path / "eval.json").write_text(json.dumps({"columns": {"tuned": {"exact_match": 0.7}}}))
    lines = [{"step": 2, "val_reward_accuracy": 0.6}, {"step": 3, "val_reward_accuracy": 0.8}]
    write_jsonl(tmp_path / "metrics.jsonl", lines)
    assert metric_value(tmp_path, "val_loss") == 0.5
    assert metric_value(tmp_path, "exact_match") == 0.7
    assert metric_value(tmp_path, "val_reward_accuracy") == 0.8
    assert metric_value(tmp_path, "rouge_l") is None


def _worker(path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "sweep", str(path), "--threads", "1"],
        cwd=ROOT,
        stdout=open(log, "w"),  # noqa: SIM115 - the process owns it
        stderr=subprocess.STDOUT,
    )


def _ran(tmp_path: Path) -> list[int]:
    """The trial numbers that trained, one entry per run (from every trial log)."""
    done = []
    for log in sorted((tmp_path / "out" / "sweep" / "logs").glob("*.log")):
        done += [int(log.stem)] * log.read_text().count("\ndone: ")
    return done


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study_and_run_each_trial_once(tmp_path, tiny_dir):
    space = {"train.lr": {"low": 1e-4, "high": 5e-2, "log": True}}
    path = _write(tmp_path, tiny_dir, {"trials": 4, "pruner": "none", "space": space})
    workers = [_worker(path, tmp_path / f"worker{i}.txt") for i in range(2)]
    for proc in workers:
        assert proc.wait(timeout=600) == 0
    assert sorted(_ran(tmp_path)) == [0, 1, 2, 3]
    rows = _rows(tmp_path)
    assert [r["state"] for r in rows] == ["complete"] * 4
    said = [(tmp_path / f"worker{i}.txt").read_text() for i in range(2)]
    # the first to finish may see the other's last trial still running; the last sees all
    assert any("sweep done: 4 complete" in text for text in said)
    assert sum(text.count(": training in ") for text in said) == 4


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failed_trial_and_the_study_goes_on(tmp_path, tiny_dir):
    space = {"train.lr": {"low": 1e-4, "high": 5e-2, "log": True}}
    sweep = {"trials": 3, "heartbeat_s": 1, "pruner": "none", "space": space}
    path = _write(tmp_path, tiny_dir, sweep, max_steps=400)
    worker = _worker(path, tmp_path / "killed.txt")
    log = tmp_path / "out" / "sweep" / "logs" / "000.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "step " in log.read_text()):  # trial 0 is training
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    short = path.read_text().replace("max_steps: 400", "max_steps: 8")
    path.write_text(short)
    _sweep(path)
    rows = _rows(tmp_path)
    assert [r["state"] for r in rows] == ["failed", "complete", "complete"]
    assert rows[0]["note"] == "its worker stopped (no heartbeat)"


def _postgres_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").is_file():
            return root
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, tiny_dir):
    pg = _postgres_bin()
    if pg is None:
        if os.environ.get("TUNESMITH_REQUIRE_POSTGRES"):
            pytest.fail("TUNESMITH_REQUIRE_POSTGRES is set and no PostgreSQL server is installed")
        pytest.skip("no PostgreSQL server here (Debian's postgresql package; .ci/run installs it)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (SQLAlchemy's driver) is missing")
    # pytest's folders are its user's alone; PostgreSQL, which refuses to run as root, runs
    # as nobody there, in a folder of its own
    base = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    base.chmod(0o777)
    data = base / "data"
    run_as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*run_as, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "pg"],
        check=True,
        capture_output=True,
    )
    port = 54000 + os.getpid() % 1000
    server = subprocess.Popen(
        [
            *run_as,
            str(pg / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(base),
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"postgresql://pg@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "PostgreSQL did not start"
                time.sleep(0.3)
        space = {"train.lr": {"low": 1e-4, "high": 5e-2, "log": True}}
        sweep = {"trials": 4, "storage": url, "pruner": "none", "space": space}
        path = _write(tmp_path, tiny_dir, sweep)
        workers = [_worker(path, tmp_path / f"worker{i}.txt") for i in range(2)]
        for proc in workers:
            assert proc.wait(timeout=600) == 0
        assert sorted(_ran(tmp_path)) == [0, 1, 2, 3]
        storage = optuna.storages.RDBStorage(url)
        study = optuna.load_study(study_name="out", storage=storage)
        ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
        assert sorted(t.number for t in ran) == [0, 1, 2, 3]
        assert {t.state for t in ran} == {optuna.trial.TrialState.COMPLETE}
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)
