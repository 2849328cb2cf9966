"""Dropout whose mask is a function of what it drops, not of a random generator's state.

During `tunesmith train`, every token of a micro-batch carries a key: a hash of the run's seed,
the optimizer step, the global index of the sample (or packed row) it belongs to and its
position in it (`token_keys`, made by the batch plan). An adapter's dropout (`KeyedDropout`, and
the fused LoRA step through `keep_mask`) draws element (token, feature) of its mask from a
counter-based hash of that key, the dropout site (its module's name) and the feature index. So
the mask of a sample is the same whichever process, micro-batch or padding it lands in: one
process and N processes (`--nproc`), 2×4 and 1×8 micro-batches, an interrupted and a resumed
run take the same steps with dropout on, and gradient checkpointing's recomputation draws the
same mask again without saving any generator state.

Outside the training loop (no keys set: `model.train()` in a user's own loop) dropout draws
from torch's generator as `nn.Dropout` does. The hash is lowbias32 (Chris Wellons' integer
hash) on 32-bit values held in int64, with products split into 16-bit halves so nothing
overflows; the keep probability is resolved to 2⁻³².
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import nn

MASK32 = 0xFFFFFFFF
_KEYS: list[torch.Tensor | None] = [None]
"""The current micro-batch's token keys, (rows, tokens) int64, or None."""


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²), without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on each element (int64 values in [0, 2³²))."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_int(value: int) -> int:
    """`hash32` of one integer (its low 32 bits)."""
    return int(hash32(torch.tensor([value & MASK32], dtype=torch.int64))[0])


def token_keys(seed: int, step: int, rows: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    """The keys of a micro-batch, (len(rows), width) int64: row r is made of segments
    (unit, length), one per sample or packed row `unit` (its global index in the data), whose
    positions count from 0; what is left of the row (padding) is keyed as unit -1."""
    base = hash_int(hash_int(seed) ^ (step & MASK32))
    units = torch.full((len(rows), width), -1, dtype=torch.int64)
    positions = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, segments in enumerate(rows):
        at = 0
        for unit, length in segments:
            units[r, at : at + length] = unit
            positions[r, at : at + length] = torch.arange(length)
            at += length
        positions[r, at:] = torch.arange(width - at)
    unit_keys = hash32((units + base) & MASK32)
    return hash32(unit_keys ^ hash32((positions * 0x9E3779B1 + 0x632BE5AB) & MASK32))


@contextlib.contextmanager
def dropout_keys(keys: torch.Tensor | None) -> Iterator[None]:
    """Adapters' dropout during this block (a micro-batch's forward and backward) keys its
    masks by `keys` (from `token_keys`, on the model's device)."""
    previous, _KEYS[0] = _KEYS[0], keys
    try:
        yield
    finally:
        _KEYS[0] = previous


def site_of(name: str) -> int:
    """A dropout site's number: a 32-bit hash of its module's name."""
    return zlib.crc32(name.encode())


CHUNK_ELEMENTS = 1 << 22
"""Mask elements hashed at once: the int64 temporaries of one chunk (about 32 bytes an element)
are the transient memory keyed dropout adds, 128 MiB at most."""


def keep_mask(shape: torch.Size, p: float, site: int | None, device) -> torch.Tensor | None:
    """The bool keep-mask (True: kept) of an input of `shape` (..., features) at dropout site
    `site`, drawn from the current token keys; None when there are none, the site has no
    number, or the input's leading dimensions are not the keys' (then draw as torch does)."""
    keys = _KEYS[0]
    if keys is None or site is None:
        return None
    leading = shape[:-1]
    if leading.numel() != keys.numel() or (len(leading) > 1 and tuple(leading) != keys.shape):
        return None
    features = shape[-1]
    column = torch.arange(features, device=device, dtype=torch.int64)
    column = hash32((column * 0x85EBCA77 + (site & MASK32)) & MASK32)
    rows = hash32(keys.to(device).reshape(-1, 1) ^ (site & MASK32))
    threshold = min(int(round((1.0 - p) * 2**32)), 2**32)
    if torch.compiler.is_compiling():  # one fused kernel: no loop over a symbolic length
        return (hash32(rows ^ column) < threshold).view(shape)
    mask = torch.empty((rows.shape[0], features), dtype=torch.bool, device=device)
    step = max(1, CHUNK_ELEMENTS // max(features, 1))
    for at in range(0, rows.shape[0], step):
        mask[at : at + step] = hash32(rows[at : at + step] ^ column) < threshold
    return mask.view(shape)


class _Dropped(torch.autograd.Function):
    """x · mask / (1 − p), saving only the 1-byte mask (as the GPU's fused dropout does)."""

    @staticmethod
    def forward(ctx, x, mask, scale: float):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask * scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None, None


class KeyedDropout(nn.Dropout):
    """`nn.Dropout` whose mask comes from `keep_mask` while token keys are set (training),
    and from torch's generator otherwise. `site`: set by `number_sites` from the module's
    name."""

    site: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = keep_mask(x.shape, self.p, self.site, x.device)
        if mask is None:
            return super().forward(x)
        return _Dropped.apply(x, mask, 1.0 / (1.0 - self.p))


def number_sites(model: nn.Module) -> int:
    """Give every `KeyedDropout` in `model` its site number from its qualified name (the same
    in every process); returns how many there are."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, KeyedDropout):
            module.site = site_of(name)
            count += 1
    return count


__all__ = [
    "KeyedDropout",
    "dropout_keys",
    "hash32",
    "hash_int",
    "keep_mask",
    "number_sites",
    "site_of",
    "token_keys",
]
