"""Group-quantized checkpoints (RTN, GPTQ and AWQ results) in GPTQ's format: config.json with
a `quantization_config` (quant_method "gptq", checkpoint_format "gptq") and, per quantized
linear, qweight/qzeros/scales/g_idx (see `pack.py`). Libraries with GPTQ kernels (transformers
with gptqmodel or optimum, vLLM, TGI) load it as a GPTQ model; tunesmith loads it anywhere,
CPU included, with `GPTQLinear` (which also loads GPTQ checkpoints made by other tools)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.gptq_format.layer import GPTQLinear
from tunesmith.gptq_format.packing import pack_gptq, packed_shapes
from tunesmith.gptq_format.weights import QuantizedWeight
from tunesmith.shards import (
    PlannedTensor,
    checkpoint_files,
    iter_safetensors,
    read_header,
    write_checkpoint,
)


def quantization_config(method: str, bits: int, group_size: int, act_order: bool, damp: float):
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": False,
        "true_sequential": False,
        "static_groups": False,
        "damp_percent": damp,
        "meta": {"quantizer": ["tunesmith"], "method": method},
    }


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (under their first name)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def write_gptq_checkpoint(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    folder: Path,
    dtype: torch.dtype,
    qconfig: dict,
    max_shard_size: int,
) -> None:
    """The model's tensors (non-quantized ones in `dtype`) with each quantized linear's weight
    replaced by its packed GPTQ tensors, and config.json with `qconfig`."""
    plan: list[PlannedTensor] = []
    sources: dict[str, object] = {}
    for name, tensor in _unique_state(model).items():
        module_name, _, attr = name.rpartition(".")
        if module_name in quantized and attr == "weight":
            qw = quantized[module_name]
            out_features, in_features = qw.q.shape
            shapes = packed_shapes(out_features, in_features, qw.scales.shape[1], qw.bits)
            for part, (shape, part_dtype) in shapes.items():
                plan.append(PlannedTensor(f"{module_name}.{part}", shape, part_dtype))
                sources[f"{module_name}.{part}"] = (module_name, part)
            continue
        out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        plan.append(PlannedTensor(name, tuple(tensor.shape), out_dtype))
        sources[name] = tensor
    packed_cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(t: PlannedTensor) -> torch.Tensor:
        source = sources[t.name]
        if isinstance(source, tuple):
            module_name, part = source
            if module_name not in packed_cache:
                packed_cache.clear()
                packed_cache[module_name] = pack_gptq(quantized[module_name])
            return packed_cache[module_name][part]
        return source.detach().to("cpu", t.dtype)

    write_checkpoint(folder, plan, produce, max_shard_size)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.quantization_config = qconfig
    config.save_pretrained(folder)


def is_gptq_checkpoint(config) -> bool:
    qconfig = getattr(config, "quantization_config", None) or {}
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    return qconfig.get("quant_method") == "gptq"


def load_gptq_checkpoint(
    path: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A GPTQ-format checkpoint as a causal LM whose quantized linears are `GPTQLinear`
    (dequantized in each forward), on any device."""

    config = AutoConfig.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    )
    qconfig = config.quantization_config
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    bits = int(qconfig.get("bits", 4))
    if qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise TunesmithError(
            f"{path}: GPTQ checkpoint_format {qconfig['checkpoint_format']!r} is not supported "
            "(tunesmith reads the standard 'gptq' format)"
        )
    plain = copy.deepcopy(config)
    del plain.quantization_config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            plain, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    files = checkpoint_files(path, revision)
    scales = {}
    for file in files:
        header, _ = read_header(file)
        for key, info in header.items():
            if key.endswith(".scales"):
                scales[key.removesuffix(".scales")] = info["shape"]
    for module_name, shape in scales.items():
        linear = model.get_submodule(module_name)
        model.set_submodule(
            module_name,
            GPTQLinear(
                linear.in_features, linear.out_features, bits, shape[0],
                linear.bias is not None, dtype, device="meta",
            ),
        )  # fmt: skip
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for file in files:
        for key, tensor in iter_safetensors(file, expected):
            if tensor.is_floating_point() and not key.endswith(".scales"):
                tensor = tensor.to(dtype)
            set_module_tensor_to_device(model, key, device, value=tensor.clone())
    model.tie_weights()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    missing = [n for n, p in tensors if p.device.type == "meta"]
    if missing:
        raise TunesmithError(f"{path}: the checkpoint has no tensor for {missing[0]}")
    return model.eval()
