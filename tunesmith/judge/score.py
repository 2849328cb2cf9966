"""`tunesmith score`: a reward model's scores for prompt/answer records.

    scores = RewardModel.load("outputs/reward/adapter").score_records(records)

A reward model is what `objective: reward` writes: an adapter (PEFT, task_type SEQ_CLS, its
score head in modules_to_save) on a base, or a whole `...ForSequenceClassification` model.
Records are unpaired `{"prompt", "completion"}` (one score) or preference pairs
`{"prompt", "chosen", "rejected"}` (a score for each, and whether chosen wins), text or
messages, rendered through the chat template as training renders them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from tunesmith.adapters import load_adapter
from tunesmith.config import ModelSection
from tunesmith.data.encode import EncodeSettings
from tunesmith.data.pack import collate
from tunesmith.data.preference import Messages, encode_answer, parse_pair, parse_unpaired
from tunesmith.data.sources import DataError, Record
from tunesmith.data.templates import end_of_turn_markers, resolve_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from tunesmith.objectives.rows import SCORE_HEAD
from tunesmith.train.logps import sequence_scores
from tunesmith.train.objective import add_score_head


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    settings: EncodeSettings
    device: str
    _markers: tuple[str, ...] | None = None

    @classmethod
    def load(
        cls,
        path: str,
        base: str | None = None,
        device: str = "auto",
        max_seq_len: int = 2048,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        folder = Path(path)
        adapter = (folder / "adapter_config.json").is_file()
        if not adapter and not (folder / "config.json").is_file():
            raise TunesmithError(
                f"{path}: not a reward model (no adapter_config.json or config.json); give the "
                "adapter or model folder that `tunesmith train` with objective: reward wrote"
            )
        device_name = resolve_device(device)
        if adapter:
            raw = json.loads((folder / "adapter_config.json").read_text())
            heads = raw.get("modules_to_save") or []
            if raw.get("task_type") != "SEQ_CLS" or SCORE_HEAD not in heads:
                raise TunesmithError(
                    f"{path}: this adapter has no score head (task_type {raw.get('task_type')!r});"
                    " train one with objective: reward"
                )
            base = base or raw.get("base_model_name_or_path")
            if not base:
                raise TunesmithError(f"{path}: the adapter names no base; give it with --model")
            section = ModelSection(path=base, trust_remote_code=trust_remote_code)
            model = load_model(section, device_name, resolve_dtype("auto", device_name))
            add_score_head(model, 0)  # its weights come from the adapter
            load_adapter(model, str(folder), name="reward")
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, trust_remote_code=trust_remote_code
            ).to(device_name)
            if model.config.num_labels != 1:
                raise TunesmithError(
                    f"{path}: a classifier with {model.config.num_labels} labels, not a reward "
                    "model (one score)"
                )
        tokenizer_from = path if (folder / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer(
            ModelSection(path=tokenizer_from or path, trust_remote_code=trust_remote_code)
        )
        template, name = resolve_chat_template("auto", tokenizer, {"preference"})
        settings = EncodeSettings(
            max_seq_len=max_seq_len, template=template, add_bos=name != "tokenizer"
        )
        return cls(model.eval(), tokenizer, settings, device_name)

    def _ids(self, prompt: Messages, answer: Messages, where: str) -> list[int]:
        if self._markers is None:
            self._markers = end_of_turn_markers(self.tokenizer)
        ids, _ = encode_answer(prompt, answer, self.tokenizer, self.settings, where, self._markers)
        return ids[: self.settings.max_seq_len]

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        pad = self.tokenizer.pad_token_id or 0
        out: list[float] = []
        for at in range(0, len(sequences), batch_size):
            chunk = [(ids, ids) for ids in sequences[at : at + batch_size]]
            batch = {k: v.to(self.device) for k, v in collate(chunk, pad).items()}
            out += sequence_scores(self.model, batch).values.tolist()
        return out

    def score_records(self, records: list[Record], batch_size: int = 8) -> list[dict]:
        """Each record's scores: {"score"} for a prompt/completion, {"score_chosen",
        "score_rejected"} for a pair."""
        sequences, shapes = [], []
        for record in records:
            data = record.data
            if "chosen" in data or "rejected" in data:
                pair = parse_pair(record)
                sequences += [
                    self._ids(pair.prompt, pair.chosen, record.where),
                    self._ids(pair.prompt, pair.rejected, record.where),
                ]
                shapes.append(2)
            elif "prompt" in data and "completion" in data:
                one = parse_unpaired(Record({"label": True, **data}, record.where))
                sequences.append(self._ids(one.prompt, one.completion, record.where))
                shapes.append(1)
            else:
                raise DataError(
                    f'{record.where}: expected "prompt" and "completion", or "chosen" and '
                    '"rejected" (with or without "prompt")'
                )
        scores = iter(self.score_ids(sequences, batch_size))
        return [
            {"score": next(scores)}
            if n == 1
            else {"score_chosen": next(scores), "score_rejected": next(scores)}
            for n in shapes
        ]


def pair_summary(results: list[dict]) -> str | None:
    pairs = [r for r in results if "score_chosen" in r]
    if not pairs:
        return None
    wins = sum(r["score_chosen"] > r["score_rejected"] for r in pairs)
    margin = sum(r["score_chosen"] - r["score_rejected"] for r in pairs) / len(pairs)
    return (
        f"{len(pairs)} pairs: chosen scored above rejected in {wins} ({wins / len(pairs):.1%}), "
        f"mean margin {margin:.4f}"
    )
