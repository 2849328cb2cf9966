"""Prompt tuning and prefix tuning: trainable virtual tokens in front of every sequence.

- Prompt tuning (Lester et al. 2021): n trainable input embeddings are prepended to the
  embedded input, so every layer sees them as ordinary tokens.
- Prefix tuning (Li & Liang 2021): n trainable key/value pairs per layer are prepended to each
  attention's keys and values; nothing is added to the input. Optionally the prefix is
  reparameterised during training through an MLP (embedding → Linear → tanh → Linear) and
  saved flattened, as PEFT does.

Nothing in the model is replaced. A `VirtualTokens` module (holding every prompt/prefix
adapter by name) is attached to the model, and two hooks on the decoder backbone
(`model.base_model`) rewrite its inputs and outputs:

- the attention mask gets n leading ones, and given `position_ids` / `cache_position` move by
  n, so the real tokens sit at positions n, n+1, … (as in PEFT);
- prompt tuning: on the first pass (no or an empty KV cache) the prompts are prepended to the
  input embeddings, and the n extra positions are removed from the output again, so hidden
  states and logits line up with the caller's tokens (PEFT returns them with the n positions);
- prefix tuning: the KV cache starts filled with the prefix. A caller's empty cache (as
  `generate` passes) is filled in place; without one (training, `use_cache=False`) a
  `PrefixCache` serves the prefix without storing anything, which is also what lets it work
  under gradient checkpointing (transformers drops a writable cache there).

Only one virtual-token adapter is active at a time.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from tunesmith.adapters.holders import AdapterHolder
from tunesmith.errors import AdapterError
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig

ATTR = "tunesmith_virtual_tokens"


# --- the adapters ----------------------------------------------------------------------------
class PromptEmbeddings(nn.Module):
    """One prompt-tuning adapter: `embedding` (n × hidden)."""

    kind = "prompt"

    def __init__(self, n: int, dim: int, device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(n, dim, device=device, dtype=dtype))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def saved_tensor(self) -> torch.Tensor:
        return self.embedding


@dataclass(frozen=True)
class KVShape:
    """The per-layer key/value shape a prefix must have."""

    layers: int
    heads: int
    head_dim: int

    @property
    def flat(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim


def kv_shape(model: nn.Module) -> KVShape:
    """Layers, key/value heads and head size of a decoder, from its config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError):
        raise AdapterError(
            f"prefix tuning needs num_hidden_layers, num_attention_heads and hidden_size in the "
            f"config of {type(model).__name__}"
        ) from None
    return KVShape(layers, kv_heads, head_dim)


class PrefixEncoder(nn.Module):
    """One prefix-tuning adapter. `embedding` is the flattened prefix (n × layers·2·kv_dim), or
    with projection the input (n × hidden) of `transform`, whose output is the prefix."""

    kind = "prefix"

    def __init__(
        self,
        n: int,
        shape: KVShape,
        hidden: int,
        projection: bool,
        encoder_hidden_size: int | None,
        device=None,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.shape = shape
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, hidden, **factory))
            width = encoder_hidden_size or hidden
            self.transform = nn.Sequential(
                nn.Linear(hidden, width, **factory),
                nn.Tanh(),
                nn.Linear(width, shape.flat, **factory),
            )
        else:
            self.embedding = nn.Parameter(torch.randn(n, shape.flat, **factory))
            self.transform = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def saved_tensor(self) -> torch.Tensor:
        """The flattened prefix (n × layers·2·kv_dim): PEFT's `prompt_embeddings`."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) of shape (batch, kv_heads, n, head_dim). The flattened
        layout per token is [layer 0 keys, layer 0 values, layer 1 keys, …] (PEFT's)."""
        s, n = self.shape, self.num_virtual_tokens
        flat = self.saved_tensor().to(dtype)
        kv = flat.view(n, 2 * s.layers, s.heads, s.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(s.layers)]


class PrefixCache(DynamicCache):
    """A KV cache holding only the prefix, read-only: each layer's `update` returns the prefix
    followed by the new keys/values and stores nothing, so a recompute under gradient
    checkpointing sees exactly what the first pass saw."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        keys = layer.keys.to(key_states.dtype)
        values = layer.values.to(value_states.dtype)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


# --- the holder and its hooks ----------------------------------------------------------------
class VirtualTokens(AdapterHolder):
    """Every prompt/prefix adapter of a model, and the hooks that apply the active one. Lives at
    `model.tunesmith_virtual_tokens`; `active`/`disabled` are set by `tunesmith.adapters`.
    Rows of a batch cannot have different virtual tokens (not `routable`)."""

    routable = False

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self._backbone = [backbone]  # a list, so it is not registered as a child module
        self._signature = inspect.signature(backbone.forward)
        self._cache_arg = cache_argument(backbone)
        self._pending: list[tuple[int, bool]] = []  # per open forward: (strip, own cache)
        self._handles = [
            backbone.register_forward_pre_hook(self._before, with_kwargs=True),
            backbone.register_forward_hook(self._after, with_kwargs=True),
        ]

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        remove_virtual_tokens(model)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def current(self) -> PromptEmbeddings | PrefixEncoder | None:
        if self.disabled:
            return None
        names = [n for n in self.active if n in self.adapters]
        return self.adapters[names[0]] if names else None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        adapter = self.current()
        if adapter is None:
            self._pending.append((0, False))
            return None
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError:
            bound = None
        kwargs = dict(bound.arguments) if bound is not None else dict(kwargs)
        extra = kwargs.pop("kwargs", None)
        if isinstance(extra, dict):
            kwargs.update(extra)
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            raise AdapterError("virtual tokens need input_ids or inputs_embeds")
        batch, device, n = ref.shape[0], ref.device, adapter.num_virtual_tokens
        # Either spelling may arrive (callers written for older transformers pass
        # past_key_values); the backbone gets the one its forward declares.
        cache = None
        for name in CACHE_ARGUMENTS:
            if kwargs.get(name) is not None:
                cache = kwargs.pop(name)
        if cache is not None and not isinstance(cache, Cache):
            raise AdapterError(
                f"prompt/prefix tuning needs {self._cache_arg} as a transformers Cache "
                f"(e.g. DynamicCache), got {type(cache).__name__}"
            )
        if cache is not None and self._cache_arg is not None:
            kwargs[self._cache_arg] = cache
        first = cache is None or cache.get_seq_length() == 0

        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise AdapterError(
                    "prompt/prefix tuning needs a 2D attention mask (batch, seq); "
                    f"got {mask.dim()} dimensions"
                )
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        positions, cache_positions = kwargs.get("position_ids"), kwargs.get("cache_position")
        if positions is not None:
            positions = positions + n
        if cache_positions is not None:
            cache_positions = cache_positions + n

        if isinstance(adapter, PromptEmbeddings):
            if first:
                if embeds is None:
                    embeds = module.get_input_embeddings()(input_ids)
                prompts = adapter.prompts(batch, embeds.dtype)
                kwargs["inputs_embeds"] = torch.cat([prompts, embeds], 1)
                kwargs["input_ids"] = None
                lead = torch.arange(n, device=device)
                if positions is not None:
                    positions = torch.cat([lead.expand(positions.shape[0], n), positions], 1)
                if cache_positions is not None:
                    cache_positions = torch.cat([lead, cache_positions])
        elif first:  # later steps find the prefix in the cache already
            dtype = embeds.dtype if embeds is not None else _weights_dtype(module)
            key_values = adapter.key_values(batch, dtype)
            if cache is None:
                use_cache = kwargs.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(getattr(module, "config", None), "use_cache", False)
                cls = DynamicCache if use_cache and not module.training else PrefixCache
                kwargs[self._cache_arg] = cls(key_values)
            else:
                for i, (k, v) in enumerate(key_values):
                    cache.update(k, v, i)
        if positions is not None:
            kwargs["position_ids"] = positions
        if cache_positions is not None:
            kwargs["cache_position"] = cache_positions
        strip = n if isinstance(adapter, PromptEmbeddings) and first else 0
        self._pending.append((strip, isinstance(kwargs.get(self._cache_arg), PrefixCache)))
        return (), kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        strip, own_cache = self._pending.pop() if self._pending else (0, False)
        if not (strip or own_cache):
            return None
        if isinstance(output, ModelOutput):
            fields = dict(output.items())
            if own_cache:  # the training-time prefix cache is internal: not the caller's
                for name in CACHE_ARGUMENTS:
                    fields.pop(name, None)
            if strip and fields.get("last_hidden_state") is not None:
                fields["last_hidden_state"] = fields["last_hidden_state"][:, strip:]
                if fields.get("hidden_states") is not None:
                    fields["hidden_states"] = tuple(h[:, strip:] for h in fields["hidden_states"])
            return type(output)(**fields)
        if strip and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (output[0][:, strip:], *output[1:])
        return None


def _weights_dtype(module: nn.Module) -> torch.dtype:
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.is_floating_point():
        return embeddings.weight.dtype
    return torch.float32


CACHE_ARGUMENTS = ("past_key_values", "cache")
"""The KV cache argument of a decoder's forward: `past_key_values` up to transformers 5.23,
`cache` from 5.24 (which still accepts the old name with a deprecation warning)."""


def cache_argument(backbone: nn.Module) -> str | None:
    """Which of `CACHE_ARGUMENTS` the backbone's forward declares (None: it takes no cache)."""
    params = inspect.signature(backbone.forward).parameters
    return next((name for name in reversed(CACHE_ARGUMENTS) if name in params), None)


def backbone_of(model: nn.Module, method: str) -> nn.Module:
    """The decoder stack whose inputs the virtual tokens extend (`model.base_model`). Raises
    when it cannot take what the method needs."""
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model and not hasattr(model, "config"):
        raise AdapterError(
            f"{method} tuning needs a transformers model with a decoder backbone "
            f"(model.base_model); {type(model).__name__} has none"
        )
    params = inspect.signature(backbone.forward).parameters
    if "inputs_embeds" not in params or "attention_mask" not in params:
        raise AdapterError(
            f"{method} tuning cannot be used with {type(backbone).__name__}: its forward takes "
            "no inputs_embeds/attention_mask"
        )
    if method == "prefix" and cache_argument(backbone) is None:
        raise AdapterError(
            f"prefix tuning cannot be used with {type(backbone).__name__}: its attention takes no "
            "past key/values (forward has neither a cache nor a past_key_values argument); use "
            "prompt tuning or LoRA"
        )
    return backbone


def virtual_tokens(model: nn.Module, create_for: str | None = None) -> VirtualTokens | None:
    holder = getattr(model, ATTR, None)
    if holder is None and create_for is not None:
        holder = VirtualTokens(backbone_of(model, create_for))
        model.add_module(ATTR, holder)
    return holder


def remove_virtual_tokens(model: nn.Module) -> None:
    holder = getattr(model, ATTR, None)
    if holder is not None:
        holder.remove_hooks()
        _allow_cache_under_checkpointing(model, False)
        delattr(model, ATTR)


def _allow_cache_under_checkpointing(model: nn.Module, allow: bool) -> None:
    """transformers drops `past_key_values` inside checkpointed layers (a writable cache would be
    updated twice). The prefix cache used in training is read-only, so keep it there."""
    for module in model.modules():
        if hasattr(type(module), "_can_checkpoint_with_cache"):
            if allow:
                module._can_checkpoint_with_cache = True
            elif "_can_checkpoint_with_cache" in vars(module):
                del module._can_checkpoint_with_cache


# --- creating and initialising ---------------------------------------------------------------
def _token_ids(tokenizer, text: str | None, n: int, vocab_size: int, generator) -> torch.Tensor:
    if text is None:
        special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer else set()
        pool = torch.tensor([i for i in range(vocab_size) if i not in special])
        return pool[torch.randint(len(pool), (n,), generator=generator)]
    if tokenizer is None:
        raise AdapterError('init "text" needs a tokenizer: pass tokenizer=... to add the adapter')
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AdapterError(f"init_text {text!r} gives no tokens")
    return torch.tensor((ids * math.ceil(n / len(ids)))[:n])


def add_prompt_adapter(
    model: nn.Module,
    config: PromptTuningConfig | PrefixTuningConfig,
    name: str,
    tokenizer=None,
) -> nn.Module:
    """Create the prompt/prefix adapter `name` on `model` (initialised; not yet active)."""
    prefix = isinstance(config, PrefixTuningConfig)
    method = "prefix" if prefix else "prompt"
    backbone_of(model, method)
    weights = model.get_input_embeddings().weight
    device, n = weights.device, config.num_virtual_tokens
    hidden = weights.shape[1]
    shapes_only = weights.is_meta or _is_fake(weights)  # the memory planner's model
    init = "none" if shapes_only else config.init
    if not shapes_only:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    if init not in ("random", "none"):
        ids = _token_ids(
            tokenizer,
            config.init_text if config.init == "text" else None,
            n,
            weights.shape[0],
            generator,
        )
    if prefix:
        shape = kv_shape(model)
        adapter = PrefixEncoder(
            n, shape, hidden, config.projection, config.encoder_hidden_size, device=device
        )
        if init not in ("random", "none"):
            with torch.no_grad():
                adapter.embedding.copy_(_prefix_from_tokens(model, ids.to(device), shape))
    else:
        adapter = PromptEmbeddings(n, hidden, device=device)
        with torch.no_grad():
            if init == "none":
                pass
            elif init == "random":
                std = float(weights.float().std())
                adapter.embedding.normal_(0.0, std)
            else:
                adapter.embedding.copy_(weights[ids.to(device)].float())
    holder = virtual_tokens(model, create_for=method)
    if prefix:
        _allow_cache_under_checkpointing(model, True)
    holder.adapters[name] = adapter
    return model


def _is_fake(t: torch.Tensor) -> bool:

    return isinstance(t, FakeTensor)


@torch.no_grad()
def _prefix_from_tokens(model: nn.Module, ids: torch.Tensor, shape: KVShape) -> torch.Tensor:
    """The flattened keys/values the model itself computes for tokens `ids` (positions 0…n−1):
    the layout `PrefixEncoder.key_values` reads back."""
    holder = getattr(model, ATTR, None)
    was_disabled = holder.disabled if holder is not None else False
    if holder is not None:
        holder.disabled = True
    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache()
        backbone = model.base_model
        backbone(input_ids=ids[None], use_cache=True, **{cache_argument(backbone): cache})
    finally:
        model.train(was_training)
        if holder is not None:
            holder.disabled = was_disabled
    layers = []
    for i in range(shape.layers):
        keys, values = cache.layers[i].keys[0], cache.layers[i].values[0]  # (heads, n, head_dim)
        layers += [keys, values]
    kv = torch.stack(layers)  # (2·layers, heads, n, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(ids.shape[0], -1).float()
