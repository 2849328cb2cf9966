"""Loading a base model's tokenizer (and, with the training capability, the model) with the
run config's policy: no remote code unless asked, a clear error when the path is wrong."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError, first_line
from tunesmith.paths import model_source
from tunesmith.shards import check_safetensors_folder


def load_tokenizer(model: ModelSection):
    """The tokenizer of `model.tokenizer` or `model.path` (a directory or hub id). Gives it a
    pad token (the EOS) when it has none, for batching."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if model.tokenizer else "model.path"
    source = model_source(model.tokenizer or model.path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise load_failure(
            key, source, "a tokenizer", err,
            "Give a local checkpoint folder with tokenizer files, or a hub id (needs network)",
        ) from None  # fmt: skip
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    source: str, key: str = "model.path", revision: str | None = None,
    trust_remote_code: bool = False,
):  # fmt: skip
    """The transformers config of a checkpoint folder or hub id, with one-line errors."""
    from transformers import AutoConfig

    path = model_source(source, key)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise TunesmithError(f"{key}: {path}: no config.json there (no such model folder)")
    try:
        return AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise load_failure(
            key, source, "a model config", err,
            "Give a local folder with config.json, or a hub id (needs network)",
        ) from None  # fmt: skip


def resolve_device(setting: str) -> str:
    """`model.device` to a torch device type: "auto" picks cuda, then mps, then cpu."""
    import torch

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
    import torch

    if setting == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]


def load_model(model: ModelSection, device: str, dtype):
    """The causal LM of `model.path` with weights in `dtype` on `device`. Safetensors only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress output is enough
    source = model_source(model.path, "model.path")
    check_safetensors_folder(source)
    kwargs = {}
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    quant_method = _quant_method(source, model.revision)
    if quant_method == "gptq":  # tunesmith quantize --method gptq|awq|rtn, or any GPTQ model
        from tunesmith.quantize.checkpoint import load_gptq_checkpoint

        return load_gptq_checkpoint(
            source, device, dtype, model.revision, model.trust_remote_code,
            kwargs.get("attn_implementation"),
        )  # fmt: skip
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
            "model.path", source, "a model", err,
            "Give a local checkpoint folder with safetensors weights, or a hub id (needs network)",
        ) from None  # fmt: skip
    if quant_method == "bitsandbytes":
        from tunesmith.qlora_base import guard_cpu_packing

        guard_cpu_packing(loaded)
        return loaded
    return loaded.to(device)


def _quant_method(source: str, revision: str | None) -> str | None:
    """config.json's quantization_config.quant_method of a local checkpoint (hub ids: None;
    transformers handles those)."""
    import json

    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return qconfig.get("quant_method")


def enable_checkpointing(model) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant, for training and for the
    planner's trace. transformers 5 deprecates `gradient_checkpointing_enable` in favour of
    `activation_checkpointing_enable`; the old call, which the tests cover, is kept (it exists
    in every transformers the project admits), without its FutureWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
