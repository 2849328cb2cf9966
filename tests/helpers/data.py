"""Tokenizers built offline from the bundled tokenizer file, and small data files."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunesmith.config import DataSection

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"


def chat_tokenizer():
    """The bundled tokenizer: byte-level BPE with ChatML tokens and the ChatML template."""
    return AutoTokenizer.from_pretrained(BUNDLED)


def plain_tokenizer(bos: bool = False):
    """The same vocabulary with no chat template; with `bos`, plain encodes start with BOS."""
    extra = {"bos_token": "<|endoftext|>", "add_bos_token": True} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_file=str(BUNDLED / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        **extra,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_section(tmp_path: Path, datasets, **settings) -> DataSection:
    settings.setdefault("cache_dir", str(tmp_path / "cache"))
    settings.setdefault("max_seq_len", 256)
    return DataSection.model_validate({"datasets": datasets, **settings})


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
