"""Quantized bases for QLoRA: bitsandbytes NF4 / FP4 (4-bit, blockwise, optional double
quantization of the block constants) and LLM.int8 (8-bit, per-row) linear layers.

    model = load_quantized(path, QuantConfig("nf4"), device="cpu")   # quantize while loading
    quantize_model(model, QuantConfig("int8"))                         # or quantize in place

Loading builds the model on the meta device and reads the checkpoint one tensor at a time:
each linear weight is quantized as soon as it is read, so host memory never holds the whole
model in full precision. Everything that is not a quantized linear (embeddings, norms, the
output head) stays in the compute dtype: no fp32 upcast of norms and embeddings (the usual
`prepare_model_for_kbit_training` recipe runs at about half the speed; see docs/methods.md).

The adapter library works on these layers unchanged: `LoRALayer.base_weight()` dequantizes,
and writes (merge, unmerge, PiSSA's residual) re-quantize."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.model_config import read_model_config
from tunesmith.paths import model_source
from tunesmith.shards import checkpoint_files, iter_safetensors, large_allocations_via_mmap

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class QuantConfig:
    quant: str = "nf4"
    """nf4 | fp4 (4-bit, blockwise) or int8 (LLM.int8, per-row absmax)."""
    double_quant: bool = True
    """4-bit: quantize the per-block absmax constants too (about 4.127 bits per weight)."""
    blocksize: int = 64
    """4-bit: weights per absmax block."""
    compute_dtype: torch.dtype = torch.float32
    """Dtype of activations, norms, embeddings and the output head."""
    skip: tuple[str, ...] = ()
    """Extra module-name suffixes to keep unquantized (the output head always is)."""

    def __post_init__(self) -> None:
        if self.quant not in QUANT_TYPES:
            raise TunesmithError(f"quant: {self.quant!r} is not one of {', '.join(QUANT_TYPES)}")
        if self.blocksize not in BLOCKSIZES:
            raise TunesmithError(
                f"blocksize: {self.blocksize} is not supported; use one of "
                f"{', '.join(map(str, BLOCKSIZES))}"
            )


def bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(
            "quantized bases need bitsandbytes; pip install bitsandbytes (it runs on CPU too)"
        ) from None
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in (
        "Linear4bit",
        "Linear8bitLt",
    )


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def _int8_state(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) of a Linear8bitLt, wherever bitsandbytes keeps them (the
    parameter before the first forward, the layer's state after it)."""
    weight = module.weight
    cb = weight.CB if getattr(weight, "CB", None) is not None else module.state.CB
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if cb is None:
        cb = weight.data
    return cb, scb


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized layer computes with, in fp32."""
    bnb = bitsandbytes()
    if _is_4bit(module):
        weight = module.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    cb, scb = _int8_state(module)
    return cb.float() * (scb.float()[:, None] / 127.0)


def quantized_parameter(weight: torch.Tensor, config: QuantConfig, device) -> nn.Parameter:
    """`weight` (out, in) quantized as `config` says, on `device`."""
    bnb = bitsandbytes()
    if config.quant == "int8":
        param = bnb.nn.Int8Params(
            weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
    else:
        param = bnb.nn.Params4bit(
            weight.to(config.compute_dtype),
            requires_grad=False,
            blocksize=config.blocksize,
            compress_statistics=config.double_quant,
            quant_type=config.quant,
        )
    return param.to(device)


def quant_config_of(module: nn.Module, compute_dtype: torch.dtype | None = None) -> QuantConfig:
    """The settings a quantized layer was made with (to re-quantize it the same way)."""
    if _is_4bit(module):
        state = module.weight.quant_state
        return QuantConfig(
            quant=module.weight.quant_type,
            double_quant=bool(getattr(state, "nested", False)),
            blocksize=module.weight.blocksize,
            compute_dtype=compute_dtype or module.compute_dtype or torch.float32,
        )
    return QuantConfig(quant="int8", compute_dtype=compute_dtype or torch.float32)


@torch.no_grad()
def set_quantized_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Re-quantize `weight` (out, in) into the quantized layer `module`, same settings."""
    config = quant_config_of(module)
    device = module.weight.device
    module.weight = quantized_parameter(weight, config, device)
    if not _is_4bit(module):
        module.state.CB, module.state.SCB = None, None  # drop the cached old int8 weight


def new_quantized_linear(
    in_features: int, out_features: int, bias: bool, config: QuantConfig, device="meta"
):
    bnb = bitsandbytes()
    if config.quant == "int8":
        # threshold 6.0: LLM.int8's outlier features run in 16-bit, as in transformers' default
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=6.0,
            device=device,
        )
    else:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant,
            device=device,
        )
        cpu_packing_guard(layer)
    return layer


def cpu_packing_guard(layer: nn.Module) -> None:
    """Keep a 4-bit layer on bitsandbytes' generic dequantize-then-matmul path on CPUs with
    AVX512-BF16. On those, bitsandbytes repacks the weight on the first eval forward without
    gradients for a CPU kernel that rounds the block scales to bf16 (logits move by ~5e-4
    against the GPU's and the merged checkpoint's) and that fails with a reshape error when the
    input width is not a multiple of the block size. The result would depend on the CPU."""
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False


def guard_cpu_packing(model: nn.Module) -> None:
    """`cpu_packing_guard` for every 4-bit layer of a model bitsandbytes loaded."""
    for module in model.modules():
        cpu_packing_guard(module)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def quantizable_linears(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the nn.Linear modules to quantize: all but the output head and `skip`."""
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        if any(name == s or name.endswith("." + s) for s in config.skip):
            continue
        names.append(name)
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the model's linear layers (not the output head) by quantized ones, in place,
    one layer at a time."""
    for name in quantizable_linears(model, config):
        linear = model.get_submodule(name)
        device = linear.weight.device
        layer = new_quantized_linear(
            linear.in_features, linear.out_features, linear.bias is not None, config, "cpu"
        )
        layer.weight = quantized_parameter(linear.weight.detach(), config, device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(config.compute_dtype), False)
        model.set_submodule(name, layer)
    return model


def load_quantized(
    path: str,
    config: QuantConfig,
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A causal LM with quantized linear layers, quantized tensor by tensor while reading a
    16/32-bit safetensors checkpoint. A checkpoint that is already bitsandbytes-quantized
    (a `quantization_config` in config.json) is loaded by transformers as it is."""

    bitsandbytes()
    path = model_source(path, "model.path")
    model_config = read_model_config(path, "model.path", revision, trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if getattr(model_config, "quantization_config", None):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=config.compute_dtype,
            device_map=device,
            use_safetensors=True,
            **kwargs,
        )
        guard_cpu_packing(model)
        return model
    files = checkpoint_files(path, revision)
    with large_allocations_via_mmap():
        model = _build_quantized(model_config, files, config, device, trust_remote_code, kwargs)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise TunesmithError(
            f"model.path: {path}: the checkpoint has no tensor for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model.eval()
    return model


def _build_quantized(model_config, files, config, device, trust_remote_code, kwargs):

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            model_config,
            dtype=config.compute_dtype,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    for name in quantizable_linears(model, config):
        linear = model.get_submodule(name)
        bias = linear.bias is not None
        model.set_submodule(
            name, new_quantized_linear(linear.in_features, linear.out_features, bias, config)
        )
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for file in files:
        for key, tensor in iter_safetensors(file, expected):  # others: e.g. rotary caches
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if is_quantized(module) and attr == "weight":
                module.weight = quantized_parameter(tensor, config, device)
            else:
                if tensor.is_floating_point():
                    tensor = tensor.to(config.compute_dtype)
                set_module_tensor_to_device(model, key, device, value=tensor.clone())
            del tensor
    model.tie_weights()
    return model


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (quantized weights at their packed size)."""
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total


__all__ = [
    "QUANT_TYPES",
    "QuantConfig",
    "dequantized_weight",
    "is_quantized",
    "load_quantized",
    "quantize_model",
    "quantized_size_bytes",
    "set_quantized_weight",
]
