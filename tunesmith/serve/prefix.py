"""Prefix caching: the keys and values of prompt blocks that requests share (a system prompt,
few-shot examples), kept after a prompt is prefilled and copied into the next one's slot
instead of being computed again.

A block is `BLOCK` tokens; its key is the adapter and every token from the prompt's start to
the block's end, so a block is reused only after the very same tokens under the very same
adapter (a LoRA on the attention projections changes the keys and values; rotary positions
are the same because blocks sit at the same positions). At least the prompt's last token is
always computed, for its logits. Least recently used blocks go first when the cache holds more
than its bytes; unloading an adapter drops its blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 16


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def _key(adapter: str | None, prompt: list[int], end: int) -> tuple:
        return (adapter, tuple(prompt[:end]))

    def match(self, adapter: str | None, prompt: list[int]) -> list[list]:
        """The cached blocks the prompt starts with (each: per layer (keys, values) of shape
        (kv_heads, BLOCK, head_dim)), leaving at least its last token to compute."""
        found = []
        for end in range(BLOCK, len(prompt), BLOCK):  # end < len(prompt): one token is left
            block = self._blocks.get(self._key(adapter, prompt, end))
            if block is None:
                break
            self._blocks.move_to_end(self._key(adapter, prompt, end))
            found.append(block)
        return found

    def store(self, adapter: str | None, prompt: list[int], layers) -> None:
        """Keep the prompt's full blocks; `layers` is per layer (keys, values) of its slot,
        (kv_heads, columns, head_dim), columns 0.. holding the prompt."""
        if self.max_bytes <= 0:
            return
        for end in range(BLOCK, len(prompt) + 1, BLOCK):
            key = self._key(adapter, prompt, end)
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            cut = slice(end - BLOCK, end)
            block = [(k[:, cut].clone(), v[:, cut].clone()) for k, v in layers]
            size = sum(k.numel() * k.element_size() * 2 for k, _ in block)
            if size > self.max_bytes:
                return
            self._blocks[key] = block
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self.bytes -= sum(k.numel() * k.element_size() * 2 for k, _ in old)

    def drop(self, adapter: str) -> None:
        for key in [k for k in self._blocks if k[0] == adapter]:
            old = self._blocks.pop(key)
            self.bytes -= sum(k.numel() * k.element_size() * 2 for k, _ in old)
