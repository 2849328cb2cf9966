"""Model cards: every folder tunesmith writes a model or an adapter into gets a README.md that
says what it is, with the Hugging Face model-card metadata in its YAML front matter
(`base_model`, `library_name`, `pipeline_tag`, `tags`, `datasets`, `license`), so the hub
shows it and `huggingface_hub.ModelCard` reads it.

    card = Card("quickstart", base_model="examples/tiny-llama", library_name="peft", ...)
    write_card(folder, card)

A base given as a local path is named in the text, not in `base_model` (the hub wants a repo
id there); the license is the base's own, read from the base folder's README.md front matter
when it has one (nothing is fetched)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.io import atomic_write_text
from tunesmith.paths import looks_local

CARD_NAME = "README.md"


@dataclass
class Card:
    title: str
    base_model: str | None = None
    """The base as the user named it: a hub id (goes in the metadata) or a local path."""
    library_name: str = "transformers"
    """`peft` for an adapter, `transformers` for a whole model."""
    pipeline_tag: str = "text-generation"
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    """Data sources as named in the run; hub ids go in the metadata, files in the text."""
    license: str | None = None
    summary: str = ""
    """The first paragraph: what this folder holds."""
    sections: list[tuple[str, str]] = field(default_factory=list)
    """(heading, Markdown) after the summary."""

    def metadata(self) -> dict:
        meta: dict = {}
        if self.base_model and not looks_local(self.base_model):
            meta["base_model"] = self.base_model
        meta["library_name"] = self.library_name
        meta["pipeline_tag"] = self.pipeline_tag
        meta["tags"] = list(dict.fromkeys(["tunesmith", *self.tags]))
        hub_data = [d for d in self.datasets if not _local_data(d)]
        if hub_data:
            meta["datasets"] = hub_data
        if self.license:
            meta["license"] = self.license
        return meta

    def text(self) -> str:
        front = yaml.safe_dump(self.metadata(), sort_keys=False, allow_unicode=True)
        parts = [f"---\n{front}---", f"# {self.title}"]
        if self.summary:
            parts.append(self.summary)
        for heading, body in self.sections:
            parts.append(f"## {heading}\n\n{body.strip()}")
        return "\n\n".join(parts) + "\n"


DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def _local_data(source: str) -> bool:
    return Path(source).suffix in DATA_SUFFIXES or looks_local(source)


def base_license(base: str | None) -> str | None:
    """The license in a local base folder's README.md front matter, if it says one."""
    if not base or not looks_local(base):
        return None
    readme = Path(base).expanduser() / CARD_NAME
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    head = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError:
        return None
    found = meta.get("license") if isinstance(meta, dict) else None
    return str(found) if isinstance(found, (str, int, float)) else None


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_card(folder: str | Path, card: Card) -> Path:
    """Write `card` as folder/README.md (atomically)."""
    return atomic_write_text(card.text(), Path(folder) / CARD_NAME)
