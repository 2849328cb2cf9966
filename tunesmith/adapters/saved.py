"""`modules_to_save`: a module trained in full, as a separate copy per adapter.

`ModulesToSave` keeps the original module (used when no active adapter has a copy, or when
adapters are disabled) and one deep copy per adapter name. Names match PEFT's wrapper
(`original_module`, `modules_to_save`) so the saved keys line up with PEFT's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunesmith.adapters.holders import AdapterHolder
from tunesmith.errors import AdapterError


class ModulesToSave(AdapterHolder):
    def __init__(self, original_module: nn.Module) -> None:
        nn.Module.__init__(self)  # PEFT's attribute name: the copies are `modules_to_save`
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.routes = None

    def per_adapter(self) -> nn.ModuleDict:
        return self.modules_to_save

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        model.set_submodule(module_name, self.original_module)

    def add_copy(self, name: str) -> nn.Module:
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module
        return module

    def active_copy(self, module_name: str = "") -> nn.Module:
        names = [n for n in self.active if n in self.modules_to_save]
        if self.disabled or not names:
            return self.original_module
        if len(names) > 1:
            raise AdapterError(
                f"active adapters {', '.join(names)} each have their own trained copy of "
                f"{module_name or 'a module'} (modules_to_save); only one can be used at a time: "
                "activate one of them"
            )
        return self.modules_to_save[names[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.routes is None or self.disabled:
            return self.active_copy()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for name, rows in self.routes.groups:
            if name in self.modules_to_save:
                rows = rows.to(x.device)
                out = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, out)
        return result
