"""Chat templates: the built-in ones, choosing one for a run, and rendering a conversation
whole with the character spans of the assistant turns that train (`render_conversation`).

A response is what the model must produce at inference: what the template adds after the
generation prompt (the rendering of `messages[:i]` with `add_generation_prompt`) for turn i,
the assistant's words and the end-of-turn marker that stops generation, nothing after it.
Templates that render the whole conversation with each such prompt and response in place are
masked exactly; where a template rewrites earlier turns, each response is found in the whole
rendering and the turn is reported as inexact; a turn found nowhere is an error naming it.
`tests/data/chat_templates/` holds the published templates of 14 model families this is
tested on."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.sources import DataError

END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
)
"""Tokens that end a chat model's turn (besides its EOS), where its vocabulary has them."""

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3": (
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% else %}{{ 'Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\\n\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
TEMPLATE_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}


def resolve_chat_template(setting: str, tokenizer, formats: set[str]) -> tuple[str | None, str]:
    """The template text and a short name for it, for `data.chat_template` = `setting`.
    Returns (None, "none") when no source needs a template (completion/tokenized only)."""
    if not formats & {"alpaca", "chat", "preference", "unpaired", "prompt"}:
        return None, "none"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: use the default one
        own = own.get("default")
    if setting in ("auto", "tokenizer"):
        if own:
            return own, "tokenizer"
        if setting == "auto" and formats <= {"alpaca"}:
            return BUILTIN_TEMPLATES["alpaca"], "alpaca"
        raise DataError(
            "data.chat_template: the tokenizer has no chat template; choose a built-in one "
            "(chatml, llama-3, alpaca) or a .jinja file"
        )
    if setting in BUILTIN_TEMPLATES:
        _warn_missing_markers(setting, tokenizer)
        return BUILTIN_TEMPLATES[setting], setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template: {setting}: no such template file")
    return path.read_text(encoding="utf-8"), path.name


def _warn_missing_markers(name: str, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    missing = [m for m in TEMPLATE_MARKERS[name] if m not in vocab]
    if missing:
        warnings.warn(
            f"data.chat_template {name}: {', '.join(missing)} are not tokens of this tokenizer, "
            "so each is learned as several pieces; add them as special tokens (and resize the "
            "embeddings) or use a template the tokenizer knows",
            stacklevel=2,
        )


def end_of_turn_markers(tokenizer) -> tuple[str, ...]:
    """The texts that end an assistant turn for this tokenizer: its EOS and the known
    end-of-turn tokens it has (what generation stops at, `generation.stop_token_ids`)."""
    vocab = tokenizer.get_vocab()
    markers = [m for m in END_OF_TURN_MARKERS if m in vocab]
    eos = tokenizer.eos_token
    return tuple(dict.fromkeys([eos, *markers] if eos else markers))


def render(
    tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, **kwargs
) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@dataclass
class Rendered:
    """A conversation as its chat template renders it whole (`text`), with the character
    spans of the assistant turns that train: each turn's words and its end-of-turn marker."""

    text: str
    spans: list[tuple[int, int]]
    inexact: list[int] = field(default_factory=list)
    """Assistant turns (counted from 1) trained behind a prompt that is not the one the
    template renders for generation (it rewrites earlier turns, or its generation prompt is
    not how it renders the turn)."""
    dropped: list[int] = field(default_factory=list)
    """System and user messages (their index) whose text the template leaves out."""

    def segments(self) -> list[tuple[str, bool]]:
        """(text, is_response) pieces whose concatenation is `text`."""
        out, at = [], 0
        for start, end in self.spans:
            out += [(self.text[at:start], False), (self.text[start:end], True)]
            at = end
        out.append((self.text[at:], False))
        return [(text, trained) for text, trained in out if text]


def render_conversation(
    messages: list[dict[str, str]],
    template: str,
    tokenizer,
    where: str,
    template_kwargs: dict | None = None,
    markers: tuple[str, ...] | None = None,
) -> Rendered:
    """The conversation rendered whole, and where each assistant turn that answers something
    lies in it (an assistant turn before any user turn is context, masked).

    A turn's response is what the template adds after its generation prompt: the rendering of
    `messages[:i+1]` after that of `messages[:i]` with `add_generation_prompt`, up to and with
    the first end-of-turn marker (a newline after it is the next prompt's). Most templates
    render the whole conversation with that prompt and response in place: the mask is exact.
    Where a template rewrites earlier turns once later ones follow (Mistral moves the system
    prompt to the last user turn, Qwen3 drops the thinking of earlier turns) or renders a turn
    otherwise than its generation prompt says (DeepSeek-R1's `<think>`), the response is found
    in the whole rendering, and the turn is listed in `inexact`. A turn found nowhere is a
    `DataError` naming it. `markers`: `end_of_turn_markers(tokenizer)`, when the caller has
    them (reading a tokenizer's vocabulary is slow)."""
    kwargs = template_kwargs or {}
    markers = markers if markers is not None else end_of_turn_markers(tokenizer)

    def draw(part: list[dict], generation: bool) -> str:
        return render(tokenizer, template, part, generation, **kwargs)

    try:
        full = draw(messages, False)
        spans: list[tuple[int, int]] = []
        inexact: list[int] = []
        asked, turn = False, 0
        for i, message in enumerate(messages):
            asked = asked or message["role"] in ("user", "tool")
            if message["role"] != "assistant" or not asked:
                continue
            turn += 1
            done = spans[-1][1] if spans else 0
            prompt = draw(messages[:i], True)
            response = _response(draw, messages, i, prompt, markers)
            span = None
            if response is not None:
                if full.startswith(prompt + response) and len(prompt) >= done:
                    span = (len(prompt), len(prompt) + len(response))
                elif (at := full.find(response, done)) >= 0:
                    span = (at, at + len(response))
            span = span or _by_sentinel(draw, messages, i, full, done, markers, prompt)
            if span is None:
                raise DataError(
                    f"{where}: assistant turn {turn} (message {i}): the chat template renders "
                    "it differently within the conversation than after its generation prompt, "
                    "so its tokens cannot be masked exactly; choose another data.chat_template"
                )
            if full[: span[0]] != prompt:
                inexact.append(turn)
            spans.append(span)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Jinja raise_exception() and template bugs
        raise DataError(f"{where}: chat template failed: {err}") from None
    dropped = [
        i
        for i, m in enumerate(messages)
        if m["role"] in ("system", "user") and m["content"].strip() not in full
    ]
    return Rendered(full, spans, inexact, dropped)


def _cut(text: str, markers: tuple[str, ...]) -> str:
    """`text` up to and with its first end-of-turn marker (all of it when it has none)."""
    ends = [at + len(m) for m in markers if (at := text.find(m)) >= 0]
    return text[: min(ends)] if ends else text


def _response(draw, messages, i: int, prompt: str, markers) -> str | None:
    """What rendering message i (an assistant turn) adds after its generation prompt."""
    text = draw(messages[: i + 1], False)
    if text.startswith(prompt):
        response = text[len(prompt) :]
    else:  # the generation prompt is not how the template renders the turn: keep what differs
        before = draw(messages[:i], False)
        if not (text.startswith(before) and prompt.startswith(before)):
            return None
        turn, generation = text[len(before) :], prompt[len(before) :]
        response = turn[len(os.path.commonprefix([turn, generation])) :]
    response = _cut(response, markers)
    return response or None


SENTINEL = "\ue000\ue001{}\ue002"
"""A stand-in for a turn's content: private-use characters and digits, which no template
filter (trim, upper, split on </think>) changes."""


def _by_sentinel(
    draw, messages, i: int, full: str, done: int, markers, prompt: str
) -> tuple[int, int] | None:
    """Where turn i's content lies in `full`, found by rendering the conversation with a
    stand-in for it: what the template writes before and after the stand-in must be what it
    writes around the real content. The span runs on to the end-of-turn marker after it, and
    back over whitespace before it that the generation prompt `prompt` does not end with
    (Mistral's " " after [/INST]: the model writes it)."""
    sentinel = SENTINEL.format(i)
    probe = [*messages[:i], {**messages[i], "content": sentinel}, *messages[i + 1 :]]
    text = draw(probe, False)
    at = text.find(sentinel)
    if at < 0:
        return None
    left, right = text[:at], text[at + len(sentinel) :]
    if len(left) < done or len(left) + len(right) > len(full):
        return None
    if not (full.startswith(left) and full.endswith(right)):
        return None
    end = len(full) - len(right)
    gap = len(right) - len(right.lstrip())
    marker = next((m for m in markers if right[gap:].startswith(m)), None)
    if marker is not None:
        end += gap + len(marker)
    start = len(left)
    space = len(left) - len(left.rstrip())
    owed = len(prompt) - len(prompt.rstrip())
    return max(done, start - max(0, space - owed)), end


def render_segments(
    messages: list[dict[str, str]], template: str, tokenizer, where: str
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_response) segments (see `render_conversation`)."""
    return render_conversation(messages, template, tokenizer, where).segments()
