"""Layer-by-layer post-training quantization of a causal LM's decoder.

The calibration windows run through the embeddings once; their inputs to the first decoder
layer are captured (with the keyword arguments the model passes: attention mask, rotary
embeddings …). Then each decoder layer in turn is moved to the compute device, run on those
inputs with hooks that collect what its method needs (GPTQ: each linear's Hessian; AWQ: the
inputs of the linears that share an input), quantized, run again with its quantized weights to
give the next layer's inputs, and moved back. Device memory holds one layer plus the
calibration activations.

Every nn.Linear inside the decoder layers is quantized; embeddings, norms and the output head
are not (as GPTQ and AWQ checkpoints do). AWQ folds its scales into the operation before each
group of linears (Llama family: the two RMSNorms, v_proj for o_proj when there are as many
key/value heads as query heads, up_proj for down_proj; linears with no foldable predecessor keep
scale 1), then searches each weight's clipping range (not for q/k_proj: clipping them distorts
attention scores) and rounds to nearest on the grid.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models import LAYER_PATHS, decoder_stack
from tunesmith.quantize.awq import awq_clip, awq_search
from tunesmith.quantize.gptq import HessianAccumulator, gptq_quantize
from tunesmith.quantize.rtn import QuantGrid, rtn_quantize
from tunesmith.quantized.gptq.weights import QuantizedWeight

AWQ_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
AWQ_GROUPS = (  # (the operation before, the linears that read its output), in forward order
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
AWQ_SEARCH_ROWS = 4096  # calibration rows (tokens) the AWQ scale search evaluates
AWQ_NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class Settings:
    method: str  # rtn | gptq | awq
    grid: QuantGrid
    damp: float = 0.01
    act_order: bool = False
    batch_size: int = 8
    skip: str | None = None
    """A regular expression: linears whose full name it matches (re.search) stay in floating
    point."""


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, layers) of the model's stack of decoder layers (`models.decoder_stack`)."""
    stack = decoder_stack(model)
    if stack is None:
        raise TunesmithError(
            f"quantize: cannot find the decoder layers of {type(model).__name__} (looked for "
            f"{', '.join(LAYER_PATHS)}); GPTQ, AWQ and RTN support Llama-style decoders"
        )
    return stack


def layer_linears(
    layer: nn.Module, prefix: str = "", skip: str | None = None
) -> dict[str, nn.Linear]:
    """The layer's linears by name, without those whose full name (`prefix.name`) `skip`
    matches."""
    return {
        name: m
        for name, m in layer.named_modules()
        if type(m) is nn.Linear and not (skip and re.search(skip, f"{prefix}.{name}"))
    }


def _move_outside(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside `layers` to `device`."""
    inside = {id(m) for m in layers.modules()}
    moved: dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
    for module in model.modules():
        if id(module) in inside:
            continue
        for key, p in module._parameters.items():
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.data.to(device), p.requires_grad)
                module._parameters[key] = moved[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device)


@torch.no_grad()
def first_layer_inputs(model, layers, windows: torch.Tensor, device, batch_size: int):
    """[(hidden_states, kwargs)] for each batch of calibration windows: what the first decoder
    layer receives."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run(layer, inputs):
    outputs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def _set_weight(linear: nn.Linear, value: torch.Tensor) -> None:
    linear.weight.data.copy_(value.to(linear.weight.dtype))


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    windows: torch.Tensor,
    settings: Settings,
    device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every linear of every decoder layer, in place: each weight is replaced by its
    dequantized value (so the model computes what the checkpoint will) and AWQ's scales are
    folded in. Returns the quantized weights by module name (on the CPU)."""
    path, layers = check_model(model, settings.method)
    home = next(model.parameters()).device
    _move_outside(model, layers, device)
    inputs = []
    if settings.method != "rtn":
        inputs = first_layer_inputs(model, layers, windows, device, settings.batch_size)
    results: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(layers):
        layer.to(device)
        linears = layer_linears(layer, f"{path}.{i}", settings.skip)
        if settings.method == "gptq":
            quantized = _gptq_layer(layer, linears, inputs, settings)
        elif settings.method == "awq":
            quantized = _awq_layer(layer, linears, inputs, settings)
        else:
            quantized = {name: rtn_quantize(m.weight, settings.grid) for name, m in linears.items()}
        for name, qw in quantized.items():
            _set_weight(linears[name], qw.dequantize())
            results[f"{path}.{i}.{name}"] = QuantizedWeight(
                qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu(), qw.bits
            )
        if inputs:
            inputs = _run(layer, inputs)
        layer.to(home)
        if progress is not None:
            progress(i + 1, len(layers))
    _move_outside(model, layers, home)
    return results


def _gptq_layer(layer, linears, inputs, settings: Settings) -> dict[str, QuantizedWeight]:
    hessians = {
        name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()
    }
    handles = [
        m.register_forward_hook(lambda _m, args, _out, name=name: hessians[name].add(args[0]))
        for name, m in linears.items()
    ]
    try:
        _run(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: gptq_quantize(
            m.weight, hessians[name].h, settings.grid, settings.damp, settings.act_order
        )
        for name, m in linears.items()
    }


def check_model(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    """The decoder layers of a model that `method` can quantize, or a one-line error."""
    model_type = getattr(model.config, "model_type", "?")
    if method == "awq" and model_type not in AWQ_ARCHITECTURES:
        raise TunesmithError(
            f"--method awq: {model_type} models are not supported (AWQ folds its scales into "
            f"known operations); supported: {', '.join(AWQ_ARCHITECTURES)}. Use --method gptq"
        )
    path, layers = decoder_layers(model)
    if not any(layer_linears(layer) for layer in layers):
        raise TunesmithError(
            f"quantize: {type(model).__name__} has no nn.Linear layers in its decoder layers to "
            "quantize; GPTQ, AWQ and RTN support Llama-style decoders"
        )
    return path, layers


def awq_groups(layer: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(operation before, linears reading its output) pairs of a decoder layer that AWQ can
    fold scales into."""
    groups = []
    for previous, readers in AWQ_GROUPS:
        try:
            prev = layer.get_submodule(previous)
            mods = [layer.get_submodule(r) for r in readers]
        except AttributeError:
            continue
        width = mods[0].in_features
        if isinstance(prev, nn.Linear) and prev.out_features != width:
            continue  # e.g. v_proj → o_proj with fewer key/value heads than query heads
        if prev.weight.shape[0] != width:
            continue
        groups.append((prev, mods))
    return groups


def _quantized_groups(layer: nn.Module, linears: dict[str, nn.Linear]):
    """AWQ's groups whose linears are all quantized (`--skip` may leave whole groups out, not
    part of one: their shared scales would be folded into a linear left in floating point)."""
    kept = {id(m) for m in linears.values()}
    names = {id(m): name for name, m in layer.named_modules()}
    groups = []
    for prev, mods in awq_groups(layer):
        inside = [id(m) in kept for m in mods]
        if all(inside):
            groups.append((prev, mods))
        elif any(inside):
            raise TunesmithError(
                f"--skip: AWQ scales {', '.join(names[id(m)] for m in mods)} together (they read "
                "the same input); skip all of them or none"
            )
    return groups


@torch.no_grad()
def fold_scales(previous: nn.Module, readers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide `previous`'s output by `scales` (a norm's weight, or a linear's rows and bias) and
    multiply the readers' input columns by them: the layer computes the same function."""
    shape = (-1,) + (1,) * (previous.weight.dim() - 1)
    previous.weight.data.div_(scales.to(previous.weight.dtype).view(shape))
    if getattr(previous, "bias", None) is not None:
        previous.bias.data.div_(scales.to(previous.bias.dtype))
    for m in readers:
        m.weight.data.mul_(scales.to(m.weight.dtype))


def _awq_layer(layer, linears, inputs, settings: Settings) -> dict[str, QuantizedWeight]:
    groups = _quantized_groups(layer, linears)
    tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden, _ in inputs)
    stride = max(1, tokens // AWQ_SEARCH_ROWS)  # keep about AWQ_SEARCH_ROWS rows per linear
    rows: dict[int, list[torch.Tensor]] = {id(m): [] for m in linears.values()}
    handles = [
        m.register_forward_hook(
            lambda m, args, _out: rows[id(m)].append(
                args[0].reshape(-1, args[0].shape[-1])[::stride].float()
            )
        )
        for m in linears.values()
    ]
    try:
        _run(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    inputs_of = {name: torch.cat(rows.pop(id(m))) for name, m in linears.items()}
    names = {id(m): name for name, m in linears.items()}
    # later groups first: up_proj is scaled (for down_proj) before its own search
    for prev, mods in reversed(groups):
        found = awq_search([m.weight for m in mods], inputs_of[names[id(mods[0])]], settings.grid)
        fold_scales(prev, mods, found.scales)
        for m in mods:  # W·diag(s) reads x / s
            inputs_of[names[id(m)]] = inputs_of[names[id(m)]] / found.scales
    quantized = {}
    for name, m in linears.items():
        weight = m.weight
        if not name.endswith(AWQ_NO_CLIP):  # clipping q/k distorts attention scores
            weight = awq_clip(weight, inputs_of[name], settings.grid)
        quantized[name] = rtn_quantize(weight, settings.grid)
    return quantized


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over the windows (every position but the first)."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
