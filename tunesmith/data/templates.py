"""Chat templates: the built-in ones, choosing one for a run, and rendering a conversation
into text segments that are either prompt (masked) or response (trained).

Rendering is incremental: for each assistant turn i, the text of `messages[:i]` with the
generation prompt is the prompt, and what `messages[:i+1]` adds after it is the response —
the assistant's words and its end-of-turn token, exactly what the model must produce at
inference. A template for which these renderings are not prefixes of each other (one that
rewrites earlier turns) is refused with a clear error rather than masked wrongly."""

from __future__ import annotations

import warnings
from pathlib import Path

from tunesmith.data.sources import DataError

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
    if not formats & {"alpaca", "chat"}:
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


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render_segments(
    messages: list[dict[str, str]], template: str, tokenizer, where: str
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) segments whose concatenation
    is the full rendering. Responses are assistant turns with their end-of-turn text; an
    assistant turn before any user turn has nothing it answers, and is context (masked)."""
    segments: list[tuple[str, bool]] = []
    done = ""
    asked = False
    try:
        for i, message in enumerate(messages):
            asked = asked or message["role"] in ("user", "tool")
            if message["role"] != "assistant" or not asked:
                continue  # rendered as part of the next prompt
            prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True)
            _check_prefix(done, prompt, where, i)
            text = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
            _check_prefix(prompt, text, where, i)
            segments += [(prompt[len(done) :], False), (text[len(prompt) :], True)]
            done = text
        if messages[-1]["role"] != "assistant" or not asked:
            text = render(tokenizer, template, messages, add_generation_prompt=False)
            _check_prefix(done, text, where, len(messages) - 1)
            segments.append((text[len(done) :], False))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Jinja raise_exception() and template bugs
        raise DataError(f"{where}: chat template failed: {err}") from None
    return [(text, trained) for text, trained in segments if text]


def _check_prefix(done: str, text: str, where: str, index: int) -> None:
    if not text.startswith(done):
        raise DataError(
            f"{where}: the chat template rewrites earlier turns when message {index} is added, so "
            "responses cannot be masked reliably; choose another data.chat_template"
        )
