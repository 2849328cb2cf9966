"""Loading a base model's tokenizer (and, with the training capability, the model) with the
run config's policy: no remote code unless asked, a clear error when the path is wrong."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from tunesmith.errors import TunesmithError
from tunesmith.model_config import load_failure, read_model_config
from tunesmith.paths import model_source
from tunesmith.quantized.bnb import guard_cpu_packing
from tunesmith.quantized.gptq.files import load_gptq_checkpoint
from tunesmith.shards import check_safetensors_folder

if TYPE_CHECKING:
    from tunesmith.config import ModelSection

__all__ = [
    "enable_checkpointing",
    "load_failure",
    "load_model",
    "load_tokenizer",
    "read_model_config",
    "resolve_device",
    "resolve_dtype",
]


def load_tokenizer(model: ModelSection):
    """The tokenizer of `model.tokenizer` or `model.path` (a directory or hub id). Gives it a
    pad token (the EOS) when it has none, for batching."""
    key = "model.tokenizer" if model.tokenizer else "model.path"
    source = model_source(model.tokenizer or model.path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise load_failure(
            key,
            source,
            "a tokenizer",
            err,
            "Give a local checkpoint folder with tokenizer files, or a hub id (needs network)",
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(setting: str) -> str:
    """`model.device` to a torch device type: "auto" picks cuda, then mps, then cpu."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise TunesmithError("model.device: cuda was asked for but no CUDA GPU is visible")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise TunesmithError("model.device: mps was asked for but MPS is not available")
    return setting


def resolve_dtype(setting: str, device: str):
    """`model.dtype` to a torch dtype: "auto" is bf16 on GPUs that support it, fp16 on other
    GPUs and fp32 on CPU."""
    if setting == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]


def load_model(model: ModelSection, device: str, dtype):
    """The causal LM of `model.path` with weights in `dtype` on `device`. Safetensors only."""
    hf_logging.disable_progress_bar()  # our own progress output is enough
    source = model_source(model.path, "model.path")
    kwargs = {}
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    if getattr(model, "init", "pretrained") == "random":
        return random_model(model, device, dtype, kwargs.get("attn_implementation"))
    check_safetensors_folder(source)
    quant_method = _quant_method(source, model.revision)
    if quant_method in ("gptq", "pack-quantized"):  # tunesmith quantize rtn|gptq|awq, others
        return load_gptq_checkpoint(
            source,
            device,
            dtype,
            model.revision,
            model.trust_remote_code,
            kwargs.get("attn_implementation"),
        )
    if quant_method == "bitsandbytes":  # int8 / nf4: bitsandbytes places it (no .to())
        kwargs["device_map"] = device
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            dtype=dtype,
            use_safetensors=True,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise load_failure(
            "model.path",
            source,
            "a model",
            err,
            "Give a local checkpoint folder with safetensors weights, or a hub id (needs network)",
        ) from None
    if quant_method == "bitsandbytes":
        guard_cpu_packing(loaded)
        return loaded
    return loaded.to(device)


def random_model(model: ModelSection, device: str, dtype, attention: str | None = None):
    """`model.init: random`: the architecture of model.path's config.json, with random weights
    made directly on `device` (no checkpoint is read)."""
    config = read_model_config(model.path, "model.path", model.revision, model.trust_remote_code)
    if attention is not None:
        config._attn_implementation = attention
    with torch.device(device):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=model.trust_remote_code
        )


def _quant_method(source: str, revision: str | None) -> str | None:
    """config.json's quantization_config.quant_method of a local checkpoint (hub ids: None;
    transformers handles those)."""
    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    method = qconfig.get("quant_method")
    if method == "compressed-tensors" and qconfig.get("format") == "pack-quantized":
        return "pack-quantized"  # integer weights: tunesmith's loader (any device)
    return method


def enable_checkpointing(model) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant, for training and for the
    planner's trace. transformers 5 deprecates `gradient_checkpointing_enable` in favour of
    `activation_checkpointing_enable`; the old call, which the tests cover, is kept (it exists
    in every transformers the project admits), without its FutureWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
"""Where decoder-only models of transformers keep their stack of decoder layers."""


def decoder_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """(path, layers) of the model's stack of decoder layers: the first of `LAYER_PATHS` that
    holds a ModuleList, else the first ModuleList of modules of one type; None without one."""
    for path in LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return path, layers
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            if all(type(m) is type(module[0]) for m in module):
                return path, module
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (see `decoder_stack`); [] when it has none."""
    stack = decoder_stack(model)
    return list(stack[1]) if stack else []
