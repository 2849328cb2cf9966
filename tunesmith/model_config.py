"""A checkpoint's transformers config, read with one-line errors, and the one-line error for
anything transformers could not load (a checkpoint that ships its own code says what
`trust_remote_code` would do). The bottom of the model-loading layer: `models` (loading) and
`quantized/bnb.py` (quantize-on-load) both read configs through it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from tunesmith.errors import TunesmithError, first_line
from tunesmith.paths import model_source


def needs_remote_code(err: BaseException) -> bool:
    text = str(err)
    return "trust_remote_code" in text or "contains custom code" in text


def load_failure(key: str, source: str, what: str, err: BaseException, hint: str):
    """The one-line error for a model/tokenizer/config that transformers could not load; a
    checkpoint that ships its own Python code says what `trust_remote_code` would do."""
    if needs_remote_code(err):
        return TunesmithError(
            f"{key}: {source} ships its own Python code, which transformers must run to load "
            f"{what}; model.trust_remote_code: true (generate and chat: --trust-remote-code) "
            "would run that code on this machine: set it only if you trust where the checkpoint "
            "came from"
        )
    return TunesmithError(f"{key}: cannot load {what} from {source!r}: {first_line(err)}. {hint}")


def read_model_config(
    source: str,
    key: str = "model.path",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The transformers config of a checkpoint folder or hub id, with one-line errors."""
    path = model_source(source, key)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise TunesmithError(f"{key}: {path}: no config.json there (no such model folder)")
    try:
        return AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise load_failure(
            key,
            source,
            "a model config",
            err,
            "Give a local folder with config.json, or a hub id (needs network)",
        ) from None
