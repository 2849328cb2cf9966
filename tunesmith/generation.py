"""Generation for `tunesmith generate`, `tunesmith chat` and generation-based evaluation.

Prompts are encoded exactly as training encodes them: the conversation is rendered by the chat
template segment by segment (`render_segments`) and each segment tokenized on its own, so the
model sees at inference the same token boundaries it was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TextStreamer

from tunesmith.data.encode import bos_prefix, conversation_parts
from tunesmith.errors import TunesmithError

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def prompt_ids(messages: list[dict], template: str, tokenizer, add_bos: bool) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt: the parts
    training encodes before a response (`conversation_parts`), tokenized the same way."""
    probe = [*messages, {"role": "assistant", "content": "x"}]
    parts = conversation_parts(probe, template, tokenizer, add_bos, bos_prefix(tokenizer), "prompt")
    last = max(i for i, (_, trained) in enumerate(parts) if trained is True)
    texts = [part for part, _ in parts[:last] if isinstance(part, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids: list[int] = []
    for part, _ in parts[:last]:
        ids += list(next(encoded)) if isinstance(part, str) else part
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config and tokenizer, plus end-of-turn markers the vocabulary
    has (a chat model must stop at the end of its turn)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif value:
            ids += list(value)
    vocab = tokenizer.get_vocab()
    ids += [vocab[m] for m in END_OF_TURN_MARKERS if m in vocab]
    return sorted(set(ids))


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 16
) -> list[str]:
    """Decode a completion for each prompt (ids), batched with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    out: list[str] = []
    for at in range(0, len(prompts), batch_size):
        chunk = prompts[at : at + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
            **sampling.generate_kwargs(),
        )
        for row in generated[:, width:].tolist():
            out.append(tokenizer.decode(_until_stop(row, stops), skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def chat_template_of(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TunesmithError("the tokenizer has no chat template; use --raw to complete plain text")
    return template


def stream_reply(model, tokenizer, ids: list[int], sampling: Sampling, echo) -> str:
    """Generate from `ids`, calling `echo(text_piece)` as tokens arrive; returns the text."""

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            echo(text)

    if not ids:
        raise TunesmithError(
            "the prompt is empty: it gives no tokens (and this tokenizer adds no BOS); give some "
            "text to continue"
        )
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling.generate_kwargs(),
        )
    new = _until_stop(generated[0, len(ids) :].tolist(), stops)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
