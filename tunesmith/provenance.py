"""Which base an adapter was trained on, and whether the base loaded now is that one.

PEFT records only `base_model_name_or_path`. A relative path there means nothing from another
folder (and looks like a hub id), so tunesmith stores local bases as absolute paths and writes
`tunesmith_base.json` beside the adapter: the path, the architecture's shape and a digest of the
weight files (their names, sizes and first and last MiB: cheap for any model size, and different
for different weights of the same shape). Loading an adapter compares that record with the base
it is put on and warns, naming what differs."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.paths import looks_local

RECORD_NAME = "tunesmith_base.json"
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
_EDGE_BYTES = 1 << 20


def local_base(source: str | None) -> Path | None:
    """The absolute folder of a local base checkpoint, or None for a hub id or nothing."""
    if not source:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.is_dir() else None


def base_fingerprint(folder: str | os.PathLike) -> dict:
    """{"shape": the config's SHAPE_KEYS, "weights": digest} of a local checkpoint folder."""
    folder = Path(folder)
    shape = {}
    config = folder / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError):
            raw = {}
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        shape = {k: text.get(k, raw.get(k)) for k in SHAPE_KEYS if k in text or k in raw}
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                digest.update(f.read(_EDGE_BYTES))
    return {"shape": shape, "weights": digest.hexdigest()[:16] if files else None}


def base_record(base: str | None) -> dict:
    """What RECORD_NAME holds for `base`: {"path"} for a hub id (or none), and for a local
    folder its absolute path with `base_fingerprint`."""
    folder = local_base(base)
    if folder is None:
        return {"path": base}
    return {"path": str(folder), **base_fingerprint(folder)}


def base_mismatch(adapter_folder: str | os.PathLike, base: str) -> str | None:
    """What differs between the base the adapter records and `base`, or None (same, or
    nothing to compare)."""
    record_path = Path(adapter_folder) / RECORD_NAME
    folder = local_base(base)
    if folder is None or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    now = base_fingerprint(folder)
    shape_then, shape_now = record.get("shape") or {}, now["shape"]
    differs = [
        f"{k} {shape_then[k]} then, {shape_now.get(k)} now"
        for k in shape_then
        if shape_now.get(k) != shape_then[k]
    ]
    if not differs and record.get("weights") and now["weights"] != record["weights"]:
        differs.append("the weight files differ")
    if not differs:
        return None
    return (
        f"adapter {adapter_folder} was trained on the base {record.get('path')}, and {base} "
        f"is not that model ({'; '.join(differs)}); its outputs will not be the trained ones. "
        "Give the base it was trained on with --model (or --base)"
    )


def resolve_base(model: str | None, adapters: list[str], missing: str) -> str:
    """The base model for `adapters`: `model` when given, else the one the first adapter
    records. Adapter folders must exist; a mismatch with an adapter's recorded base warns."""
    for adapter in adapters:
        if not Path(adapter).expanduser().is_dir():
            raise TunesmithError(f"--adapter: {adapter}: no such folder")
    if model is None and adapters:
        model = adapter_base(adapters[0])
        if model is not None and not local_base(model) and looks_local(model):
            raise TunesmithError(
                f"--adapter {adapters[0]}: its base {model} is not a folder here (a relative "
                "path is read from the current folder); give the base with --model"
            )
    if model is None:
        raise TunesmithError(missing)
    for adapter in adapters:
        message = base_mismatch(adapter, model)
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
    return model


def adapter_base(adapter: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`), if any."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except ValueError:
        raise TunesmithError(f"{config} is not valid JSON; the adapter is damaged") from None
    return (raw.get("base_model_name_or_path") if isinstance(raw, dict) else None) or None
