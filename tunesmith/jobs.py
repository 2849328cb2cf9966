"""Whole jobs, as the command line runs them: `train_job` is `tunesmith train`.

    from tunesmith.config import load_config
    from tunesmith.jobs import train_job

    summary = train_job(load_config("run.yaml"), nproc=2)

A training job is more than the loop (`tunesmith.train.Run`): with `nproc` > 1 it relaunches
itself under torchrun; the process that reports prints the data summary, the model and the
switches; an interrupted run says how to continue it; a failed collective operation is one
line naming the cause; and with `eval.generate_samples` it ends with the base-vs-tuned
comparison, which is judging's (`tunesmith.judge.evaluate`). That is why the job sits here, one
layer above both, rather than in `train/`: the loop does not import its judge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from tunesmith.adapters import trainable_parameters
from tunesmith.cards import write_card
from tunesmith.config import RunConfig, config_yaml
from tunesmith.errors import ProcessesFailed, TrainingInterrupted, TunesmithError, first_line
from tunesmith.judge.evaluate import compare_after_training
from tunesmith.threads import apply_threads, default_threads, process_threads
from tunesmith.train.card import run_card
from tunesmith.train.loop import Run, make_run

Echo = Callable[..., None]


def _print(message: str = "", err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout)


def train_job(
    config: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    use_cache: bool = True,
    nproc: int = 1,
    threads: int | None = None,
    echo: Echo = _print,
    command: Sequence[str] | None = None,
    on_validation: Callable[[int, dict], None] | None = None,
) -> dict | None:
    """Train as `tunesmith train` does; returns the run's summary (None in a process that does
    not report, and after a torchrun relaunch, whose processes write summary.json).

    `nproc` > 1 runs `torchrun --standalone --nproc_per_node N -m tunesmith train ...` and
    waits; a non-zero exit is a `ProcessesFailed` (the processes printed why).
    `echo(text, err=False)` prints (warnings go with `err=True`); `command` is how the user
    started the job (`["tunesmith", "train", "run.yaml", ...overrides]`): the relaunch repeats
    it and an interrupted run names it with `--resume`. Without it the relaunch runs the
    resolved config from a temporary file. `threads`: CPU threads per process, pinned
    (`tunesmith.threads`); None leaves this process's threads as they are, and gives each
    torchrun process its share of the physical cores. `on_validation(step, metrics)`: called
    after each validation during training (one process only; what it raises stops the run)."""
    if nproc > 1:
        _relaunch(config, nproc, resume, overwrite, use_cache, command, threads)
        return None
    if threads is not None:  # the CLI sets the default itself: a library call pins nothing
        apply_threads(process_threads(threads))
    run = make_run(
        config,
        resume=resume,
        overwrite=overwrite,
        use_cache=use_cache,
        planned_peak=_planned_peak,
        on_validation=on_validation,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.setup()
    main = run.world.main  # under torchrun only rank 0 speaks
    for warning in caught:
        if issubclass(warning.category, UserWarning) and main:
            echo(f"warning: {warning.message}", err=True)
    if main:
        for line in header_lines(run):
            echo(line)
    try:
        summary = run.run()
    except RuntimeError as err:
        if not run.world.distributed:
            raise
        raise TunesmithError(
            f"a collective operation failed: {first_line(err)}; another process stopped or "
            f"hangs (its own error names its rank; train.dist_timeout_s: "
            f"{config.train.dist_timeout_s:g})"
        ) from None
    except TrainingInterrupted as err:
        again = " ".join([*command, "--resume"]) if command else "resume='latest' (--resume latest)"
        if run.last_checkpoint is None:
            again = "nothing to resume from; start again with --overwrite"
        raise TrainingInterrupted(f"{err}. Continue with: {again}") from None
    if not main:
        return None
    try:
        for line in summary_text(summary, run):
            echo(line)
        _compare(run, echo, command)
    finally:
        run.trackers.close()
    return summary


def _planned_peak(config: RunConfig) -> int:
    """The planner's traced peak (asked on a GPU and for benchmark runs only: importing the
    planner costs most of a second at every start)."""
    from tunesmith.plan.planner import planned_peak

    return planned_peak(config)


def _relaunch(config, nproc, resume, overwrite, use_cache, command, threads) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TunesmithError("--nproc: already running under torchrun; leave --nproc out")
    with tempfile.TemporaryDirectory(prefix="tunesmith-job-") as tmp:
        if command:
            args = list(command[1:])  # "train", the config, its overrides
        else:
            resolved = Path(tmp) / "run.yaml"
            resolved.write_text(config_yaml(config), encoding="utf-8")
            args = ["train", str(resolved)]
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "tunesmith",
            *args,
        ]
        if resume is not None:
            argv += ["--resume", resume]
        argv += ["--overwrite"] * overwrite + ["--no-cache"] * (not use_cache)
        # torchrun would set OMP_NUM_THREADS=1; each process gets its share of the cores
        argv += ["--threads", str(threads or default_threads(share=nproc))]
        code = subprocess.run(argv).returncode
    if code:
        raise ProcessesFailed(f"torchrun with {nproc} processes exited with {code}", code)


def _compare(run: Run, echo: Echo, command: Sequence[str] | None) -> None:
    cfg = run.config
    if cfg.eval.generate_samples and run.strategy == "fsdp":
        how = f"tunesmith eval {command[2]}" if command and len(command) > 2 else "tunesmith eval"
        echo(
            "eval.generate_samples: skipped after an FSDP run (the model is sharded); run "
            f"{how} for the comparison"
        )
    elif cfg.eval.generate_samples and run.objective.output == "generation":
        echo("eval.generate_samples: GRPO's validation generates already (completions.jsonl)")
    elif cfg.eval.generate_samples:
        compare_after_training(run, echo=echo)
        summary_file, evaluation = run.out / "summary.json", run.out / "eval.json"
        if summary_file.is_file() and evaluation.is_file():  # the card gains the table
            summary = json.loads(summary_file.read_text())
            card = run_card(cfg, summary, json.loads(evaluation.read_text()))
            write_card(Path(summary["output"]), card)


def header_lines(run: Run) -> list[str]:
    """What `tunesmith train` prints before the first step: the data, the model and method,
    the step count, the processes and the speed switches."""
    lines = run.data_lines()
    counts = trainable_parameters(run.model)
    cfg = run.config
    units = "packed rows" if run.plan.rows is not None else "samples"
    if run.prepared.group > 1:
        units = "examples" if "unpaired" in run.objective.formats else "pairs"
    if run.objective.output == "generation":
        units = f"prompts x {cfg.objective.num_generations} completions"
    lines.append(
        f"model {cfg.model.path} on {run.device} ({str(run.dtype).removeprefix('torch.')}),"
        f" method {cfg.method.name}: {counts.trainable:,} of {counts.total:,} parameters "
        f"train ({counts.percent:.2f}%); {run.total_steps} steps of "
        f"{cfg.train.micro_batch_size}x{cfg.train.grad_accum_steps} {units}"
        + (f", objective {run.objective.name}" if not run.objective.token_level else "")
    )
    switches = [*run.speedups, *(["padding-free packed batches"] if run.padding_free else [])]
    if run.world.distributed:
        lines.append(f"processes: {run.world.size} ({run.strategy}), rank 0 reporting")
    if switches:
        lines.append(f"speed: {'; '.join(switches)}")
    return lines


def summary_text(summary: dict, run: Run) -> list[str]:
    """What `tunesmith train` prints when the loop is done."""
    parts = [f"{summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.1f}s"]
    if summary["final_train_loss"] is not None:
        parts.append(f"train loss {summary['final_train_loss']:.4f}")
    if summary["final_val_loss"] is not None and summary["final_val_ppl"] is not None:
        val, ppl = summary["final_val_loss"], summary["final_val_ppl"]
        parts.append(f"validation loss {val:.4f} (perplexity {ppl:.2f})")
    elif summary["final_val_loss"] is not None:
        parts.append(f"validation loss {summary['final_val_loss']:.4f}")
    return [
        "done: " + "; ".join(parts),
        *objective_table(summary, getattr(run, "validation_start", None)),
        f"saved {summary['output']} (metrics, loss.png, summary.json in {run.out})",
    ]


OBJECTIVE_ROWS = {
    "reward_accuracy": "reward accuracy (chosen's reward above rejected's)",
    "reward_margin": "reward margin (mean, chosen minus rejected)",
    "logps_accuracy": "prefers chosen (log-probability: chosen above rejected)",
    "logps_chosen": "log-probability of chosen (mean per pair)",
    "logps_rejected": "log-probability of rejected (mean per pair)",
    "nll": "chosen answer's loss per token (ORPO's SFT term)",
    "kl": "KL estimate (KTO)",
    "reward_desirable": "reward of desirable examples",
    "reward_undesirable": "reward of undesirable examples",
    "reward_chosen": "score of chosen",
    "reward_rejected": "score of rejected",
}


OBJECTIVE_LABELS = {
    "distill": {
        "kl": "divergence from the teacher (per answer token)",
        "agreement": "agreement with the teacher's top token",
        "ce": "cross-entropy on the answers (per token)",
    },
    "grpo": {
        "reward": "reward (greedy, mean over prompts)",
        "completion_length": "completion length (tokens)",
    },
}
"""Rows of objectives whose metrics are not the preference ones (or mean something else)."""


def objective_table(summary: dict, start: dict | None) -> list[str]:
    """The end-of-training table of an objective's validation metrics: at the start of
    training (step 0: the base, or the run's first state) and at the end."""
    labels = dict(OBJECTIVE_LABELS.get(summary.get("objective"), OBJECTIVE_ROWS))
    if summary.get("objective") == "grpo":  # one row per reward function
        for key in sorted(summary):
            name = key.removeprefix("final_val_")
            if name.startswith("reward_") and not name.endswith("_std"):
                labels[name] = f"reward {name.removeprefix('reward_')}"
    rows = [
        (label, (start or {}).get(f"val_{name}"), summary.get(f"final_val_{name}"))
        for name, label in labels.items()
        if summary.get(f"final_val_{name}") is not None
    ]
    if not rows:
        return []
    width = max(len(label) for label, _, _ in rows)
    shown = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"validation ({summary['objective']}):", f"  {'':{width}}  {'start':>9}  {'end':>9}"]
    lines += [f"  {label:{width}}  {shown(a):>9}  {shown(b):>9}" for label, a, b in rows]
    return lines
