"""The training loop behind `tunesmith train run.yaml`.

    summary = train(load_config("run.yaml"))

Loads the tokenizer, data and model with the run config's policy, attaches the method (an
adapter, or full fine-tuning), then runs optimizer steps of `grad_accum_steps` micro-batches.
The loss of a step is the sum of token losses over all its micro-batches divided by the trained
tokens of the whole step, so accumulation gives exactly the gradient of one big batch.
Checkpoints (weights, optimizer, scheduler, RNG, data position) are written atomically every
`train.save_every_steps` and at the end; `resume="latest"` or a checkpoint path continues a run
with the same losses it would have had uninterrupted."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

import tunesmith.train.distributed as dist_run
import tunesmith.train.sharded as sharded
from tunesmith.adapters import trainable_parameters
from tunesmith.adapters.dropout import dropout_keys, number_sites
from tunesmith.builder import build_model, load_trained, output_name, run_dtypes, save_trained
from tunesmith.cards import write_card
from tunesmith.config import RunConfig, config_yaml
from tunesmith.data import prepare_data
from tunesmith.data.preview import summary_lines
from tunesmith.errors import AdapterError, TrainingError, TrainingInterrupted, TunesmithError
from tunesmith.io import atomic_write, atomic_write_json, reporting_full_disk
from tunesmith.models import load_tokenizer, resolve_device
from tunesmith.objectives import objective_of
from tunesmith.registry import method_of
from tunesmith.train.batches import (
    DROPOUT_KEYS,
    BatchPlan,
    micro_batch_seed,
    trained_tokens,
)
from tunesmith.train.card import run_card
from tunesmith.train.checkpoint import (
    check_same_plan,
    checkpoint_root,
    folder_entries,
    prepare_output_dir,
    read_checkpoint,
    remove_new_entries,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    step_of,
    truncate_metrics,
)
from tunesmith.train.distill import DistillLoss, load_teacher, precomputed_teacher, vocab_of
from tunesmith.train.lock import FolderLock
from tunesmith.train.loss import autocast_for, evaluate_loss, model_loss_sum, to_device
from tunesmith.train.objective import (
    GRPOLoss,
    UnitLoss,
    add_metrics,
    add_score_head,
    evaluate_units,
    finish_reward_output,
    means,
    reference_logps_cached,
    reward_method_config,
)
from tunesmith.train.offload import ActivationOffload
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.plot import plot_metrics
from tunesmith.train.progress import Progress
from tunesmith.train.speedups import apply_speedups, padding_free_for
from tunesmith.train.trackers import Trackers, check_trackers


def first_validation(out: Path) -> dict | None:
    """The step-0 validation a run logged (a preference objective's starting point)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step") == 0 and "val_loss" in entry:
            return entry
    return None


def check_objective_data(objective, prepared) -> None:
    """Each source's format (as configured, or detected from its first record) is one the
    objective trains on; a one-line error naming the source otherwise."""
    for source in prepared.sources:
        if source.format not in objective.formats:
            wants = " or ".join(objective.formats)
            raise TrainingError(
                f"{source.path} ({source.split}) is {source.format} data, but objective "
                f"{objective.name} trains on {wants} data; set objective.name"
                + (" (dpo, simpo, orpo, reward or kto)" if objective.token_level else "")
                + " or give data of that format"
            )


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def peak_memory_bytes(device: str) -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


class StopRequest:
    """Ctrl-C during training: the first asks the loop to stop after the current step (which
    is then checkpointed), a second one stops at once. Only in the main thread."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.asked = False
        self.log = log
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.log("stopping after this step, which will be checkpointed (Ctrl-C again: at once)")

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class Run:
    """One training run: built by `setup`, advanced by `run`."""

    def __init__(
        self,
        config: RunConfig,
        resume: str | None = None,
        overwrite: bool = False,
        use_cache: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
        progress: Progress | None = None,
        planned_peak: Callable[[RunConfig], int] | None = None,
        on_validation: Callable[[int, dict], None] | None = None,
    ):
        self.config = config
        self.on_validation = on_validation
        """Called with (step, metrics) after each validation during training (not the final
        one); what it raises stops the run (a sweep's pruner)."""
        self.out = Path(config.output_dir)
        self.trackers = Trackers([], self.out, {})  # the real ones start in setup (rank 0)
        self.resume = resume
        self.overwrite = overwrite
        self.use_cache = use_cache
        self.on_step = on_step
        self.planned_peak = planned_peak
        """The planner's peak for a config (`tunesmith train` passes `tunesmith plan`'s trace),
        recorded beside the measured peak on a GPU and in benchmark runs."""
        self.progress = progress or Progress(log_every=config.train.log_every_steps)

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Lock output_dir, start the trackers, load tokenizer, data and model, attach the
        method, and restore a checkpoint when resuming. On any failure the trackers are closed,
        what this run added to output_dir is removed (the folder too, if it made it) and
        output_dir is released."""
        before = folder_entries(self.out)
        try:
            self._setup()
        except BaseException:
            self.trackers.close()
            if getattr(self, "lock", None) is not None and self.lock.held:
                remove_new_entries(self.out, before)
            self.close()
            raise

    def _setup(self) -> None:
        cfg = self.config
        self.method = method_of(cfg.method)
        self.objective = objective_of(cfg.objective)
        self.world = dist_run.world_from_env()
        if not self.world.main:  # only rank 0 speaks
            self.progress = Progress(log_every=10**9, live=False, stream=open(os.devnull, "w"))
        else:
            check_trackers(cfg.train.report_to)  # before output_dir holds anything
        self._check_output_dir()
        resume_from = resolve_resume(self.out, self.resume, self.progress.log)
        if self.world.main:  # a tracker that cannot start stops the run before any loading
            text = config_yaml(cfg)
            atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
            self.trackers = Trackers(
                cfg.train.report_to,
                self.out,
                {"data": yaml.safe_load(text), "yaml": text},
                step_of(resume_from) if resume_from is not None else 0,
            )
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.tokenizer = load_tokenizer(cfg.model)
        self._prepare()
        self.device = dist_run.start(
            self.world, resolve_device(cfg.model.device), cfg.train.dist_timeout_s
        )
        self.device_type = self.device.split(":")[0]
        # Full fine-tuning keeps fp32 master weights (unless told not to) and autocasts to the
        # compute dtype; adapters train in fp32 on a frozen base stored in the compute dtype.
        self.dtype = run_dtypes(cfg, self.device_type).compute
        self.strategy = dist_run.strategy_for(
            cfg.train.distributed,
            self.method,
            self.world,
            dist_run.fits_one_device(cfg, self.device, self.world),
        )
        # FSDP builds on the CPU and fully_shard moves each process's shards to its GPU: a
        # base that does not fit one GPU is never whole on one
        build_on = "cpu" if self.strategy == "fsdp" else self.device
        self.method_config, self.prepare_base = cfg.method, None
        if self.objective.output == "score":  # a reward model: a score head on the base
            self.method_config = reward_method_config(cfg.method, self.method)
            self.prepare_base = lambda model: add_score_head(model, cfg.train.seed)
        self.model = build_model(
            self.method_config,
            model=cfg.model,
            train=cfg.train,
            device=build_on,
            compute_dtype=self.dtype,
            tokenizer=self.tokenizer,
            seed=cfg.train.seed,
            prepare_base=self.prepare_base,
        )
        if cfg.model.adapter:
            self._start_from_adapter(cfg.model.adapter, build_on)
        self.reference_model = None
        precompute = getattr(cfg.objective, "precompute_reference", False)
        if self.objective.reference and not precompute and not self.method.trains_adapter:
            # full fine-tuning: a frozen copy of the starting weights (adapter methods switch
            # their adapters off instead, and precomputed log-probabilities need neither)
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.reference = {"train": None, "validation": None}
        if self.objective.reference and precompute:
            self.reference = reference_logps_cached(self, build_on)
        self.teacher, self.extras = None, {"train": None, "validation": None}
        if self.objective.output == "logits":  # distillation
            self._setup_teacher(build_on)

        number_sites(self.model)  # before wrapping: the names every process shares
        self.speedups = apply_speedups(self.model, cfg.train, self.device_type)
        self.offload = (
            ActivationOffload(self.device_type) if cfg.train.offload_activations else None
        )
        master = run_dtypes(cfg, self.device_type).weights == torch.float32
        self.unit_loss = None
        if self.objective.output == "logits":
            self.unit_loss = DistillLoss(cfg.objective, self.teacher, self.vocab)
        elif self.objective.output == "generation":
            self.unit_loss = GRPOLoss(cfg.objective)
        elif not self.objective.token_level:
            self.unit_loss = UnitLoss(
                self.objective, cfg.objective, self.reference_model, self.prepared.group
            )
        self.step_module = dist_run.wrap(
            self.model,
            self.strategy,
            self.world,
            self.device,
            self.dtype,
            master,
            self.unit_loss or model_loss_sum,
            cpu_offload=cfg.train.fsdp_cpu_offload,
        )

        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = 0
        attention = getattr(self.model.config, "_attn_implementation", None)
        self.padding_free = padding_free_for(
            cfg.train.padding_free, self.prepared.train_rows is not None, attention
        )
        self.plan = self._make_plan()
        self.total_steps = self.plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        self.scaler = torch.amp.GradScaler(
            self.device_type, enabled=self.dtype == torch.float16 and self.device_type == "cuda"
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.start_step = 0
        self.counters = {"tokens": 0, "trained_tokens": 0, "seconds": 0.0}
        self.last_checkpoint: Path | None = None
        self.validation_start: dict | None = None
        if resume_from is not None:
            self._restore(resume_from)

    def _prepare(self) -> None:
        """The data (`self.prepared`), checked against the objective."""
        cfg = self.config
        self.prepared = prepare_data(cfg.data, self.tokenizer, cfg.train.seed, self.use_cache)
        check_objective_data(self.objective, self.prepared)

    def _make_plan(self):
        """Which samples make up each optimizer step (`BatchPlan`)."""
        cfg = self.config
        return BatchPlan(
            self.prepared.train,
            self.prepared.train_rows,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            cfg.train.seed,
            self.pad_id,
            flatten=self.padding_free,
            group=self.prepared.group,
            reference=self.reference["train"],
            extras=self.extras["train"],
        )

    def data_lines(self) -> list[str]:
        """The data's lines in `tunesmith train`'s header."""
        return summary_lines(self.prepared)

    def _start_from_adapter(self, folder: str, device: str) -> None:
        """`model.adapter`: the adapter's weights loaded into the one just attached."""
        if not self.method.trains_adapter:
            raise TrainingError(
                f"model.adapter: method {self.method.name} trains no adapter; merge the "
                "adapter into the model (tunesmith merge) and train from that"
            )
        path = Path(folder).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise TrainingError(f"model.adapter: {folder} holds no adapter_config.json")
        try:
            load_trained(self.model, self.method, path, device)
        except TunesmithError as err:
            raise TrainingError(f"model.adapter: {err}") from None
        self.progress.log(f"starting from the adapter in {folder}")

    def _setup_teacher(self, device: str) -> None:
        """Distillation's teacher: loaded and kept (on-the-fly logits), or run once over the
        data for its top-k and freed (`precompute_teacher`; read back from the data cache when
        it holds them)."""
        cfg = self.config
        if cfg.objective.precompute_teacher:
            self.extras = precomputed_teacher(self, device)
            self.vocab = None
            return
        self.teacher = load_teacher(cfg.objective, self.tokenizer, device, self.dtype)
        self.vocab = vocab_of(self.teacher)

    def _check_output_dir(self) -> None:
        """Lock output_dir for this run, then make sure it holds no other run's files (unless
        resuming, or told to overwrite them). Rank 0 does it; the others wait for it."""
        if not self.world.main:
            self.lock = None
            dist_run.barrier(self.world)  # rank 0 prepares output_dir; a failure there stops it
            return
        try:
            self.lock = FolderLock(self.out).acquire()
            prepare_output_dir(self.out, self.lock, self.resume, self.overwrite, self.progress.log)
        finally:
            dist_run.barrier(self.world)

    def close(self) -> None:
        """Release output_dir (also done at the end of `run`, and by process exit)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
        dist_run.stop()

    def _restore(self, folder: Path) -> None:
        if sharded.is_sharded(folder):
            state = sharded.load_sharded(
                folder, self.step_module, self.optimizer, self.method.trains_adapter
            )
            optimizer_state = None
            rng = load_file(folder / "rng.safetensors")
        elif self.strategy == "fsdp":
            raise TrainingError(
                f"--resume: {folder} was written by one process or under DDP, not in FSDP's "
                "sharded format; resume it with train.distributed: ddp or on one process"
            )
        else:
            state, optimizer_state, rng = read_checkpoint(folder)
        self._restore_state(folder, state, optimizer_state, rng)

    def _restore_state(self, folder: Path, state: dict, optimizer_state, rng) -> None:
        plan = {"total_steps": self.total_steps, "steps_per_epoch": self.plan.steps_per_epoch}
        check_same_plan(folder, state, plan, self.out)
        if optimizer_state is not None:  # (a sharded checkpoint is loaded whole above)
            self._load_weights(folder)
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(rng)
        self.start_step = state["step"]
        self.counters = state["counters"]
        self.last_checkpoint = folder
        if self.world.main:
            truncate_metrics(self.out, self.start_step, self.progress.log)
            self.validation_start = first_validation(self.out)
        self.progress.log(f"resumed from {folder} at step {self.start_step}")
        written_by = state.get("world_size", 1)
        if written_by != self.world.size:
            how = (
                "its shards are resharded to this run's processes"
                if state.get("format") == "dcp"
                else "the checkpoint holds the whole state and every process loads it"
            )
            self.progress.log(
                f"the checkpoint was written by {written_by} process(es) and this run has "
                f"{self.world.size}: {how}; each step's micro-batches are dealt out anew"
            )

    def _load_weights(self, folder: Path) -> None:
        try:
            load_trained(self.model, self.method, folder, self.device)
        except AdapterError:
            raise
        except TunesmithError as err:
            raise TrainingError(str(err)) from None

    # --- the loop -------------------------------------------------------------------------

    def _log_metrics(self, entry: dict) -> None:
        if not self.world.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.trackers.log(entry)

    def _save(self, step: int) -> Path:
        """The checkpoint of `step`: written by rank 0 (the trained state is the same on every
        rank under DDP), the others wait for it; under FSDP every rank writes its shards."""
        if self.strategy == "fsdp":
            self.last_checkpoint = sharded.save_sharded(
                self.out,
                step,
                self.step_module,
                self.optimizer,
                self.scheduler,
                self._trainer_state(),
                self.config.train.keep_last,
                self.method.trains_adapter,
                self.world.main,
            )
            return self.last_checkpoint
        if not self.world.main:
            dist_run.barrier(self.world)
            self.last_checkpoint = checkpoint_root(self.out) / f"step-{step:06d}"
            return self.last_checkpoint
        try:
            return self._save_main(step)
        finally:
            dist_run.barrier(self.world)

    def _save_main(self, step: int) -> Path:
        def save_weights(folder: Path) -> None:
            save_trained(self.model, self.method, folder)
            self._checkpoint_extras(folder)

        self.last_checkpoint = save_checkpoint(
            self.out,
            step,
            save_weights,
            self.optimizer,
            self.scheduler,
            self._trainer_state(),
            self.config.train.keep_last,
        )
        return self.last_checkpoint

    def _checkpoint_extras(self, folder: Path) -> None:
        """What a checkpoint holds beside weights and optimizer (GRPO: a round's generations
        when the checkpoint falls inside it)."""

    def _trainer_state(self) -> dict:
        """What a checkpoint records besides weights, optimizer and schedule (both layouts)."""
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "counters": self.counters,
            "method": self.method.name,
            "world_size": self.world.size,
        }

    def _validation(self, step: int) -> dict | None:
        val = self.prepared.validation
        if val is None or len(val) == 0:
            return None
        if self.strategy == "fsdp":  # every rank computes it; rank 0 reports
            return self._validation_main(step, val)
        if not self.world.main:
            dist_run.barrier(self.world)
            return None
        try:
            return self._validation_main(step, val)
        finally:
            dist_run.barrier(self.world)

    def _validation_main(self, step: int, val) -> dict | None:
        size = self.config.eval.batch_size or self.config.train.micro_batch_size
        if self.unit_loss is not None:
            return self._validation_units(step, val, size)
        result = evaluate_loss(
            self.model,
            val,
            size,
            self.pad_id,
            self.device,
            self.dtype,
            self.device_type,
            loss_module=self.step_module if self.strategy == "fsdp" else None,
        )
        self._log_metrics({"step": step, **result})
        self.progress.log(
            f"step {step}: validation loss {result['val_loss']:.4f}, "
            f"perplexity {result['val_ppl']:.2f}"
        )
        return result

    def _validation_units(self, step: int, val, size: int) -> dict:
        result = evaluate_units(
            self.unit_loss,
            self.model,
            val,
            size,
            self.pad_id,
            self.device,
            lambda: autocast_for(self.device_type, self.dtype),
            self.reference["validation"],
            loss_module=self.step_module if self.strategy == "fsdp" else None,
            extras=self.extras["validation"],
        )
        self._log_metrics({"step": step, **result})
        shown = [f"validation loss {result['val_loss']:.4f}"]
        for name in ("reward_accuracy", "reward_margin", "kl", "agreement"):
            if f"val_{name}" in result:
                shown.append(f"{name.replace('_', ' ')} {result[f'val_{name}']:.4f}")
        self.progress.log(f"step {step}: " + ", ".join(shown))
        return result

    def _units(self, batch: dict) -> int:
        """What a step's loss is normalised by: trained tokens (sft), or units (pairs)."""
        if self.unit_loss is None:
            return trained_tokens(batch)
        return self.unit_loss.units(batch)

    def train_step(self, step: int) -> dict:
        micro = self.plan.micro_batches(step)
        size, rank = self.world.size, self.world.rank
        mine = micro[rank::size]
        # every rank runs the same number of passes (the DDP reduction needs all of them): a
        # rank short of micro-batches repeats one with its loss weighted 0
        passes = -(-len(micro) // size)
        if not mine:
            raise TrainingError(
                f"step {step + 1} has {len(micro)} micro-batches for {size} processes; raise "
                "train.grad_accum_steps to at least the number of processes"
            )
        n_trained = sum(self._units(b) for b in mine)
        if self.world.distributed:
            n_trained = int(dist_run.all_sum(n_trained, self.device))
        total = torch.zeros((), device=self.device)
        totals: dict = {}
        for i in range(passes):
            batch, weight = (mine[i], 1.0) if i < len(mine) else (mine[0], 0.0)
            batch = to_device(batch, self.device)
            # the model's own dropout (GPT-2's, say) draws from torch's generator: seeded by
            # the micro-batch's place in the step, it draws the same on 1 or N processes
            torch.manual_seed(micro_batch_seed(self.config.train.seed, step, rank + i * size))
            with (
                dist_run.accumulating(self.step_module, self.strategy, i < passes - 1),
                dropout_keys(batch[DROPOUT_KEYS]),  # forward and backward (recomputation)
            ):
                with (
                    autocast_for(self.device_type, self.dtype),
                    self.offload or contextlib.nullcontext(),
                ):
                    out = self.step_module(batch)
                    loss_sum = out[0]
                if len(out) > 2 and weight:
                    add_metrics(totals, out[2])
                if self.world.distributed:  # DDP and FSDP average what they reduce
                    scaled = loss_sum * (weight * size / max(n_trained, 1))
                else:
                    scaled = loss_sum / max(n_trained, 1)
                self.scaler.scale(scaled).backward()
            total += loss_sum.detach().float() * weight
        if self.world.distributed:
            total = torch.tensor(dist_run.all_sum(float(total), self.device))
            totals = {
                k: (dist_run.all_sum(v, self.device), int(dist_run.all_sum(c, self.device)))
                for k, (v, c) in sorted(totals.items())
            }
        loss = float(total) / max(n_trained, 1)
        if not math.isfinite(loss):
            kept = self.last_checkpoint or "none written yet"
            raise TrainingError(
                f"step {step + 1}: the loss is {loss}; stopping without updating the weights. "
                f"Last good checkpoint: {kept}. Lower train.lr, use dtype bf16 or fp32, or check "
                "the data; then --resume"
            )
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        present = [b for b in micro if b is not None]  # GRPO: this process's generations
        tokens = sum(int(b["input_ids"].numel()) for b in present)
        trained = sum(trained_tokens(b) for b in present)
        if len(present) < len(micro) and self.world.distributed:
            tokens = int(dist_run.all_sum(tokens, self.device))
            trained = int(dist_run.all_sum(trained, self.device))
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "trained_tokens": trained,
            "metrics": means(totals),
        }

    def run(self) -> dict:
        cfg = self.config
        every_save = cfg.train.save_every_steps
        every_eval = cfg.eval.every_steps
        self.progress.start(self.total_steps, self.start_step)
        started = time.perf_counter()
        seconds_before = self.counters["seconds"]
        last = {}
        window_tokens, window_start = 0, time.perf_counter()
        stop = StopRequest(self.progress.log)
        if self.device_type == "cuda":  # the step's peak, not loading's
            torch.cuda.reset_peak_memory_stats()
        step = completed = self.start_step
        if self.unit_loss is not None and self.start_step == 0:
            self.validation_start = self._validation(0)  # the preference metrics' start
        try:
            for step in range(self.start_step, self.total_steps):
                result = self.train_step(step)
                done = completed = step + 1
                self.counters["tokens"] += result["tokens"]
                self.counters["trained_tokens"] += result["trained_tokens"]
                self.counters["seconds"] = seconds_before + time.perf_counter() - started
                window_tokens += result["tokens"]
                now = time.perf_counter()
                entry = {
                    "step": done,
                    "epoch": round(self.plan.epoch_of(done), 4),
                    "loss": result["loss"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "tokens": self.counters["tokens"],
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    **result["metrics"],
                }
                last = entry
                if done % cfg.train.log_every_steps == 0 or done == self.total_steps:
                    self._log_metrics(entry)
                    window_tokens, window_start = 0, now
                self.progress.update(done, entry)
                if every_eval and done % every_eval == 0 and done < self.total_steps:
                    metrics = self._validation(done)
                    if metrics and self.on_validation is not None:
                        self.on_validation(done, metrics)
                if every_save and done % every_save == 0 and done < self.total_steps:
                    self._save(done)
                if self.on_step is not None:
                    self.on_step(done, entry)
                if stop.asked and done < self.total_steps:
                    self._stop_at(done)
        except KeyboardInterrupt:
            kept = self.last_checkpoint or "none written yet"
            where = (
                f"after step {completed}"
                if completed == step + 1
                else f"during step {step + 1}, which was abandoned"
            )
            raise TrainingInterrupted(f"interrupted {where}; last checkpoint: {kept}") from None
        finally:
            stop.restore()
            self.progress.close()
            if sys.exc_info()[0] is not None:
                self.close()
                self.trackers.close()
        return self._finish(last)

    def _finish(self, last: dict) -> dict:
        """After the last step: its checkpoint, validation, the final adapter or model, the
        summary and the plot; output_dir is released."""
        final_step = self.total_steps
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(
            f"{final_step:06d}"
        ):
            self._save(final_step)
        val = self._validation(final_step)
        full = sharded.gather_full(self.step_module) if self.strategy == "fsdp" else None
        if not self.world.main:
            dist_run.barrier(self.world)
            self.close()
            return {}
        try:
            final = self._write_final(self._consolidated(full) if full is not None else None)
            summary = self._summary(last, val, final)
            atomic_write_json(summary, self.out / "summary.json")
            write_card(final, run_card(self.config, summary))
            plot_metrics(self.out)
        finally:
            dist_run.barrier(self.world)
        self.close()
        return summary

    def _stop_at(self, done: int) -> None:
        """After a Ctrl-C: checkpoint the finished step `done` (unless it just was), then stop."""
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{done:06d}":
            self._save(done)
        raise TrainingInterrupted(
            f"stopped at step {done} of {self.total_steps}; saved checkpoint {self.last_checkpoint}"
        )

    def _consolidated(self, full: dict) -> torch.nn.Module:
        """After FSDP: the model rebuilt whole on the CPU with the gathered state (rank 0)."""
        cfg = self.config
        model = build_model(
            self.method_config,
            model=cfg.model,
            train=cfg.train,
            device="cpu",
            compute_dtype=self.dtype,
            tokenizer=self.tokenizer,
            seed=cfg.train.seed,
            prepare_base=self.prepare_base,
        )
        model.load_state_dict(full, strict=False)
        return model

    def _write_final(self, model: torch.nn.Module | None = None) -> Path:
        """The trained adapter (PEFT format) or model (HF checkpoint), with the tokenizer, in
        output_dir/adapter or output_dir/model, replaced in one rename."""
        name = output_name(self.method)
        final = self.out / name
        tmp = self.out / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        with reporting_full_disk(final):
            try:
                save_trained(model or self.model, self.method, tmp)
                self.tokenizer.save_pretrained(tmp)
                if self.objective.output == "score":
                    finish_reward_output(tmp, self.method.trains_adapter, self.pad_id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def _summary(self, last: dict, val: dict | None, final: Path) -> dict:
        counts = trainable_parameters(self.model)
        return {
            "method": self.method.name,
            "steps": self.total_steps,
            "epochs": round(self.plan.epoch_of(self.total_steps), 4),
            "tokens": self.counters["tokens"],
            "trained_tokens": self.counters["trained_tokens"],
            "seconds": round(self.counters["seconds"], 2),
            "final_train_loss": last.get("loss"),
            "final_val_loss": val and val.get("val_loss"),
            "final_val_ppl": val and val.get("val_ppl"),
            "objective": self.objective.name,
            **{
                f"final_{k}": v
                for k, v in (val or {}).items()
                if self.unit_loss is not None and k not in ("val_loss", "val_units")
            },
            "trainable_parameters": counts.trainable,
            "total_parameters": counts.total,
            "device": self.device_type,
            "processes": self.world.size,
            "distributed": self.strategy,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokens_per_s": round(self.counters["tokens"] / max(self.counters["seconds"], 1e-9), 1),
            "speedups": self.speedups,
            "padding_free": self.padding_free,
            **peak_memory_bytes(self.device_type),
            **self._planned(),
            "output": str(final),
            "checkpoint": str(self.last_checkpoint),
        }

    def _planned(self) -> dict:
        """The planner's traced peak for this run, beside the measured one: on a GPU, and for
        benchmark runs (`model.init: random`)."""
        if self.planned_peak is None:
            return {}
        if self.device_type != "cuda" and self.config.model.init != "random":
            return {}
        return {"planned_peak_bytes": self.planned_peak(self.config)}


def make_run(config: RunConfig, **kwargs) -> Run:
    """The run of `config`: `Run`, or its objective's own (`Objective.run`: GRPO's
    `tunesmith.rollout.run.GRPORun`, which generates its batches)."""
    run_class = objective_of(config.objective).run_class or Run
    return run_class(config, **kwargs)


def train(config: RunConfig, resume: str | None = None, **kwargs) -> dict:
    """The training loop alone (setup, run, close); returns the summary also written to
    output_dir/summary.json. `tunesmith.train_job` is the whole of `tunesmith train`: the same
    loop plus the torchrun relaunch, what it prints and the end-of-training comparison."""
    run = make_run(config, resume=resume, **kwargs)
    run.setup()
    try:
        return run.run()
    finally:
        run.trackers.close()
