"""Activation offloading (`train.offload_activations`): what the forward keeps for the backward
at the level of the model (with gradient checkpointing: each decoder layer's input, and the
loss head's input) goes to host memory, and comes back ahead of the backward.

    offload = ActivationOffload(device="cuda")
    with offload:
        loss = model(...)
    loss.backward()

On a GPU the copy out runs on a side CUDA stream into pinned host memory as soon as the
tensor is saved, so the forward does not wait for it; the backward unpacks in reverse order,
and each unpack starts copying the previous saved tensor back on the side stream, so the next
layer's input is on the device by the time its recomputation needs it (at most two offloaded
tensors are on the device at once). A tensor saved twice (rotary cos/sin handed to every layer)
is moved once. Tensors under `min_bytes` and parameters stay where they are.

On other devices (the CPU tests) the same bookkeeping runs with plain copies, so the logic,
the order of transfers and the gradients are checked without a GPU. `tunesmith plan` models
the effect by taking the moved storages off the traced device total (`on_move`/`on_return`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Moved:
    host: torch.Tensor | None
    """The host copy (None when only simulated)."""
    source: torch.Tensor | None
    """The device tensor itself, kept only when simulating."""
    event: object = None
    back: torch.Tensor | None = None
    """The tensor prefetched back to the device."""
    back_event: object = None
    device: torch.device | None = None
    refs: int = 1


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks moving activations to the host (see the module docstring).

    `device`: the training device ("cuda" overlaps on a side stream with pinned memory; others
    copy synchronously). `min_bytes`: smaller tensors stay. `on_move(tensor)` /
    `on_return(tensor)`: called when a tensor leaves / comes back (the planner's accounting);
    with `simulate`, nothing is copied and only those calls happen. `record` keeps the order
    of transfers in `events`."""

    def __init__(
        self,
        device: str = "cuda",
        min_bytes: int = 1 << 20,
        on_move: Callable[[torch.Tensor], None] | None = None,
        on_return: Callable[[torch.Tensor], None] | None = None,
        simulate: bool = False,
        record: bool = False,
    ) -> None:
        super().__init__(self._pack, self._unpack)
        self.device_type = torch.device(device).type
        self.cuda = self.device_type == "cuda" and torch.cuda.is_available() and not simulate
        self.min_bytes = min_bytes
        self.on_move, self.on_return = on_move, on_return
        self.simulate = simulate
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.moved: dict[int, _Moved] = {}
        self.by_storage: dict[tuple, int] = {}
        self._next = 0
        self.stats = {"tensors": 0, "bytes": 0, "prefetched": 0}
        self.events: list[tuple[str, int]] | None = [] if record else None
        """With `record`: ("out" | "in" | "prefetch", handle) in the order they happened."""

    def _event(self, kind: str, handle: int) -> None:
        if self.events is not None:
            self.events.append((kind, handle))

    def __enter__(self):
        self.by_storage = {}  # dedupe within one forward only
        return super().__enter__()

    # --- pack: on save in the forward -------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        if not self._moves(tensor):
            return tensor
        storage = tensor.untyped_storage()
        where = id(storage) if self.simulate else storage.data_ptr()  # fake tensors: no pointer
        key = (
            where,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor._version,
        )
        handle = self.by_storage.get(key)
        if handle is not None and handle in self.moved:
            self.moved[handle].refs += 1
            return handle
        handle = self._next
        self._next += 1
        self.by_storage[key] = handle
        self.moved[handle] = self._copy_out(tensor)
        self._event("out", handle)
        self.stats["tensors"] += 1
        self.stats["bytes"] += tensor.numel() * tensor.element_size()
        if self.on_move is not None:
            self.on_move(tensor)
        return handle

    def _moves(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, nn.Parameter) or tensor.device.type != self.device_type:
            return False
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def _copy_out(self, tensor: torch.Tensor) -> _Moved:
        if self.simulate:
            return _Moved(host=None, source=tensor, device=tensor.device)
        if not self.cuda:
            return _Moved(
                host=tensor.detach().to("cpu", copy=True), source=None, device=tensor.device
            )
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        # the caching allocator keeps the device block until the side stream's copy is done
        tensor.record_stream(self.stream)
        return _Moved(host=host, source=None, event=event, device=tensor.device)

    # --- unpack: in the backward, in reverse order -----------------------------------------
    def _unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        moved = self.moved[handle]
        self._event("in", handle)
        tensor = moved.back if moved.back is not None else self._copy_in(moved, wait=True)
        if moved.back_event is not None:
            torch.cuda.current_stream().wait_event(moved.back_event)
            tensor.record_stream(torch.cuda.current_stream())
        moved.refs -= 1
        if moved.refs <= 0:
            del self.moved[handle]
        if self.on_return is not None and moved.back is None:
            self.on_return(tensor)
        self._prefetch_before(handle)
        return tensor

    def _copy_in(self, moved: _Moved, wait: bool) -> torch.Tensor:
        if self.simulate:
            return moved.source
        if not self.cuda:
            return moved.host.to(moved.device, copy=True)
        # wait: on the compute stream, after the copy out (an event, not a host sync);
        # prefetch: on the side stream, which already orders it after the copy out
        stream = torch.cuda.current_stream() if wait else self.stream
        with torch.cuda.stream(stream):
            stream.wait_event(moved.event)
            return moved.host.to(moved.device, non_blocking=True)

    def _prefetch_before(self, handle: int) -> None:
        """Start bringing back the newest offloaded tensor saved before `handle`."""
        earlier = [h for h in self.moved if h < handle and self.moved[h].back is None]
        if not earlier:
            return
        moved = self.moved[max(earlier)]
        self._event("prefetch", max(earlier))
        moved.back = self._copy_in(moved, wait=False)
        if self.cuda:
            moved.back_event = torch.cuda.Event()
            moved.back_event.record(self.stream)
        self.stats["prefetched"] += 1
        if self.on_return is not None:
            self.on_return(moved.back)
