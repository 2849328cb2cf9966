"""Loading a base model's tokenizer (and, with the training capability, the model) with the
run config's policy: no remote code unless asked, a clear error when the path is wrong."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError, first_line


def load_tokenizer(model: ModelSection):
    """The tokenizer of `model.tokenizer` or `model.path` (a directory or hub id). Gives it a
    pad token (the EOS) when it has none, for batching."""
    from transformers import AutoTokenizer

    source = model.tokenizer or model.path
    key = "model.tokenizer" if model.tokenizer else "model.path"
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().is_dir():
        raise TunesmithError(f"{key}: {source}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise TunesmithError(
            f"{key}: cannot load a tokenizer from {source!r}: {first_line(err)}. Give a local "
            "checkpoint directory with tokenizer files, or a hub id (needs network)"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
