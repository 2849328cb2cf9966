"""Group-quantized checkpoints (RTN, GPTQ and AWQ results) in one of two layouts:

- GPTQ's format: config.json with a `quantization_config` (quant_method "gptq",
  checkpoint_format "gptq") and, per quantized linear, qweight/qzeros/scales/g_idx (see
  `packing.py`). Libraries with GPTQ kernels (transformers with gptqmodel or optimum, vLLM on
  GPUs, TGI) load it as a GPTQ model.
- compressed-tensors' pack-quantized format (see `compressed.py`): transformers loads it with the
  `compressed-tensors` package, vLLM with its kernels on GPUs and CPUs.

tunesmith loads both anywhere, CPU included, with `GPTQLinear` (also checkpoints other tools
made in either layout)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.quantized.gptq.compressed import (
    PARTS,
    compressed_config,
    compressed_shapes,
    pack_compressed,
    unpack_compressed,
)
from tunesmith.quantized.gptq.layer import GPTQLinear
from tunesmith.quantized.gptq.packing import pack_gptq, packed_shapes
from tunesmith.quantized.gptq.weights import QuantizedWeight
from tunesmith.shards import (
    PlannedTensor,
    checkpoint_files,
    iter_safetensors,
    read_header,
    write_checkpoint,
)

LAYOUTS = ("gptq", "compressed-tensors")


def quantization_config(
    method: str,
    bits: int,
    group_size: int,
    act_order: bool,
    damp: float,
    layout: str = "gptq",
    ignore=(),
) -> dict:
    """config.json's `quantization_config` for `layout`; `ignore`: the linears left in floating
    point (compressed-tensors lists them)."""
    if layout == "compressed-tensors":
        return compressed_config(method, bits, group_size, act_order, ignore)
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
    replaced by its packed tensors in `qconfig`'s layout, and config.json with `qconfig`."""
    compressed = qconfig["quant_method"] == "compressed-tensors"
    weights = qconfig["config_groups"]["group_0"]["weights"] if compressed else {}
    act_order = weights.get("actorder") is not None

    def shapes_of(qw: QuantizedWeight) -> dict:
        out_features, in_features = qw.q.shape
        groups = qw.scales.shape[1]
        if compressed:
            return compressed_shapes(out_features, in_features, groups, qw.bits, dtype, act_order)
        return packed_shapes(out_features, in_features, groups, qw.bits)

    def pack(qw: QuantizedWeight) -> dict:
        return pack_compressed(qw, dtype, act_order) if compressed else pack_gptq(qw)

    plan: list[PlannedTensor] = []
    sources: dict[str, object] = {}
    for name, tensor in _unique_state(model).items():
        module_name, _, attr = name.rpartition(".")
        if module_name in quantized and attr == "weight":
            for part, (shape, part_dtype) in shapes_of(quantized[module_name]).items():
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
                packed_cache[module_name] = pack(quantized[module_name])
            return packed_cache[module_name][part]
        return source.detach().to("cpu", t.dtype)

    write_checkpoint(folder, plan, produce, max_shard_size)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.quantization_config = qconfig
    config.save_pretrained(folder)


def _compressed_settings(path: str, qconfig: dict) -> tuple[int, int | None]:
    """(bits, group size) of a pack-quantized checkpoint with one integer weight scheme."""
    groups = list((qconfig.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    fmt = qconfig.get("format")
    if (
        fmt != "pack-quantized"
        or len(weights) != 1
        or weights[0].get("type") != "int"
        or any(g.get("input_activations") for g in groups)
    ):
        raise TunesmithError(
            f"{path}: compressed-tensors checkpoints are read in the 'pack-quantized' format "
            f"with one integer weight-only scheme (this one: format {fmt!r}); load it with "
            "transformers and the compressed-tensors package instead"
        )
    return int(weights[0]["num_bits"]), weights[0].get("group_size")


def load_gptq_checkpoint(
    path: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A GPTQ-format or pack-quantized (compressed-tensors) checkpoint as a causal LM whose
    quantized linears are `GPTQLinear` (dequantized in each forward), on any device."""

    config = AutoConfig.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    )
    qconfig = config.quantization_config
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    compressed = qconfig.get("quant_method") == "compressed-tensors"
    if compressed:
        bits, group_size = _compressed_settings(path, qconfig)
    else:
        bits = int(qconfig.get("bits", 4))
    if not compressed and qconfig.get("checkpoint_format", "gptq") != "gptq":
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
    scale_key = ".weight_scale" if compressed else ".scales"
    scales = {}
    for file in files:
        header, _ = read_header(file)
        for key, info in header.items():
            if key.endswith(scale_key):
                shape = info["shape"]
                groups = (shape[1] if len(shape) > 1 else 1) if compressed else shape[0]
                scales[key.removesuffix(scale_key)] = groups
    for module_name, groups in scales.items():
        linear = model.get_submodule(module_name)
        model.set_submodule(
            module_name,
            GPTQLinear(
                linear.in_features,
                linear.out_features,
                bits,
                groups,
                linear.bias is not None,
                dtype,
                device="meta",
            ),
        )
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if compressed:
        gptq_buffers = set(packed_shapes(1, 1, 1, bits))  # GPTQLinear's, filled after reading
        expected = {n for n in expected if n.rpartition(".")[2] not in gptq_buffers}
        expected |= {f"{m}.{part}" for m in scales for part in PARTS}
    for file in files:
        for key, tensor in iter_safetensors(file, expected):
            module_name, _, part = key.rpartition(".")
            if compressed and module_name in scales and part in PARTS:
                parts.setdefault(module_name, {})[part] = tensor.clone()
                continue
            if tensor.is_floating_point() and not key.endswith(".scales"):
                tensor = tensor.to(dtype)
            set_module_tensor_to_device(model, key, device, value=tensor.clone())
    for module_name, found in parts.items():  # compressed-tensors: to GPTQLinear's layout
        for name, value in pack_gptq(unpack_compressed(found, bits, group_size)).items():
            set_module_tensor_to_device(model, f"{module_name}.{name}", device, value=value)
    model.tie_weights()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    missing = [n for n, p in tensors if p.device.type == "meta"]
    if missing:
        raise TunesmithError(f"{path}: the checkpoint has no tensor for {missing[0]}")
    return model.eval()
