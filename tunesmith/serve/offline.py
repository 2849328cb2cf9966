"""Generation without a server on the serving engine: `tunesmith generate` and `chat` stream a
reply from it, evaluation's generation metrics decode their prompts on it.

The engine runs in the calling thread (`Engine.run`): the prompts share its slot cache,
chunked prefill and batched decode, each row through the model's active adapter, and greedy
decoding gives the tokens transformers' `generate` gives (the tests hold it to that). A model
the engine cannot route keeps transformers' `generate` (`tunesmith.generation`): several
active adapters (stacked) or adapters merged into the weights."""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.adapters.state import adapter_state, holders, linear_wrappers
from tunesmith.errors import TunesmithError
from tunesmith.generation import Sampling, check_prompt, generate_batch, stream_reply
from tunesmith.serve.engine import Engine, Params, Sequence


def why_not(model) -> str | None:
    """Why the engine cannot generate for `model` as it stands (None: it can)."""
    if len(adapter_state(model).active) > 1:
        return "several adapters are active (stacked)"
    if any(layer.merged for _, layer in linear_wrappers(model)):
        return "adapters are merged into the weights"
    return None


def generate_texts(
    model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 16
) -> list[str]:
    """A completion for each prompt (ids), at most `batch_size` decoded at once."""
    if why_not(model) is not None:
        return generate_batch(model, tokenizer, prompts, sampling, batch_size)
    sequences = _run(model, tokenizer, prompts, sampling, batch_size, None)
    return [seq.text.strip() for seq in sequences]


def stream_text(model, tokenizer, ids: list[int], sampling: Sampling, echo) -> str:
    """Generate from `ids`, calling `echo(text_piece)` as tokens arrive; returns the text."""
    if why_not(model) is not None:
        return stream_reply(model, tokenizer, ids, sampling, echo)
    (seq,) = _run(model, tokenizer, [ids], sampling, 1, echo)
    return seq.text.strip()


def _run(
    model, tokenizer, prompts, sampling: Sampling, batch_size: int, echo: Callable | None
) -> list[Sequence]:
    params = Params(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )

    def on_event(kind, value):
        if kind == "text" and echo is not None:
            echo(value)

    return run_sequences(model, tokenizer, prompts, [params] * len(prompts), batch_size, on_event)


def run_sequences(
    model, tokenizer, prompts, params: list[Params], batch_size: int, on_event=None
) -> list[Sequence]:
    """Each prompt (ids) decoded to its end with its own `params`, at most `batch_size` at
    once, through the model's active adapter (none inside `adapters.disabled()`); the model's
    train/eval mode is restored afterwards. A failed sequence raises its error."""
    reason = why_not(model)
    if reason is not None:
        raise TunesmithError(f"the serving engine cannot generate for this model: {reason}")
    for prompt in prompts:
        check_prompt(prompt)
    active = adapter_state(model).active
    off = any(holder.disabled for _, holder in holders(model))  # inside adapters.disabled()
    adapter = active[0] if active and not off else None
    listen = on_event or (lambda kind, value: None)
    sequences = [Sequence(p, adapter, q, listen) for p, q in zip(prompts, params, strict=True)]
    was_training = model.training
    engine = Engine(model, tokenizer, max_running=max(1, min(batch_size, len(prompts))))
    try:
        engine.run(sequences)
    finally:
        model.train(was_training)
    for seq in sequences:
        if seq.exception is not None:
            raise seq.exception
        if seq.finish_reason == "error":
            raise TunesmithError("generation failed")
    return sequences
