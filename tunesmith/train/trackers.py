"""Experiment trackers (`train.report_to`): what a run writes to metrics.jsonl, its config and
its evaluation table, sent to TensorBoard, Weights & Biases or MLflow through their own client
libraries (the `tensorboard`, `wandb` and `mlflow` extras).

- tensorboard: event files in output_dir/tensorboard (`tensorboard --logdir OUTPUT_DIR`).
- wandb: `wandb.init` in output_dir; WANDB_MODE=offline keeps it on this machine
  (`wandb sync` uploads later), WANDB_PROJECT names the project (default tunesmith).
- mlflow: MLFLOW_TRACKING_URI when set, else a local store in output_dir (mlflow.db, and
  mlartifacts/ for the config and evaluation table); MLFLOW_EXPERIMENT_NAME (default
  tunesmith).

A resumed run continues the same tracker run (ids kept in output_dir/trackers.json); the
TensorBoard writer drops events logged after the checkpoint it resumes from.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path

from tunesmith.errors import TunesmithError, first_line
from tunesmith.io import atomic_write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE_FILE = "trackers.json"
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _scalars(entry: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl entry, named as trackers show them: train/loss,
    train/lr, …, val/loss, val/ppl (`step` is the x axis)."""
    out = {}
    for key, value in entry.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
        out[name] = float(value)
    return out


def _eval_scalars(evaluation: dict) -> dict[str, float]:
    out = {}
    for column, scores in evaluation.get("columns", {}).items():
        for metric, value in scores.items():
            if isinstance(value, int | float):
                out[f"eval/{column}/{metric}"] = float(value)
    return out


def _eval_rows(evaluation: dict) -> tuple[list[str], list[list]]:
    """The evaluation table: its columns (models) and rows [metric, value per column]."""
    columns = list(evaluation.get("columns", {}))
    metrics = sorted({m for c in columns for m in evaluation["columns"][c]})
    return columns, [[m, *(evaluation["columns"][c].get(m) for c in columns)] for m in metrics]


def _missing(name: str, err: ImportError) -> TunesmithError:
    return TunesmithError(
        f"train.report_to: {name} needs its client library ({err.name} is missing): "
        f'pip install -e ".[{EXTRA[name]}]", or remove {name} from train.report_to'
    )


_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """Import each tracker's client library now, so a missing one stops the run before it
    writes anything (the import is cached for the tracker itself)."""
    for name in names:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as err:
            raise _missing(name, err) from None


class _TensorBoard:
    def __init__(self, out: Path, config: dict, state: dict, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing("tensorboard", err) from None
        self.writer = SummaryWriter(
            str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        if not start_step:
            self.writer.add_text("config", "```yaml\n" + config["yaml"] + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_eval(self, evaluation: dict, step: int) -> None:
        self.log(_eval_scalars(evaluation), step)
        columns, rows = _eval_rows(evaluation)
        lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for metric, *cells in rows:
            shown = ["-" if v is None else f"{v:.4g}" for v in cells]
            lines.append(f"| {metric} | " + " | ".join(shown) + " |")
        self.writer.add_text("evaluation", "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, config: dict, state: dict, start_step: int) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", err) from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tunesmith"),
            name=out.name,
            dir=str(out),
            config=config["data"],
            id=state.get("wandb_id"),
            resume="allow",
        )
        state["wandb_id"] = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_eval(self, evaluation: dict, step: int) -> None:
        import wandb

        for name, value in _eval_scalars(evaluation).items():
            self.run.summary[name] = value
        columns, rows = _eval_rows(evaluation)
        self.run.log({"evaluation": wandb.Table(columns=["metric", *columns], data=rows)})

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """Through an `MlflowClient` of its own: no process-wide tracking URI or active run is
    set, so runs in one process (the Python API) do not leak into each other."""

    def __init__(self, out: Path, config: dict, state: dict, start_step: int) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
        except ImportError as err:
            raise _missing("mlflow", err) from None
        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        self.client = MlflowClient(uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunesmith")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (out / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = state.get("mlflow_run_id")
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        state["mlflow_run_id"] = self.run_id
        if not start_step:
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(config["data"]).items()]
            self.client.log_batch(self.run_id, params=params)
            self.client.log_text(self.run_id, config["yaml"], "config.yaml")

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.metric(k.replace("/", "."), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_eval(self, evaluation: dict, step: int) -> None:
        self.log(_eval_scalars(evaluation), step)
        self.client.log_dict(self.run_id, evaluation, "eval.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_KINDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
HINTS = {
    "tensorboard": "check that output_dir is writable",
    "wandb": "check WANDB_API_KEY (or `wandb login`), or set WANDB_MODE=offline",
    "mlflow": "check MLFLOW_TRACKING_URI (unset: a local store in output_dir)",
}
FIRST_CONTACT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
"""While a tracker starts: a tracking server that does not answer fails in seconds, not after
MLflow's minutes of retries (a user's own settings win)."""


@contextlib.contextmanager
def _first_contact():
    added = [k for k in FIRST_CONTACT if k not in os.environ]
    os.environ.update({k: FIRST_CONTACT[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _start(name: str, out: Path, config: dict, state: dict, start_step: int):
    """Tracker `name`, started; any failure of its library is one line naming it."""
    try:
        with _first_contact():
            return _KINDS[name](out, config, state, start_step)
    except TunesmithError:
        raise
    except Exception as err:  # noqa: BLE001 - each library fails in its own way
        raise TunesmithError(
            f"train.report_to: {name} could not start: {type(err).__name__}: "
            f"{first_line(err)[:300]}; {HINTS[name]}, or remove {name} from train.report_to"
        ) from None


class Trackers:
    """The run's trackers: `log` each metrics.jsonl entry, `log_eval` the evaluation table,
    `close` at the end (idempotent). Rank 0 only."""

    def __init__(self, names: list[str], out: Path, config: dict, start_step: int = 0) -> None:
        self.out = Path(out)
        self.step = start_step
        state_path = self.out / STATE_FILE
        state = json.loads(state_path.read_text()) if start_step and state_path.is_file() else {}
        self.active = []
        try:
            for name in names:
                self.active.append(_start(name, self.out, config, state, start_step))
        except BaseException:
            self.close()
            raise
        if self.active:
            atomic_write_json(state, state_path)

    def log(self, entry: dict) -> None:
        step = int(entry.get("step", self.step))
        self.step = max(self.step, step)
        scalars = _scalars(entry)
        for tracker in self.active:
            tracker.log(scalars, step)

    def log_eval(self, evaluation: dict) -> None:
        for tracker in self.active:
            tracker.log_eval(evaluation, self.step)

    def close(self) -> None:
        active, self.active = self.active, []
        for tracker in active:
            tracker.close()


__all__ = ["STATE_FILE", "TRACKERS", "Trackers", "check_trackers"]
