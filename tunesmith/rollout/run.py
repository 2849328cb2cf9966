"""GRPO's run: the training loop of `loop.Run` with batches it generates.

Each round takes `micro_batch_size × grad_accum_steps` prompts (in the epoch's seeded order),
samples `num_generations` completions of each on the serving engine (`serve.offline`), scores
them with the reward functions, turns the rewards into advantages within each prompt's group,
and makes the micro-batches (prompt + completion, only the completion labelled) that
`num_iterations` optimizer steps then train on. A completion's sampling seed is fixed by
(train.seed, round, prompt, k), so a sample does not depend on which process or batch makes it:
under torchrun each process generates only its own micro-batches and the step is the same as
on one. A checkpoint that falls inside a round (num_iterations > 1) keeps the round's
generations (`rollout.safetensors`), so a resumed run trains on the same samples.

Validation decodes one greedy completion per validation prompt and reports the rewards
(`val_reward`, `val_reward_<function>`); a few completions per validation go to
`completions.jsonl` for the report page."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import tunesmith.train.distributed as dist_run
from tunesmith.adapters import disabled
from tunesmith.adapters.dropout import hash_int, token_keys
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pack import collate
from tunesmith.errors import TrainingError
from tunesmith.objectives.grpo.impl import advantages
from tunesmith.objectives.grpo.rewards import Rewards
from tunesmith.objectives.rows import ADVANTAGES, OLD_LOGPS, REFERENCE_TOKEN_LOGPS
from tunesmith.rollout.prompts import read_prompts
from tunesmith.serve.engine import Params
from tunesmith.serve.offline import run_sequences, why_not
from tunesmith.train.batches import DROPOUT_KEYS
from tunesmith.train.logps import token_logps
from tunesmith.train.loop import Run
from tunesmith.train.loss import autocast_for, to_device
from tunesmith.train.objective import add_metrics, eval_mode

ROLLOUT_FILE = "rollout.safetensors"
COMPLETIONS_FILE = "completions.jsonl"
SQUARES = "_sq_"
"""Prefix of the summed squares a metric's standard deviation is computed from."""


@dataclass
class Rollout:
    key: tuple[int, int]
    """(epoch, round within the epoch)."""
    batches: list[dict | None]
    """The round's micro-batches; None for those another process generates."""
    metrics: dict


class RolloutPlan:
    """The steps of a GRPO run: rounds of prompts, `num_iterations` steps per round."""

    rows = None

    def __init__(self, run: GRPORun):
        cfg = run.config
        self.run = run
        self.prompts = len(run.prepared.train)
        self.micro_batch_size = cfg.train.micro_batch_size
        self.per_round = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        self.iterations = cfg.objective.num_iterations
        self.seed = cfg.train.seed
        self.rounds_per_epoch = math.ceil(self.prompts / self.per_round)
        self.steps_per_epoch = self.rounds_per_epoch * self.iterations

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        steps = max(1, math.ceil(epochs * self.steps_per_epoch))
        return math.ceil(steps / self.iterations) * self.iterations  # whole rounds

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def round_of(self, step: int) -> tuple[tuple[int, int], list[list[int]]]:
        """(epoch, round) of optimizer step `step` and its micro-batches' prompt indices."""
        epoch, within = divmod(step, self.steps_per_epoch)
        round_ = within // self.iterations
        order = np.random.default_rng([self.seed, epoch]).permutation(self.prompts)
        picked = order[round_ * self.per_round : (round_ + 1) * self.per_round]
        micro = [
            [int(p) for p in picked[at : at + self.micro_batch_size]]
            for at in range(0, len(picked), self.micro_batch_size)
        ]
        return (epoch, round_), micro

    def micro_batches(self, step: int) -> list[dict | None]:
        return self.run.rollout(step).batches


def sample_seed(seed: int, round_index: int, prompt: int, k: int) -> int:
    """The sampling seed of completion k of a prompt in a round (any process, any batch)."""
    return hash_int(hash_int(hash_int(seed) ^ round_index) ^ (prompt * 1009 + k))


def completion_ids(seq) -> list[int]:
    """What the model generated, its stop token included (the model learns to stop)."""
    ids = list(seq.tokens)
    if seq.stop_token is not None:
        ids.append(seq.stop_token)
    return ids


def _columns(prompts, repeat: int) -> dict:
    names = sorted({k for p in prompts for k in p.columns})
    return {n: [p.columns.get(n) for p in prompts for _ in range(repeat)] for n in names}


def _completion_value(prompt, text: str):
    """A completion as TRL hands it to reward functions: text, or a message list."""
    if isinstance(prompt.prompt, list):
        return [{"role": "assistant", "content": text}]
    return text


def reward_metrics(rewards: Rewards, scores: np.ndarray, total: np.ndarray, prefix: str = ""):
    """{metric: (sum, count)} of the rewards, with the summed squares of each for its std."""
    out = {
        f"{prefix}reward": (float(total.sum()), len(total)),
        f"{SQUARES}{prefix}reward": (float((total**2).sum()), len(total)),
    }
    for j, label in enumerate(rewards.labels):
        column = scores[:, j]
        seen = column[~np.isnan(column)]
        out[f"{prefix}reward_{label}"] = (float(seen.sum()), len(seen))
        out[f"{SQUARES}{prefix}reward_{label}"] = (float((seen**2).sum()), len(seen))
    return out


def with_stds(means: dict) -> dict:
    """Means with each `_sq_` entry turned into the standard deviation of its metric."""
    out = {}
    for name, value in means.items():
        if name.startswith(SQUARES):
            base = name[len(SQUARES) :]
            if base in means:
                out[f"{base}_std"] = math.sqrt(max(0.0, value - means[base] ** 2))
        else:
            out[name] = value
    return out


class GRPORun(Run):
    """`Run` for objective grpo."""

    def _prepare(self) -> None:
        cfg = self.config
        self.prepared = read_prompts(
            cfg.data, self.tokenizer, cfg.train.seed, cfg.objective.max_completion_tokens
        )
        self.rewards = Rewards(cfg.objective.rewards)
        self._rollout: Rollout | None = None

    def _make_plan(self) -> RolloutPlan:
        cfg = self.config
        if self.strategy == "fsdp":
            raise TrainingError(
                "objective grpo generates with the whole model, which FSDP shards; use "
                "train.distributed: ddp"
            )
        if self.world.size > cfg.train.grad_accum_steps:
            raise TrainingError(
                f"objective grpo on {self.world.size} processes needs train.grad_accum_steps "
                f">= {self.world.size} (each process generates whole micro-batches)"
            )
        reason = why_not(self.model)
        if reason is not None:
            raise TrainingError(f"objective grpo cannot generate with this model: {reason}")
        return RolloutPlan(self)

    def data_lines(self) -> list[str]:
        return self.prepared.summary_lines(self.config.objective.num_generations)

    # --- generation -------------------------------------------------------------------------

    def rollout(self, step: int) -> Rollout:
        key, micro = self.plan.round_of(step)
        if self._rollout is not None and self._rollout.key == key:
            return self._rollout
        epoch, round_ = key
        round_index = epoch * self.plan.rounds_per_epoch + round_
        first_step = epoch * self.plan.steps_per_epoch + round_ * self.plan.iterations
        size, rank = self.world.size, self.world.rank
        owned = [i for i in range(len(micro)) if i % size == rank]
        self._rollout = Rollout(key, [None] * len(micro), {})
        group = [p for i in owned for p in micro[i]]
        made = self._generate(group, round_index)
        totals: dict = {}
        scored = []
        for i in owned:
            n = len(micro[i])
            mine, made = made[:n], made[n:]
            scored.append((i, micro[i], mine))
        all_totals = []
        for _, prompts, seqs in scored:
            scores, total = self._score(prompts, seqs)
            all_totals.append(total)
            add_metrics(totals, reward_metrics(self.rewards, scores, total))
            lengths = [len(completion_ids(s)) for g in seqs for s in g]
            clipped = [s.finish_reason == "length" for g in seqs for s in g]
            add_metrics(totals, {"completion_length": (sum(lengths), len(lengths))})
            add_metrics(totals, {"completion_clipped": (sum(clipped), len(clipped))})
        scale, group_size = (
            self.config.objective.scale_rewards,
            self.config.objective.num_generations,
        )
        if scale == "batch":  # the std of the whole round: every process's rewards
            batch_std = self._batch_std(all_totals)
        for (i, prompts, seqs), total in zip(scored, all_totals, strict=True):
            if scale == "batch":
                adv = advantages(total, group_size, "none") / (batch_std + 1e-4)
            else:
                adv = advantages(total, group_size, scale)
            self._rollout.batches[i] = self._batch(prompts, seqs, adv, first_step)
        self._rollout.metrics = totals
        return self._rollout

    def _generate(self, prompts: list[int], round_index: int) -> list:
        """The completions of `prompts` (indices into the train prompts): one list of
        `num_generations` engine sequences per prompt."""
        cfg = self.config.objective
        ids, params = [], []
        for p in prompts:
            for k in range(cfg.num_generations):
                ids.append(self.prepared.train[p].ids)
                params.append(
                    Params(
                        max_tokens=cfg.max_completion_tokens,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        seed=sample_seed(self.config.train.seed, round_index, p, k),
                    )
                )
        if not ids:
            return []
        with torch.no_grad(), autocast_for(self.device_type, self.dtype):
            seqs = run_sequences(self.model, self.tokenizer, ids, params, cfg.generation_batch_size)
        g = cfg.num_generations
        return [seqs[at : at + g] for at in range(0, len(seqs), g)]

    def _score(self, prompts: list[int], groups: list) -> tuple[np.ndarray, np.ndarray]:
        records = [self.prepared.train[p] for p in prompts]
        return self._rewards_of(records, groups)

    def _rewards_of(self, records, groups) -> tuple[np.ndarray, np.ndarray]:
        g = len(groups[0]) if groups else 0
        texts = [s.text for group in groups for s in group]
        prompts = [r.prompt for r in records for _ in range(g)]
        completions = [
            _completion_value(r, t)
            for r, t in zip((r for r in records for _ in range(g)), texts, strict=True)
        ]
        columns = _columns(records, g)
        columns["completion_ids"] = [completion_ids(s) for group in groups for s in group]
        scores = self.rewards.score(prompts, completions, columns)
        return scores, self.rewards.total(scores)

    def _batch_std(self, totals: list[np.ndarray]) -> float:
        """The standard deviation of all rewards of the round, over every process."""
        values = np.concatenate(totals) if totals else np.zeros(0)
        n = dist_run.all_sum(len(values), self.device)
        s = dist_run.all_sum(float(values.sum()), self.device)
        sq = dist_run.all_sum(float((values**2).sum()), self.device)
        if n < 2:
            return 0.0
        return math.sqrt(max(0.0, (sq - s * s / n) / (n - 1)))

    def _batch(self, prompts: list[int], groups: list, adv: np.ndarray, step: int) -> dict:
        cfg = self.config.objective
        samples, segments = [], []
        for p, group in zip(prompts, groups, strict=True):
            prompt_ids = self.prepared.train[p].ids
            for k, seq in enumerate(group):
                done = completion_ids(seq)
                ids = prompt_ids + done
                labels = [IGNORE_INDEX] * len(prompt_ids) + done
                samples.append((ids, labels))
                segments.append([(p * cfg.num_generations + k, len(ids))])
        batch = collate(samples, self.pad_id)
        batch[ADVANTAGES] = torch.as_tensor(adv, dtype=torch.float32)
        batch[DROPOUT_KEYS] = token_keys(
            self.config.train.seed, step, segments, batch["input_ids"].shape[1]
        )
        needs_old = cfg.num_iterations > 1
        needs_ref = cfg.beta > 0
        if needs_old or needs_ref:
            on_device = to_device(batch, self.device)
            with torch.no_grad(), eval_mode(self.model), autocast_for(self.device_type, self.dtype):
                if needs_old:
                    batch[OLD_LOGPS] = token_logps(self.model, on_device)[0].float().cpu()
                if needs_ref:
                    batch[REFERENCE_TOKEN_LOGPS] = self._reference_logps(on_device)
        return batch

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        if self.reference_model is not None:
            return token_logps(self.reference_model, batch)[0].float().cpu()
        with disabled(self.model):
            return token_logps(self.model, batch)[0].float().cpu()

    # --- the step ---------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        result = super().train_step(step)
        rollout = self._rollout
        if rollout is not None and rollout.metrics is not None:  # every step of the round
            totals = rollout.metrics
            if self.world.distributed:
                totals = {
                    k: (dist_run.all_sum(v, self.device), int(dist_run.all_sum(c, self.device)))
                    for k, (v, c) in sorted(totals.items())
                }
            means = {k: s / c for k, (s, c) in totals.items() if c}
            result["metrics"] = {**with_stds(means), **result["metrics"]}
        return result

    # --- validation -------------------------------------------------------------------------

    def _validation_main(self, step: int, val) -> dict | None:
        cfg = self.config
        params = [
            Params(max_tokens=cfg.objective.max_completion_tokens, temperature=0.0, seed=0)
            for _ in val
        ]
        with torch.no_grad(), autocast_for(self.device_type, self.dtype):
            seqs = run_sequences(
                self.model,
                self.tokenizer,
                [p.ids for p in val],
                params,
                cfg.objective.generation_batch_size,
            )
        scores, total = self._rewards_of(val, [[s] for s in seqs])
        totals = reward_metrics(self.rewards, scores, total, "val_")
        lengths = [len(completion_ids(s)) for s in seqs]
        totals["val_completion_length"] = (sum(lengths), len(lengths))
        result = with_stds({k: s / c for k, (s, c) in totals.items() if c})
        result["val_prompts"] = len(val)
        self._log_metrics({"step": step, **result})
        self._write_samples(step, val, seqs, scores, total)
        shown = [f"validation reward {result['val_reward']:.4f}"]
        for label in self.rewards.labels:
            if f"val_reward_{label}" in result:
                shown.append(f"{label} {result[f'val_reward_{label}']:.4f}")
        self.progress.log(f"step {step}: " + ", ".join(shown))
        return result

    def _write_samples(self, step, val, seqs, scores, total) -> None:
        keep = max(0, self.config.eval.show_samples)
        with open(self.out / COMPLETIONS_FILE, "a") as f:
            for i in range(min(keep, len(val))):
                entry = {
                    "step": step,
                    "prompt": val[i].prompt,
                    "completion": seqs[i].text,
                    "reward": float(total[i]),
                    "rewards": {
                        label: (None if math.isnan(scores[i, j]) else float(scores[i, j]))
                        for j, label in enumerate(self.rewards.labels)
                    },
                }
                f.write(json.dumps(entry) + "\n")

    # --- checkpoints ------------------------------------------------------------------------

    def _save(self, step: int) -> Path:
        self._pending = None
        if step % self.plan.iterations and self._rollout is not None:  # inside a round
            mine = {i: b for i, b in enumerate(self._rollout.batches) if b is not None}
            if self.world.distributed:
                gathered = [None] * self.world.size
                dist.all_gather_object(gathered, mine)
                mine = {i: b for part in gathered for i, b in part.items()}
            self._pending = (self._rollout.key, mine)
        return super()._save(step)

    def _checkpoint_extras(self, folder: Path) -> None:
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        key, batches = pending
        tensors = {"key": torch.tensor(key, dtype=torch.int64)}
        for i, batch in batches.items():
            for name, value in batch.items():
                tensors[f"{i}.{name}"] = value.contiguous()
        save_file(tensors, str(Path(folder) / ROLLOUT_FILE))

    def _restore_state(self, folder: Path, state: dict, optimizer_state, rng) -> None:
        super()._restore_state(folder, state, optimizer_state, rng)
        path = Path(folder) / ROLLOUT_FILE
        if not path.is_file():
            return
        found = load_file(str(path))
        key = tuple(int(v) for v in found.pop("key").tolist())
        _, micro = self.plan.round_of(self.start_step)
        batches: list[dict | None] = [None] * len(micro)
        for name, value in found.items():
            index, entry = name.split(".", 1)
            i = int(index)
            if i % self.world.size == self.world.rank:
                if batches[i] is None:
                    batches[i] = {}
                batches[i][entry] = value
        self._rollout = Rollout(key, batches, None)
