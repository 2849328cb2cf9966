"""`tunesmith export --format gguf --ollama`: an Ollama `Modelfile` beside the GGUF file, so
`ollama create NAME -f Modelfile` makes a model that chats as training rendered the chats.

The chat template is translated to Ollama's Go-template `TEMPLATE` for the families whose
markers identify them (ChatML, Llama 3, Mistral's [INST], Alpaca); for any other template the
Modelfile names none and says so, and Ollama falls back to the GGUF file's own
`tokenizer.chat_template`. Stop tokens are the tokenizer's end-of-turn texts (what generation
stops at); sampling parameters come from the model's generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.io import atomic_write_text

MODELFILE = "Modelfile"

TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
    ),
    "llama-3": (
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "[INST]",
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] '
        "{{ if $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
        '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}',
    ),
    "alpaca": (
        "### Instruction:",
        "{{ if .System }}{{ .System }}\n\n{{ end }}{{- range .Messages }}"
        '{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
        '{{- else if eq .Role "assistant" }}{{ .Content }}\n\n{{ end }}{{ end }}',
    ),
}
"""family: (the marker that identifies its template, Ollama's TEMPLATE for it)."""


def template_family(chat_template: str | None) -> str | None:
    """The family of a Jinja chat template, by its markers; None when none is known."""
    if not chat_template:
        return None
    for family, (marker, _) in TEMPLATES.items():
        if marker in chat_template:
            return family
    return None


def modelfile_text(
    gguf_name: str, chat_template: str | None, stops: list[str], source: str | Path
) -> tuple[str, list[str]]:
    """(the Modelfile, notes): FROM the GGUF file beside it, TEMPLATE, stop tokens and the
    sampling parameters of `source`'s generation_config.json."""
    notes = []
    lines = [f"FROM ./{gguf_name}"]
    family = template_family(chat_template)
    if family is not None:
        lines.append(f'TEMPLATE """{TEMPLATES[family][1]}"""')
    elif chat_template:
        notes.append(
            "Modelfile: the chat template is not one Ollama's TEMPLATE is written for here "
            "(ChatML, Llama 3, Mistral, Alpaca); Ollama uses the GGUF's own chat template"
        )
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    generation = Path(source) / "generation_config.json"
    if generation.is_file():
        try:
            config = json.loads(generation.read_text())
        except (OSError, ValueError):
            config = {}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = "repeat_penalty" if key == "repetition_penalty" else key
                lines.append(f"PARAMETER {name} {value}")
    return "\n".join(lines) + "\n", notes


def write_modelfile(out: Path, chat_template, stops, source) -> tuple[Path, list[str]]:
    """Write the Modelfile beside the GGUF file `out`."""
    text, notes = modelfile_text(out.name, chat_template, stops, source)
    return atomic_write_text(text, out.parent / MODELFILE), notes
