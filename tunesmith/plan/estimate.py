"""A fast analytic estimate of a training step's peak memory, for sweeps over micro-batch,
sequence length, method and switches (`trace.py` gives the exact figure for one setting).

Parameters are counted exactly: the model, with the method attached, is built once on the meta
device (no memory, well under a second for an 8B model) and its parameters, buffers and adapter
layers are read off it. Activations follow a closed-form model of a Llama-style decoder layer
(pre-norm attention and gated MLP, fused attention as on a GPU), in bytes per token, with `e`
the compute dtype's element size, D the hidden size, Q/K the query and key/value widths, I the
MLP width and H the attention heads:

- every layer keeps 8D (the two RMSNorms' fp32 inputs) + e(2Q + 2K) (rotated q and k, v and
  the attention output, for the fused kernel) + 4H (its log-sum-exp) + 3eI (gate, its SiLU
  and up); full fine-tuning adds 2eD (the norm weights' inputs); fp32 master weights keep the
  residual stream in fp32 and the autocast copies of each layer's weights and linear inputs;
- a linear's input (a norm's output, the attention output, the MLP product) is kept once per
  group of linears that read it, when one of them needs it (`_layer_saves`): a trained
  weight, a bitsandbytes base, a LoRA branch without dropout, an IA3 input scale;
- adapters add what their branch saves: LoRA e·r per adapted linear, and with dropout its own
  dropped input and 1-byte mask (e + 1)·in; DoRA 2e·out; IA3 on an output the unscaled
  output; a bottleneck adapter its linears' inputs and its nonlinearity's;
- with gradient checkpointing a layer keeps only its input, and the layer being recomputed in
  the backward pass holds everything above once more;
- the loss keeps the final norm's input and output and the hidden states it reads, and works on
  one chunk of fp32 logits at a time (`train/loss.py`).

The peak is the largest of: the end of the forward pass, the loss's backward, the first and
the last layer's backward (gradients accumulate while saved activations are freed; in between
the total is linear, so its maximum is at an end) and the optimizer step. Tests hold this
within 10% of the traced peak over methods, shapes and switches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.adapters.holders import AdapterHolder, LinearWrapper
from tunesmith.config import TrainSection
from tunesmith.models import decoder_layers
from tunesmith.plan.trace import TracedStep, build_traced_model
from tunesmith.registry import method_named, method_of
from tunesmith.train.loss import CHUNK_ELEMENTS


@dataclass(frozen=True)
class Skeleton:
    """What the estimate needs of a model with its method attached, counted on the meta device."""

    method: str
    trains_weights: bool
    """Full fine-tuning: every weight has a gradient."""
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    heads: int
    vocab: int
    compute_bytes: int
    master: bool
    """Full fine-tuning with fp32 master weights and autocast compute."""
    weights_bytes: int
    """Frozen parameters and all buffers."""
    trainable_bytes: int
    trainable_params: int
    total_params: int
    layer_trainable_bytes: int
    """Trainable parameter bytes of one decoder layer (their gradients have the same size)."""
    largest_trainable_bytes: int
    input_embedding_bytes: int
    """A trained input embedding not tied to the head: its gradient comes last."""
    quantized: bool
    """QLoRA: the base linears are bitsandbytes layers (which save their inputs)."""
    head_bytes: int
    """A trained output head: each loss chunk's gradient of it is a new tensor, added to the
    accumulated one."""
    layer_linear_params: int
    """Weights of one decoder layer's linears (fp32 master: autocast keeps a copy of each)."""
    adapter_bytes_per_token: float
    """Per layer and token, what the linears and adapters save (see `_layer_saves`)."""
    virtual_tokens: int
    """Prompt tuning: tokens prepended to every sequence."""
    leading_frozen: float
    """Decoder layers before the first trained parameter (a bottleneck after a layer's MLP
    leaves that layer's own work frozen): they save nothing for the backward pass."""


def skeleton(
    model_config, method, compute_dtype: torch.dtype, master: bool, fused_lora: bool = True
) -> Skeleton:
    """Build the model with `method` (a method config) on the meta device and measure it
    (`fused_lora`: with LoRA's fused training step, as `train.fused_lora` says)."""
    spec = method_of(method)
    train = TrainSection(
        fp32_master_weights=master, gradient_checkpointing=False, fused_lora=fused_lora
    )
    with torch.device("meta"):
        model = build_traced_model(model_config, method, train, compute_dtype)
    config = model.config
    e = torch.empty((), dtype=compute_dtype).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in trainable_ids]
    layers = decoder_layers(model)
    first = layers[0] if layers else model
    per_token, linear_params = _layer_saves(first, e)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    leading = 0.0
    if not spec.virtual_tokens and not embed.requires_grad:
        leading = _leading_frozen(layers)
    return Skeleton(
        method=spec.name,
        trains_weights=not spec.trains_adapter,
        layers=len(layers),
        hidden=config.hidden_size,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=heads,
        vocab=config.vocab_size,
        compute_bytes=e,
        master=master,
        weights_bytes=_nbytes(frozen) + _nbytes(model.buffers()),
        trainable_bytes=_nbytes(trainable),
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        layer_trainable_bytes=_nbytes(p for p in first.parameters() if p.requires_grad),
        largest_trainable_bytes=max((_nbytes([p]) for p in trainable), default=0),
        input_embedding_bytes=_nbytes([embed]) if embed.requires_grad and not tied else 0,
        head_bytes=_nbytes(p for p in head.parameters() if p.requires_grad) if head else 0,
        quantized=spec.quantized_base,
        layer_linear_params=linear_params,
        adapter_bytes_per_token=per_token,
        virtual_tokens=spec.sequence_tokens(method),
        leading_frozen=leading,
    )


SHARED_INPUTS = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}
"""Linears that read the same tensor (Llama-style names)."""


def _leading_frozen(layers) -> float:
    """Decoder layers before the first with a trained parameter; a layer whose only trained
    parameters sit in adapters on its sub-layers' outputs (`AdapterHolder.on_output`) counts
    as 1 when they all follow its `mlp` (its own work is frozen), else as half."""
    leading = 0.0
    for layer in layers:
        trained = [n for n, p in layer.named_parameters() if p.requires_grad]
        if not trained:
            leading += 1
            continue
        attached = {
            n: n.rsplit(".", 1)[0]
            for n, m in layer.named_modules()
            if isinstance(m, AdapterHolder) and m.on_output
        }
        owners = {next((n for n in attached if p.startswith(n + ".")), None) for p in trained}
        if None not in owners:
            after = {attached[n].rsplit(".", 1)[-1] for n in owners}
            leading += 1.0 if after == {"mlp"} else 0.5
        break
    return leading


def _layer_saves(layer, e: int) -> tuple[float, int]:
    """(bytes per token that one decoder layer's linears and adapters save for the backward
    pass, the layer's linear weights). A linear's input is kept once per group of linears
    that read it, if any of them needs it: a trained weight, a quantized base (bitsandbytes
    saves its input), a LoRA branch without dropout or an IA3 input scale; LoRA with dropout
    keeps its own dropped copy and mask instead; LoRA keeps its rank-wide middle, IA3 on an
    output the unscaled output, DoRA its base and low-rank terms, a bottleneck adapter its
    linears' inputs and its nonlinearity's."""
    groups: dict[str, list] = {}
    extra = 0.0
    params = 0
    for name, module in layer.named_modules():
        if isinstance(module, AdapterHolder) and not isinstance(module, LinearWrapper):
            extra += module.saved_bytes_per_token(e)
            continue
        base = module.base_layer if isinstance(module, LinearWrapper) else module
        if not isinstance(base, torch.nn.Linear) or any(
            isinstance(parent, LinearWrapper) for parent in _parents(layer, name)
        ):
            continue
        params += base.in_features * base.out_features
        saves = getattr(base, "saves_input", False) or base.weight.requires_grad
        if isinstance(module, LinearWrapper):
            more, needs_input = module.saved_bytes_beside_input(e)
            extra += more
            saves = saves or needs_input
        key = SHARED_INPUTS.get(name.rsplit(".", 1)[-1], name)
        groups.setdefault(key, []).append((base.in_features, saves))
    for members in groups.values():
        if any(saves for _, saves in members):
            extra += e * members[0][0]
    return extra, params


def _parents(root, name: str):
    parts = name.split(".")
    module = root
    for part in parts[:-1]:
        module = getattr(module, part)
        yield module


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Estimate(TracedStep):
    phase: str = ""
    """Where the peak falls: forward, loss backward, last layer backward, first layer
    backward or optimizer step."""


def estimate_step(
    sk: Skeleton,
    seq_len: int,
    batch: int,
    checkpointing: bool,
    optimizer: str = "adamw",
    offload: bool = False,
) -> Estimate:
    """Peak memory of one training step (the second: optimizer states exist); see the module
    docstring for the model. `offload` (with checkpointing): the checkpointed layer inputs
    live in host memory, at most two of them on the device at once (`ActivationOffload`)."""
    e = sk.compute_bytes
    d, q, kv, inter, heads = sk.hidden, sk.q_dim, sk.kv_dim, sk.intermediate, sk.heads
    tokens = batch * (seq_len + sk.virtual_tokens)
    full = sk.trains_weights
    residual = 4 if sk.master else e  # the residual stream's element size
    per_token = 8 * d + e * (2 * q + 2 * kv) + 4 * heads + 3 * e * inter
    per_token += sk.adapter_bytes_per_token
    if full:
        per_token += 2 * e * d
    if sk.master:
        per_token += 4 * d + 3 * e * d  # fp32 norm outputs; autocast copies of linear inputs
    layer_full = per_token * tokens + (e * sk.layer_linear_params if sk.master else 0)
    layer_kept = residual * d * tokens if checkpointing else layer_full
    layers = sk.layers
    kept = layers * layer_kept if checkpointing else (layers - sk.leading_frozen) * layer_kept
    if checkpointing and offload:
        kept = min(layers, 2) * layer_kept
    # Layer backward temporaries: gradients of the MLP's intermediates and of the hidden stream.
    layer_work = tokens * (e * inter + 2 * residual * d)
    if checkpointing:
        # The layer recomputed. Its backward's MLP-width gradients overlap the recomputed
        # tensors by about half an MLP activation (fitted to the trace), except under QLoRA,
        # whose layers keep their inputs and free them as the backward passes.
        layer_work += layer_full + (0 if sk.quantized else tokens * e * inter // 2)
    rows = max(1, min(tokens, CHUNK_ELEMENTS // sk.vocab))
    loss_kept = tokens * (4 * d + e * d + e * d)  # final norm's fp32 input and output; hidden
    loss_forward = rows * sk.vocab * 8  # a chunk's fp32 logits and their log-softmax
    # recomputed log-softmax, its gradient and the logits'; then a trained head's gradient for
    # the chunk is computed from the bf16 logits' gradient, before it is added to the total
    loss_backward = max(rows * sk.vocab * 12, rows * sk.vocab * (4 + e) + sk.head_bytes)
    grads_layer = sk.layer_trainable_bytes
    # the head, the final norm, prompts (the input embedding's gradient comes after the layers)
    grads_rest = sk.trainable_bytes - layers * grads_layer - sk.input_embedding_bytes
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        states = 2 * sk.trainable_params
    else:
        states = 2 * sk.trainable_bytes
    static = sk.weights_bytes + sk.trainable_bytes + states
    flow = 2 * residual * d * tokens  # the gradient reaching a layer and the one it sends on
    phases = {
        "forward": kept + loss_kept + loss_forward,
        "loss backward": kept + loss_kept + loss_backward + grads_rest,
        "last layer backward": kept + grads_layer + grads_rest + flow + layer_work,
        "first layer backward": layer_kept + layers * grads_layer + grads_rest + flow + layer_work,
        "optimizer step": sk.trainable_bytes + 2 * sk.largest_trainable_bytes,
    }
    phase = max(phases, key=phases.get)
    peak = static + int(phases[phase])
    grads = {
        "forward": 0,
        "loss backward": grads_rest,
        "last layer backward": grads_layer + grads_rest,
        "first layer backward": layers * grads_layer + grads_rest,
        "optimizer step": sk.trainable_bytes,
    }[phase]
    return Estimate(
        peak_bytes=peak,
        weights_bytes=sk.weights_bytes,
        trainable_bytes=sk.trainable_bytes,
        grads_bytes=grads,
        optimizer_bytes=states,
        activations_bytes=peak - static - grads,
        trainable_params=sk.trainable_params,
        total_params=sk.total_params,
        phase=phase,
    )


def flops_per_token(config, method: str, seq_len: int, checkpointing: bool) -> float:
    """Training FLOPs per token of method `method` (a name): full ≈ 6N (forward 2N, backward
    4N), adapters ≈ 4N (no weight gradients for the frozen base), plus attention (causal:
    2·layers·seq·hidden forward, twice that backward), plus one more forward with gradient
    checkpointing."""
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    vocab = config.vocab_size
    inter = config.intermediate_size
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = hidden * (hidden + 2 * kv * head_dim) + hidden * hidden + 3 * hidden * inter
    n = layers * per_layer + hidden * vocab  # matmul parameters (the head included)
    attention = 2 * layers * seq_len * hidden  # causal QKᵀ and AV, forward
    forward = 2 * n + attention
    weight_gradients = not method_named(method).trains_adapter
    backward = (4 * n if weight_gradients else 2 * n) + 2 * attention
    return forward + backward + (forward if checkpointing else 0)
