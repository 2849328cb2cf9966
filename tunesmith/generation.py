"""Generation for `tunesmith generate`, `tunesmith chat` and generation-based evaluation.

A chat prompt is what the chat template renders with `add_generation_prompt`, encoded as
training encodes the prompt before a response (`conversation_parts`: segment by segment), so
the model sees at inference the tokens it was trained to answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TextStreamer

from tunesmith.data.encode import bos_prefix, conversation_parts
from tunesmith.data.templates import END_OF_TURN_MARKERS, render
from tunesmith.errors import TunesmithError


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


def prompt_ids(
    messages: list[dict],
    template: str,
    tokenizer,
    add_bos: bool,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt, as the chat
    template renders them (`add_generation_prompt`): the parts training encodes before a reply
    to `messages`, tokenized the same way. Where the template renders a reply behind another
    prompt than its generation prompt (DeepSeek-R1's `<think>`), the generation prompt's text
    is kept, and what differs from training's is tokenized on its own."""
    kwargs = template_kwargs or {}
    probe = [*messages, {"role": "assistant", "content": "x"}]
    bos = bos_prefix(tokenizer)
    parts, _ = conversation_parts(probe, template, tokenizer, add_bos, bos, "prompt", kwargs)
    last = max(i for i, (_, trained) in enumerate(parts) if trained is True)
    try:
        wanted = render(tokenizer, template, messages, True, **kwargs)
    except Exception as err:  # noqa: BLE001 - Jinja raise_exception() and template bugs
        raise TunesmithError(f"the chat template failed on this conversation: {err}") from None
    pieces: list = []
    at = 0
    for part, _ in parts[:last]:
        if isinstance(part, str):
            if not wanted.startswith(part, at):
                break
            at += len(part)
        pieces.append(part)
    if at < len(wanted):
        pieces.append(wanted[at:])
    texts = [p for p in pieces if isinstance(p, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids: list[int] = []
    for piece in pieces:
        ids += list(next(encoded)) if isinstance(piece, str) else piece
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


def check_prompt(ids: list[int]) -> None:
    """A prompt must give at least one token."""
    if not ids:
        raise TunesmithError(
            "the prompt is empty: it gives no tokens (and this tokenizer adds no BOS); give some "
            "text to continue"
        )


def stream_reply(model, tokenizer, ids: list[int], sampling: Sampling, echo) -> str:
    """Generate from `ids`, calling `echo(text_piece)` as tokens arrive; returns the text."""

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            echo(text)

    check_prompt(ids)
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
