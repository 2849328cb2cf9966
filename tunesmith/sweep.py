"""Hyperparameter sweeps: `tunesmith sweep run.yaml` searches the run config's `sweep.space` with
Optuna, each trial one normal training run.

A worker (one `tunesmith sweep` process) takes trials from the study in `sweep.storage` until
the study holds `sweep.trials` of them: several workers, on one machine or several (PostgreSQL
storage), pointed at the same storage share the study, and each trial runs once. For each
trial the worker

1. samples every `sweep.space` key (a dotted config path) and builds the trial's config from
   the file's mapping, validated by the schema `tunesmith train` uses: an invalid combination
   is recorded (state `invalid`, with the schema's message) and skipped;
2. asks the planner (`tunesmith plan`) for the trial's peak memory on `sweep.gpu` /
   `sweep.gpu_mem`, or the GPU in use: a trial that would not fit is recorded (state
   `skipped`, with the planned figure) and never started;
3. trains it into `OUTPUT_DIR/sweep/trials/NNN/` (its log in `sweep/logs/NNN.log`), reporting
   the validation loss every `eval.every_steps` to the pruner, which may stop it (`pruned`);
4. reads `sweep.metric` from the run's summary.json, eval.json or validation metrics.

A worker that is killed leaves its trial running in the storage; its heartbeat stops, and the
next worker to take a trial marks it failed (after twice `sweep.heartbeat_s`). Running the
command again continues the study. Each worker writes `sweep/trials.csv` (every trial's
parameters, state, metric, time and planned memory), `sweep/best.yaml` (the best trial's
complete run config, for `tunesmith train`) and, when it finishes, Optuna's plots
(optimisation history, parameter importances, parallel coordinates) for `tunesmith report`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from tunesmith.config import ConfigError, RunConfig, config_from_dict, config_yaml
from tunesmith.config.load import set_path
from tunesmith.config.schema import SweepRange, SweepSection
from tunesmith.errors import TunesmithError, first_line
from tunesmith.io import atomic_write, atomic_write_text
from tunesmith.jobs import train_job
from tunesmith.plan.gpus import gpu
from tunesmith.shards import parse_size

Echo = Callable[..., None]

STATES = ("complete", "pruned", "skipped", "invalid", "failed", "running")
PLOTS = {
    "history": "optimisation history",
    "importances": "parameter importances",
    "parallel": "parallel coordinates",
}
"""The images a worker draws when it finishes: sweep/<name>.png."""


@dataclass
class SweepResult:
    study: str
    storage: str
    trials: list[dict]
    """trials.csv's rows."""
    best: dict | None
    """The best complete trial's row, or None."""
    folder: Path


def storage_url(config: RunConfig) -> str:
    sweep = config.sweep
    if sweep.storage:
        return sweep.storage
    return f"sqlite:///{(Path(config.output_dir) / 'sweep' / 'sweep.db').resolve()}"


def study_name(config: RunConfig) -> str:
    return config.sweep.study or Path(config.output_dir).resolve().name


def sweep_job(
    config: RunConfig,
    raw: dict[str, Any],
    *,
    source: str = "<config>",
    lines: dict[tuple, int] | None = None,
    overrides: Sequence[str] = (),
    nproc: int = 1,
    threads: int | None = None,
    echo: Echo = print,
) -> SweepResult:
    """Run trials of `config.sweep` until the study has `sweep.trials` (see the module's text).
    `raw`: the config file's mapping (each trial sets its keys in a copy), `overrides`: the
    command line's, applied to every trial."""
    sweep = config.sweep
    if sweep is None:
        raise TunesmithError(
            f"{source}: no sweep: section; add one with at least sweep.space (docs/sweeps.md)"
        )
    # the command line's sweep.* overrides are the sweep's; each trial takes the others
    overrides = [o for o in overrides if o.partition("=")[0].split(".")[0] != "sweep"]
    _check_space(sweep, raw, source, lines, overrides)
    out = Path(config.output_dir) / "sweep"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    url = storage_url(config)
    study = _study(config, url)
    target = _planning_target(sweep)
    echo(
        f"sweep {study.study_name!r} in {_shown(url)}: {sweep.trials} trials, "
        f"{'minimize' if sweep.minimize else 'maximize'} {sweep.metric}, sampler "
        f"{sweep.sampler}, pruner {sweep.pruner}"
        + ("" if config.eval.every_steps else " (no eval.every_steps: nothing to prune on)")
        + (
            f" (--nproc {nproc}: the processes' validations do not reach the pruner; trials run "
            "to their end)"
            if nproc > 1 and sweep.pruner != "none"
            else ""
        )
    )
    limit = sweep.trials
    if sweep.sampler == "grid":  # a grid gone through has nothing new to try
        limit = min(limit, math.prod(len(values) for values in _grid(sweep).values()))
        if limit < sweep.trials:
            echo(f"sweep.trials: the grid has {limit} combinations; {limit} trials it is")
    trial_fn = _Trial(config, raw, source, lines, overrides, nproc, threads, echo, out, target)
    trial_fn.limit = limit
    while len(study.get_trials(deepcopy=False)) < limit:
        study.optimize(trial_fn, n_trials=1, catch=(Exception,))
        write_outputs(study, config, raw, source, lines, overrides, out, plots=False)
    rows = write_outputs(study, config, raw, source, lines, overrides, out, plots=True)
    complete = [r for r in rows if r["state"] == "complete"]
    best = None
    if complete:
        best = (min if sweep.minimize else max)(complete, key=lambda r: r[sweep.metric])
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    echo(
        f"sweep done: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}; "
        + (
            f"best trial {best['trial']}: {sweep.metric} {best[sweep.metric]:.6g} "
            f"({_params_text(best, sweep)}); wrote {out / 'trials.csv'} and {out / 'best.yaml'}"
            if best
            else "no trial completed"
        )
    )
    return SweepResult(study.study_name, url, rows, best, out)


def _shown(url: str) -> str:
    """The storage URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


def _check_space(sweep: SweepSection, raw, source, lines, overrides) -> None:
    """Every space key names a config key: the base config with each key at its first value
    validates, or the error names the key."""
    problems = []
    for key, spec in sweep.space.items():
        trial_raw = _without_sweep(raw)
        first = spec[0] if isinstance(spec, list) else spec.low
        try:
            set_path(trial_raw, key, first, f"sweep.space.{key}")
            config_from_dict(trial_raw, overrides, source, lines)
        except ConfigError as err:
            unknown = [p for p in err.problems if "unknown key" in p or "not a section" in p]
            problems += [f"sweep.space.{key}: not a config key ({p})" for p in unknown[:1]]
    if problems:
        raise ConfigError(problems)


def _without_sweep(raw: dict) -> dict:
    out = copy.deepcopy(raw)
    out.pop("sweep", None)
    return out


def _study(config: RunConfig, url: str) -> optuna.Study:
    sweep = config.sweep
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial's failure: our own line
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several workers write at once: wait for the lock
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(5):  # workers starting together race to create the tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=sweep.heartbeat_s,
                    grace_period=2 * sweep.heartbeat_s,
                    **kwargs,
                )
            break
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors, a missing driver
            racing = any(word in str(err) for word in ("IntegrityError", "already exists"))
            if attempt == 4 or not racing:
                raise TunesmithError(
                    f"sweep.storage: cannot open {_shown(url)}: {first_line(err)}"
                ) from None
            time.sleep(0.5 + random.random())
    seed = sweep.seed
    if seed is None:  # workers must not repeat each other's samples
        seed = random.SystemRandom().randrange(2**31)
    if sweep.sampler == "grid":
        sampler = optuna.samplers.GridSampler(_grid(sweep), seed=seed)
    elif sweep.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }[sweep.pruner]()
    return optuna.create_study(
        study_name=study_name(config),
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize" if sweep.minimize else "maximize",
        load_if_exists=True,
    )


def _grid(sweep: SweepSection) -> dict[str, list]:
    grid = {}
    for key, spec in sweep.space.items():
        if isinstance(spec, list):
            grid[key] = spec
        elif spec.step is None:
            raise TunesmithError(
                f"sweep.space.{key}: sampler grid needs a list of values or a range with a step"
            )
        else:
            count = int(math.floor((spec.high - spec.low) / spec.step + 1e-9)) + 1
            values = [spec.low + i * spec.step for i in range(count)]
            grid[key] = [int(v) for v in values] if spec.integer else values
    return grid


def _suggest(trial: optuna.Trial, key: str, spec: list | SweepRange) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    if spec.integer:
        return trial.suggest_int(key, spec.low, spec.high, step=spec.step or 1, log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def _planning_target(sweep: SweepSection) -> tuple[str | None, str | None]:
    """(GPU name, memory) the planner checks each trial against; the GPU in use by default."""
    if sweep.gpu or sweep.gpu_mem:
        try:
            if sweep.gpu:
                gpu(sweep.gpu)
            if sweep.gpu_mem:
                parse_size(sweep.gpu_mem, "sweep.gpu_mem")
        except TunesmithError as err:
            message = str(err).replace("--gpu-mem (", "sweep.gpu_mem (")
            raise TunesmithError(message.replace("--gpu:", "sweep.gpu:", 1)) from None
        return sweep.gpu, sweep.gpu_mem
    if torch.cuda.is_available():
        return None, f"{torch.cuda.get_device_properties(0).total_memory}B"
    return None, None


def trial_config(raw, params: dict, source, lines, overrides) -> RunConfig:
    """The run config of a trial with `params` (dotted keys), its sweep section left out."""
    trial_raw = _without_sweep(raw)
    for key, value in params.items():
        set_path(trial_raw, key, value, f"sweep.space.{key}")
    return config_from_dict(trial_raw, overrides, source, lines)


class _Trial:
    """The objective Optuna calls for each trial."""

    def __init__(self, config, raw, source, lines, overrides, nproc, threads, echo, out, target):
        self.config, self.raw, self.source, self.lines = config, raw, source, lines
        self.overrides, self.nproc, self.threads, self.echo = overrides, nproc, threads, echo
        self.out, self.target = out, target
        self.sweep: SweepSection = config.sweep
        self.limit = self.sweep.trials
        """Trials in the study at most (a grid's size, when smaller)."""

    def __call__(self, trial: optuna.Trial) -> float:
        sweep = self.sweep
        if trial.number >= self.limit:  # another worker took the last one meanwhile
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned()
        params = {key: _suggest(trial, key, spec) for key, spec in sweep.space.items()}
        name = f"{trial.number:03d}"
        folder = self.out / "trials" / name
        label = f"trial {name} ({_params_text(params, sweep)})"
        try:
            overrides = [*self.overrides, f"output_dir={folder}"]
            config = trial_config(self.raw, params, self.source, self.lines, overrides)
        except (ConfigError, TunesmithError) as err:
            note = "; ".join(getattr(err, "problems", None) or [str(err)])
            return self._not_run(trial, label, "invalid", note)
        planned = self._plan(trial, config)
        if planned is not None:
            return self._not_run(trial, label, "skipped", planned)
        self.echo(f"{label}: training in {folder}")
        log = self.out / "logs" / f"{name}.log"
        started = time.monotonic()
        try:
            with open(log, "a", encoding="utf-8") as handle, redirect_stderr(handle):

                def to_log(text: str = "", err: bool = False, **_) -> None:
                    handle.write(f"{text}\n")
                    handle.flush()

                train_job(
                    config,
                    nproc=self.nproc,
                    threads=self.threads,
                    echo=to_log,
                    on_validation=self._pruning(trial),
                )
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            self.echo(f"{label}: pruned (validation behind the other trials)")
            raise
        except Exception as err:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            trial.set_user_attr("note", f"{type(err).__name__}: {first_line(err)}")
            self.echo(f"{label}: failed: {first_line(err)} (log: {log})")
            raise
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        value = metric_value(folder, sweep.metric)
        if value is None:
            note = (
                f"sweep.metric {sweep.metric!r} is not in {folder}'s summary.json, eval.json or "
                "validation metrics (scores need eval.generate_samples; validation needs data)"
            )
            trial.set_user_attr("note", note)
            self.echo(f"{label}: failed: {note}")
            raise TunesmithError(note)
        self.echo(f"{label}: {sweep.metric} {value:.6g}")
        return value

    def _not_run(self, trial, label: str, state: str, note: str) -> float:
        trial.set_user_attr("state", state)
        trial.set_user_attr("note", note)
        self.echo(f"{label}: {state}: {note}")
        raise optuna.TrialPruned()

    def _plan(self, trial: optuna.Trial, config: RunConfig) -> str | None:
        """Record the planner's figures; the reason to skip the trial, or None."""
        gpu_name, gpu_mem = self.target
        try:
            from tunesmith.plan.planner import plan_run

            plan = plan_run(config, gpu_name=gpu_name, gpu_mem=gpu_mem)
        except Exception as err:  # noqa: BLE001 - a config the planner cannot trace still trains
            trial.set_user_attr("note", f"planner: {first_line(err)}")
            return None
        peak = plan.traced.peak_bytes / 2**30
        trial.set_user_attr("planned_peak_gib", round(peak, 4))
        if plan.hours is not None:
            trial.set_user_attr("planned_hours", round(plan.hours, 4))
        if plan.fits is False:
            where = plan.gpu or "the GPU"
            return (
                f"planned peak {peak:.3g} GiB does not fit {where} ({plan.gpu_memory_gib:.3g} GiB)"
            )
        return None

    def _pruning(self, trial: optuna.Trial) -> Callable[[int, dict], None] | None:
        metric = self.sweep.metric
        if self.sweep.pruner == "none":
            return None

        def report(step: int, metrics: dict) -> None:
            value = metrics.get(metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        return report


def metric_value(folder: Path, metric: str) -> float | None:
    """`metric` of a finished run in `folder`: summary.json's `final_<metric>` or `<metric>`,
    the tuned column of eval.json, or the last validation entry of metrics.jsonl."""
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        for key in (f"final_{metric}", metric):
            if isinstance(summary.get(key), (int, float)):
                return float(summary[key])
    evaluation = folder / "eval.json"
    if evaluation.is_file():
        tuned = json.loads(evaluation.read_text()).get("columns", {}).get("tuned", {})
        if isinstance(tuned.get(metric), (int, float)):
            return float(tuned[metric])
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        found = None
        for line in metrics.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry.get(metric), (int, float)):
                found = float(entry[metric])
        return found
    return None


def _params_text(params: dict, sweep: SweepSection) -> str:
    return ", ".join(f"{key}={_short(params[key])}" for key in sweep.space if key in params)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows_of(study: optuna.Study, sweep: SweepSection) -> list[dict]:
    """trials.csv's rows: one per trial that ran or was judged (not a surplus one)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        state = {
            optuna.trial.TrialState.COMPLETE: "complete",
            optuna.trial.TrialState.PRUNED: t.user_attrs.get("state", "pruned"),
            optuna.trial.TrialState.FAIL: "failed",
            optuna.trial.TrialState.RUNNING: "running",
            optuna.trial.TrialState.WAITING: "running",
        }[t.state]
        note = t.user_attrs.get("note", "")
        if state == "failed" and not note:
            note = "its worker stopped (no heartbeat)"
        value = t.value if state == "complete" else None  # Optuna keeps a pruned one's last
        row = {"trial": t.number, "state": state, sweep.metric: value}
        row |= {key: t.params.get(key) for key in sweep.space}
        row |= {
            "seconds": t.user_attrs.get("seconds"),
            "planned_peak_gib": t.user_attrs.get("planned_peak_gib"),
            "planned_hours": t.user_attrs.get("planned_hours"),
            "started": (
                t.datetime_start.isoformat(sep=" ", timespec="seconds")
                if t.datetime_start
                else None
            ),
            "note": note,
        }
        rows.append(row)
    return rows


def write_outputs(study, config, raw, source, lines, overrides, out: Path, plots: bool):
    """trials.csv, best.yaml and (with `plots`) the plots; returns trials.csv's rows."""
    sweep = config.sweep
    rows = rows_of(study, sweep)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), out / "trials.csv")
    complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    complete = [t for t in complete if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = (min if sweep.minimize else max)(complete, key=lambda t: t.value)
        # a folder of its own: the sweep's holds trials and the report, which train refuses
        overrides = [*overrides, f"output_dir={Path(config.output_dir) / 'best'}"]
        best_config = trial_config(raw, best.params, source, lines, overrides)
        header = (
            f"# tunesmith sweep {study.study_name}: trial {best.number:03d}, "
            f"{sweep.metric} {best.value:.6g}\n# train it: tunesmith train {out / 'best.yaml'}\n"
        )
        data = best_config.model_dump(mode="json")
        data.pop("sweep", None)
        text = header + config_yaml(RunConfig.model_validate(data)).replace("sweep: null\n", "")
        atomic_write_text(text, out / "best.yaml")
    if plots:
        draw_plots(study, out)
    return rows


def draw_plots(study: optuna.Study, out: Path) -> list[str]:
    """Optuna's matplotlib plots as sweep/<name>.png (those the trials allow); their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    makers = {
        "history": (1, vis.plot_optimization_history),
        "importances": (2, vis.plot_param_importances),
        "parallel": (2, vis.plot_parallel_coordinate),
    }
    drawn = []
    for name, (needed, make) in makers.items():
        target = out / f"{name}.png"
        if len(complete) < needed:
            target.unlink(missing_ok=True)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = make(study).figure
                figure.set_size_inches(8, 4.5)
                figure.tight_layout()
                atomic_write(target, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=100))
        except (ValueError, RuntimeError):  # e.g. importances of one distinct value
            target.unlink(missing_ok=True)
            continue
        finally:
            plt.close("all")
        drawn.append(name)
    return drawn
