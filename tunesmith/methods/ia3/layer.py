"""IA3 (Liu et al. 2022): learned scaling vectors, as PEFT implements them.

A target Linear/Conv1D is replaced by an `IA3Layer` holding one vector per adapter:

    attention-side targets (keys, values):   y = (W x + b) ⊙ l      l: (out, 1)
    feed-forward targets (the MLP's down     y = W (x ⊙ l) + b      l: (1, in), i.e. it scales
    projection):                                                      the intermediate activation

Vectors start at 1, so a new adapter changes nothing. Several active adapters multiply.
Merging folds l into W (rows, and the bias, for attention targets; columns for feed-forward
ones); unmerging divides it out again.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.adapters.holders import LinearWrapper
from tunesmith.errors import AdapterError


class IA3Layer(LinearWrapper):
    """A Linear/Conv1D with IA3 vectors: `adapters[name].weight` is (out, 1), or (1, in) when
    `feedforward` (see `LinearWrapper` for the state)."""

    method_label = "IA3"

    def saved_bytes_beside_input(self, element_bytes: int) -> tuple[float, bool]:
        """An input scale needs the input; an output scale keeps the unscaled output."""
        if self.feedforward:
            return 0.0, True
        return float(element_bytes * self.out_features), False

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward

    def add(self, name: str, device=None, dtype=torch.float32) -> None:
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        vector = nn.Module()
        vector.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.adapters[name] = vector

    def vector(self, name: str) -> torch.Tensor:
        return self.adapters[name].weight.flatten()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n for n in self.active if n in self.adapters and n not in self.merged]
        if self.disabled or (not names and self.routes is None):
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        if self.routes is not None:
            if x.shape[0] != self.routes.batch_size:
                raise AdapterError(
                    f"route() was given {self.routes.batch_size} rows but the batch has "
                    f"{x.shape[0]}; give one adapter name (or None) per row"
                )
            dim = self.in_features if self.feedforward else self.out_features
            scale = torch.ones(x.shape[0], dim, device=x.device, dtype=dtype)
            for name, rows in self.routes.groups:
                if name in self.adapters:
                    scale[rows.to(x.device)] *= self.vector(name).to(dtype)
            scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), dim)
        else:
            scale = torch.ones((), device=x.device, dtype=dtype)
            for name in names:
                scale = scale * self.vector(name).to(dtype)
        if self.feedforward:
            return self.base_layer(x * scale, *args, **kwargs)
        return self.base_layer(x, *args, **kwargs) * scale

    # --- merging: W' = W ⊙ L (rows or columns), attention-side bias b' = b ⊙ l --------------
    def _product(self, names: list[str]) -> torch.Tensor:
        product = torch.ones(
            self.in_features if self.feedforward else self.out_features,
            device=self.base_layer.weight.device,
        )
        for name in names:
            product = product * self.vector(name).float().to(product.device)
        return product

    def _scaled(self, weight: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        return weight * (product[None, :] if self.feedforward else product[:, None])

    @torch.no_grad()
    def merge(self, names: list[str], module_name: str = "") -> None:
        names = [n for n in names if n in self.adapters and n not in self.merged]
        if not names:
            return
        product = self._product(names)
        if not torch.isfinite(product).all() or (product == 0).any():
            raise AdapterError(
                f"merging IA3 adapter(s) {', '.join(names)} into {module_name or 'a layer'} "
                "would write NaN/Inf or zero scales that cannot be unmerged; nothing was merged"
            )
        self.set_base_weight(self._scaled(self.base_weight().float(), product))
        bias = self.base_layer.bias
        if bias is not None and not self.feedforward:
            bias.copy_((bias.float() * product).to(bias.dtype))
        self.merged = self.merged + tuple(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        product = self._product(list(self.merged))
        self.set_base_weight(self._scaled(self.base_weight().float(), 1.0 / product))
        bias = self.base_layer.bias
        if bias is not None and not self.feedforward:
            bias.copy_((bias.float() / product).to(bias.dtype))
        self.merged = ()

    @torch.no_grad()
    def merged_linear(self, names: list[str], dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear (in `dtype`) computing the base scaled by adapters `names`, from the
        weight the adapters were trained against; the layer itself is unchanged."""
        names = [n for n in names if n in self.adapters and n not in self.merged]
        product = self._product(names)
        weight = self._scaled(self.base_weight().float(), product)
        bias = self.base_layer.bias
        if bias is not None and not self.feedforward:
            bias = bias.float() * product
        return self._plain_linear(weight, bias, dtype)
