"""The serving engine's KV cache: per layer one preallocated buffer of keys and one of values,
`(slots, kv_heads, columns, head_dim)`, a slot per running sequence.

A sequence's token at position p has its keys and values in column p of its slot, from its
first prompt chunk to its last token: nothing is concatenated per step, nothing re-padded when
a sequence joins (it writes into a free slot) and nothing copied when one finishes (its slot is
free again). Each forward pass says which slots its rows are and where they write (`plan_*`),
and gets back the keys and values its attention reads, with a 4-D mask from `mask_*` that lets
each row see its own columns up to its own position and nothing else.

- decode: rows are the slots `0..high-1` (free slots and those still prefilling ride along,
  masked, so the buffer is read in place, as a view, with no gather); each writes one column;
- prefill: rows are the slots of the prompts being prefilled, right-padded chunks; each writes
  its chunk's columns; attention reads those slots' columns gathered (prefill's matmuls dwarf
  that copy).

It speaks transformers' cache protocol where the models use it: `update(keys, values,
layer_idx, ...)` from each attention layer. Positions and the 4-D mask come from the engine,
so the model never asks the cache for its length. The buffers grow (doubling columns, rounded
to 64) when a sequence needs more and stay at that size (zeroing them again for every request
of an idle-then-busy server would cost more than holding them); `clear` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

_ROUND = 64


@dataclass
class _Plan:
    decode: bool
    high: int = 0
    """decode: rows 0..high-1."""
    columns: torch.Tensor | None = None
    """decode: the column each row writes."""
    slots: list[int] | None = None
    """prefill: each row's slot."""
    starts: list[int] | None = None
    counts: list[int] | None = None
    index: torch.Tensor | None = None
    width: int = 0
    """Columns attention reads (the longest row's)."""


class SlotCache:
    def __init__(self, slots: int, device: torch.device) -> None:
        self.slots = slots
        self.device = device
        self.columns = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.plan: _Plan | None = None
        self._shapes: list[tuple] = []
        """Per layer (kv_heads, head_dim, dtype), known after the first forward pass."""

    # --- size ---
    def reserve(self, columns: int) -> None:
        """Room for `columns` columns in every slot (grown, content kept)."""
        if columns <= self.columns:
            if not self.keys and self._shapes:
                self._allocate()
            return
        wanted = max(columns, 2 * self.columns)
        wanted = -(-wanted // _ROUND) * _ROUND
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((*old.shape[:2], wanted, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                store[i] = new
        self.columns = wanted
        if not self.keys and self._shapes:
            self._allocate()

    def _allocate(self) -> None:
        for heads, dim, dtype in self._shapes:
            shape = (self.slots, heads, self.columns, dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))

    @property
    def dtype(self) -> torch.dtype:
        """The keys' and values' dtype (float32 until the first forward pass has shown it;
        the masks are cast to the query's dtype where they are used)."""
        return self._shapes[0][2] if self._shapes else torch.float32

    def ready(self) -> bool:
        """Whether the buffers exist (after the first forward pass)."""
        return bool(self.keys)

    def slot_layers(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the slot's (keys, values), (kv_heads, columns, head_dim): views."""
        return [(k[slot], v[slot]) for k, v in zip(self.keys, self.values, strict=True)]

    def write(self, slot: int, start: int, layers) -> None:
        """Copy per-layer (keys, values) blocks into the slot from column `start`."""
        for (k, v), buf_k, buf_v in zip(layers, self.keys, self.values, strict=True):
            n = k.shape[1]
            buf_k[slot, :, start : start + n] = k
            buf_v[slot, :, start : start + n] = v

    def clear(self) -> None:
        """Drop the buffers (no sequence is left)."""
        self.keys, self.values, self.columns = [], [], 0

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # --- what a forward pass does ---
    def plan_decode(self, columns: list[int], width: int) -> None:
        """Rows 0..len(columns)-1 write one token each, at `columns[row]`; attention reads
        `width` columns (a masked row may write beyond them: its column is rewritten later)."""
        self.plan = _Plan(
            True, len(columns), torch.tensor(columns, device=self.device), width=width
        )

    def plan_prefill(self, slots: list[int], starts: list[int], counts: list[int]) -> None:
        """Row i is slot `slots[i]`, writing `counts[i]` tokens from column `starts[i]`."""
        width = max(s + n for s, n in zip(starts, counts, strict=True))
        index = torch.tensor(slots, device=self.device)
        self.plan = _Plan(False, slots=slots, starts=starts, counts=counts, index=index)
        self.plan.width = width

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # the first pass allocates (shapes from the model)
            _, heads, _, dim = key_states.shape
            shape = (self.slots, heads, self.columns, dim)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
            if len(self._shapes) == layer_idx:
                self._shapes.append((heads, dim, key_states.dtype))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if _packed is not None:
            return _update_packed(keys, values, key_states, value_states)
        plan = self.plan
        if plan.decode:
            rows = torch.arange(plan.high, device=self.device)
            keys[rows, :, plan.columns] = key_states[:, :, 0]
            values[rows, :, plan.columns] = value_states[:, :, 0]
            return keys[: plan.high, :, : plan.width], values[: plan.high, :, : plan.width]
        for row, (slot, start, n) in enumerate(
            zip(plan.slots, plan.starts, plan.counts, strict=True)
        ):
            keys[slot, :, start : start + n] = key_states[row, :, :n]
            values[slot, :, start : start + n] = value_states[row, :, :n]
        return (
            keys[:, :, : plan.width].index_select(0, plan.index),
            values[:, :, : plan.width].index_select(0, plan.index),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the engine always passes positions and a 4-D mask


def mask_decode(positions: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, 1, 1, width): row i sees columns 0..positions[i] (a masked row: give 0)."""
    pos = torch.tensor(positions, device=device)
    width = int(pos.max()) + 1
    seen = torch.arange(width, device=device)[None, :] <= pos[:, None]
    return _additive(seen, dtype)[:, None, None, :]


def mask_prefill(starts: list[int], counts: list[int], dtype, device) -> torch.Tensor:
    """(rows, 1, chunk, width): query t of row i (position starts[i] + t) sees columns up to
    its own position (padding past counts[i] sees the same, and is never read)."""
    chunk = max(counts)
    width = max(s + n for s, n in zip(starts, counts, strict=True))
    start = torch.tensor(starts, device=device)
    query = start[:, None] + torch.arange(chunk, device=device)[None, :]
    seen = torch.arange(width, device=device)[None, None, :] <= query[:, :, None]
    return _additive(seen, dtype)[:, None, :, :]


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)


def supports_slots(model) -> bool:
    """Whether the model's attention takes the slot cache: a causal LM whose layers all attend
    to the whole context (a sliding window would need its own mask)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    text = getter() if getter else config
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    if window:
        return False
    kinds = getattr(text, "layer_types", None) or []
    return all(kind == "full_attention" for kind in kinds)


# --- one forward pass for decode rows and prefill chunks together ------------------------------
@dataclass
class Packed:
    """A forward pass whose batch rows are single tokens (input (T, 1)): first `high` decode
    rows (slot i for row i; rows of free or prefilling slots are dummies), then the prefill
    chunks, each `(first row, tokens, slot, start column)`. Every row writes its token's keys
    and values at (slot, column); `slot_attention` reads them back per decode batch and per
    chunk, so one pass over the weights serves both."""

    high: int
    decode_seen: list[int]
    """Per decode row, the last column it attends to (0 for a dummy)."""
    chunks: list[tuple[int, int, int, int]]
    slots: torch.Tensor
    columns: torch.Tensor
    masks: list[torch.Tensor] | None = None
    """The decode rows' mask, then each chunk's (made once per pass by `packed_pass`)."""


_packed: Packed | None = None
"""The packed pass under way (set around the forward by `packed_pass`)."""


class packed_pass:
    def __init__(self, cache: SlotCache, plan: Packed) -> None:
        self.cache, self.plan = cache, plan

    def __enter__(self):
        global _packed
        _packed = self.plan
        plan, device = self.plan, self.cache.device
        dtype = self.cache.dtype
        plan.masks = [mask_decode(plan.decode_seen, dtype, device) if plan.high else None]
        for _, n, _, start in plan.chunks:
            seen = torch.arange(start + n, device=device)[None, :] <= (
                start + torch.arange(n, device=device)[:, None]
            )
            plan.masks.append(_additive(seen, dtype))
        self.cache.plan = _Plan(False)  # update() sees a packed pass through _packed
        return self

    def __exit__(self, *exc) -> None:
        global _packed
        _packed = None


def _update_packed(keys, values, key_states, value_states):
    plan = _packed
    keys[plan.slots, :, plan.columns] = key_states[:, :, 0]
    values[plan.slots, :, plan.columns] = value_states[:, :, 0]
    return keys, values


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """transformers' attention interface for a packed pass: `query` (T, heads, 1, dim), `key`
    and `value` the layer's whole slot buffers. Returns (T, 1, heads, dim)."""
    plan = _packed
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    if plan.high:
        width = max(plan.decode_seen) + 1
        mask = plan.masks[0].to(query.dtype)
        out[: plan.high] = torch.nn.functional.scaled_dot_product_attention(
            query[: plan.high],
            key[: plan.high, :, :width],
            value[: plan.high, :, :width],
            attn_mask=mask,
            scale=scaling,
            enable_gqa=gqa,
        )
    for (first, n, slot, start), mask in zip(plan.chunks, plan.masks[1:], strict=True):
        q = query[first : first + n].transpose(0, 2)  # (1, heads, n, dim)
        got = torch.nn.functional.scaled_dot_product_attention(
            q,
            key[slot : slot + 1, :, : start + n],
            value[slot : slot + 1, :, : start + n],
            attn_mask=mask.to(query.dtype),
            scale=scaling,
            enable_gqa=gqa,
        )
        out[first : first + n] = got.transpose(0, 2)
    return out.transpose(1, 2).contiguous(), None


ATTENTION = "tunesmith_slots"


def register_attention() -> None:
    AttentionInterface.register(ATTENTION, slot_attention)


PACKABLE = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Phi3ForCausalLM",
    "GPT2LMHeadModel",
}
"""Causal LMs whose logits are their output embedding applied to the decoder's last hidden
state (no soft-capping or scaling after it), so a packed pass can apply the head to the rows
that need logits only."""
