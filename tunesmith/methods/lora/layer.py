"""LoRA, rsLoRA and DoRA on one linear layer.

A target `nn.Linear` (or GPT-2's `Conv1D`, whose weight is stored transposed) is replaced by a
`LoRALayer` that keeps the original module as `base_layer` and holds one `LoRAAdapter` per named
adapter. The maths follows PEFT exactly (see DESIGN.md):

    y = W x + b + s · B A dropout(x),           s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA: k = m / ‖W + s·BA‖ (row norm, detached)
          y = W x + b + (k − 1) · W x + k · s · B A x

Several active adapters add their deltas, each computed against the base output, so stacking is
exactly the sum of the single-adapter deltas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.adapters.dropout import KeyedDropout
from tunesmith.adapters.holders import LinearWrapper
from tunesmith.errors import AdapterError
from tunesmith.methods.lora.fused import SharedInputGroup, dropout_of, fused_forward


class LoRAAdapter(nn.Module):
    """One adapter's weights on one layer: lora_A (r × in), lora_B (out × r), and for DoRA
    lora_magnitude_vector (out). `scaling` is a buffer so that a hot swap to another alpha
    changes a value, not the graph."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float,
        use_dora: bool,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.register_buffer(
            "scaling", torch.tensor(float(scaling), device=device), persistent=False
        )
        self.dropout = KeyedDropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = (
            nn.Parameter(torch.ones(out_features, **factory)) if use_dora else None
        )
        # DoRA only: the row scale k used by the last merge, needed to unmerge exactly.
        self.merged_row_scale: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling.float()


class LoRALayer(LinearWrapper):
    """A Linear/Conv1D with LoRA adapters (see `LinearWrapper` for the state)."""

    method_label = "LoRA"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fused = False
        """Train with `FusedLoRA` (set by `tunesmith.methods.lora.impl.prepare_training`)."""
        self.group: SharedInputGroup | None = None
        """The sibling layers fed the same input, computed in one pass."""

    def fusable(self) -> float | None:
        """The shared dropout probability when this call can take the fused training step
        (train mode with gradients, plain LoRA adapters active, nothing merged or routed), else
        None."""
        if not (self.fused and self.training and torch.is_grad_enabled()):
            return None
        if self.disabled or self.routes is not None or self.merged or not self.active:
            return None
        adapters = [self.adapters[name] for name in self.active if name in self.adapters]
        if len(adapters) != len(self.active) or any(a.use_dora for a in adapters):
            return None
        p = {dropout_of(a) for a in adapters}
        return p.pop() if len(p) == 1 else None

    def saved_bytes_beside_input(self, element_bytes: int) -> tuple[float, bool]:
        """Each adapter keeps its rank-wide middle. The plain layer needs the input without
        dropout, and with dropout keeps its own dropped copy and mask instead; DoRA keeps its
        base and low-rank terms. The fused step (`fused`) keeps the input and one 1-byte
        dropout mask per group of layers that share it (counted on the group's first)."""
        e, extra, needs_input = element_bytes, 0.0, False
        adapters = list(self.adapters.values())
        if self.fused and adapters and not any(a.use_dora for a in adapters):
            extra = sum(e * a.r for a in adapters)
            first = self.group is None or self.group.members[0] is self
            if first and any(dropout_of(a) > 0 for a in adapters):
                extra += self.in_features
            return extra, True
        for adapter in adapters:
            extra += e * adapter.r
            if isinstance(adapter.dropout, nn.Identity):
                needs_input = True
            else:
                extra += (e + 1) * self.in_features
            if adapter.use_dora:
                extra += 2 * e * self.out_features
        return extra, needs_input

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and self.fusable() is not None:
            if self.group is not None:
                return self.group.output_for(self, x)
            return fused_forward([self], x)[0]
        base = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base
        if self.routes is not None:
            return self._forward_routed(x, base)
        result = base
        for name in self.active:
            if name not in self.merged:
                result = result + self.adapter_delta(self.adapters[name], x, base)
        return result

    def _forward_routed(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        routes = self.routes
        if x.shape[0] != routes.batch_size:
            raise AdapterError(
                f"route() was given {routes.batch_size} rows but the batch has {x.shape[0]}; "
                "give one adapter name (or None) per row (beam search and "
                "num_return_sequences > 1 multiply the rows)"
            )
        result = base
        for name, rows in routes.groups:
            if name not in self.adapters:
                continue
            rows = rows.to(x.device)
            delta = self.adapter_delta(
                self.adapters[name], x.index_select(0, rows), base.index_select(0, rows)
            )
            result = result.index_add(0, rows, delta)
        return result

    def adapter_delta(
        self, adapter: LoRAAdapter, x: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor:
        """What `adapter` adds to the base output `base` for input `x` (same rows)."""
        dtype = x.dtype
        x_drop = adapter.dropout(x)
        lora = F.linear(F.linear(x_drop, adapter.lora_A.to(dtype)), adapter.lora_B.to(dtype))
        lora = lora * adapter.scaling
        if not adapter.use_dora:
            return lora
        k = (adapter.lora_magnitude_vector / self.dora_weight_norm(adapter).detach()).to(dtype)
        if self.training and not isinstance(adapter.dropout, nn.Identity):
            # PEFT's DoRA applies the magnitude to W·dropout(x), so the base term is recomputed.
            base_term = F.linear(x_drop, self.base_weight().to(dtype))
        else:
            bias = self.base_layer.bias
            base_term = base if bias is None else base - bias
        return (k - 1) * base_term + k * lora

    def dora_weight_norm(self, adapter: LoRAAdapter) -> torch.Tensor:
        """‖W + s·BA‖ per output row, shape (out,)."""
        weight = self.base_weight()
        delta = (adapter.lora_B.to(weight.dtype) @ adapter.lora_A.to(weight.dtype)) * (
            adapter.scaling
        )
        return torch.linalg.norm(weight + delta, dim=1)

    # --- merge maths: W' = c ⊙ W + L, with c = 1 + Σ_DoRA (k − 1), L = Σ k · s · B A ---------
    @torch.no_grad()
    def merge(self, names: list[str], module_name: str = "") -> None:
        """Fold the adapters `names` into the base weight (together with any already merged)."""
        names = [n for n in names if n in self.adapters and n not in self.merged]
        if not names:
            return
        if self.merged:  # DoRA's k depends on the unmerged W: merge everything in one go
            names = list(self.merged) + names
            self.unmerge()
        weight = self.base_weight()
        for name in names:
            adapter = self.adapters[name]
            if adapter.use_dora:
                norm = self.dora_weight_norm(adapter).float()
                adapter.merged_row_scale = adapter.lora_magnitude_vector.float() / norm
        row_scale, low_rank = self._merge_terms(names)
        merged = weight.float() * row_scale[:, None] + low_rank
        if not torch.isfinite(merged).all():
            for name in names:
                self.adapters[name].merged_row_scale = None
            raise AdapterError(
                f"merging adapter(s) {', '.join(names)} into {module_name or 'a layer'} gives "
                "NaN/Inf weights; the adapter is broken (check its training loss); "
                "nothing was merged"
            )
        self.set_base_weight(merged)
        self.merged = tuple(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_weight()
        row_scale, low_rank = self._merge_terms(list(self.merged))
        self.set_base_weight((weight.float() - low_rank) / row_scale[:, None])
        for name in self.merged:
            self.adapters[name].merged_row_scale = None
        self.merged = ()

    @torch.no_grad()
    def merged_linear(self, names: list[str], dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear (in `dtype`) computing the base plus adapters `names`, built in fp32
        from the weight the adapters were trained against (the dequantized one for a quantized
        base); the layer itself is unchanged."""
        weight = self.base_weight().float()
        names = [n for n in names if n in self.adapters and n not in self.merged]
        for name in names:
            adapter = self.adapters[name]
            if adapter.use_dora:
                adapter.merged_row_scale = (
                    adapter.lora_magnitude_vector.float() / self.dora_weight_norm(adapter).float()
                )
        row_scale, low_rank = self._merge_terms(names)
        for name in names:
            self.adapters[name].merged_row_scale = None
        merged = weight * row_scale[:, None] + low_rank
        return self._plain_linear(merged, self.base_layer.bias, dtype)

    def _merge_terms(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_weight()
        row_scale = torch.ones(self.out_features, device=weight.device)
        low_rank = torch.zeros_like(weight, dtype=torch.float32)
        for name in names:
            adapter = self.adapters[name]
            delta = adapter.delta_weight().to(low_rank.device)
            if adapter.use_dora:
                k = adapter.merged_row_scale.to(low_rank.device)
                row_scale += k - 1
                delta = delta * k[:, None]
            low_rank += delta
        return row_scale, low_rank


def init_adapter_weights(
    layer: LoRALayer, adapter: LoRAAdapter, method: str, module_name: str
) -> None:
    """Initialise A and B (and DoRA's magnitude). PiSSA also rewrites the base weight to the
    residual W − s·BA, so the adapted layer still computes W x at init."""
    with torch.no_grad():
        if method == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1.0 / adapter.r)
            adapter.lora_B.zero_()
        elif method == "pissa":
            pissa_factors(layer, adapter, apply_residual=True, module_name=module_name)
        if adapter.use_dora:
            adapter.lora_magnitude_vector.copy_(layer.dora_weight_norm(adapter).float())


@torch.no_grad()
def pissa_factors(
    layer: LoRALayer, adapter: LoRAAdapter, apply_residual: bool, module_name: str = ""
) -> None:
    """Set A, B to the principal r singular directions of W (split √S between them, divided by
    the scaling) and, if `apply_residual`, replace W by W − s·BA."""
    weight = layer.base_weight()
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = adapter.r
    sr = s[:r] / adapter.scaling.float()
    adapter.lora_A.copy_((torch.diag(sr.sqrt()) @ vh[:r]).to(adapter.lora_A.dtype))
    adapter.lora_B.copy_((u[:, :r] @ torch.diag(sr.sqrt())).to(adapter.lora_B.dtype))
    if apply_residual:
        layer.set_base_weight(weight.float() - adapter.delta_weight())
