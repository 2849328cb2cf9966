"""`tunesmith merge`: base checkpoint + adapter(s) → a merged Hugging Face checkpoint, streamed.

    report = merge_checkpoint("base/", ["out/adapter"], "merged/", dtype="bf16")

The base is read one tensor at a time (`CheckpointReader`) and the output is written one tensor
at a time (`write_checkpoint`): peak host memory is the adapter plus a few copies of the largest
tensor, not the model. Each adapted module's merged weight comes from the adapter layer's own
merge code (`merged_linear`), on a meta-device skeleton of the model whose base weight is filled
in for that one module: LoRA, rsLoRA, DoRA, IA3 and several stacked adapters merge exactly as
`merge_and_unload` would, in fp32, then cast to the output dtype.

A QLoRA adapter was trained against the 4-bit rounding of the base, not the 16-bit weights.
With `quantized_base` (the QLoRA run's quantization settings; found automatically next to an
adapter that `tunesmith train` wrote), every linear the QLoRA loader quantizes is written as its
dequantized value (adapted ones plus the adapter), so the merged model computes what the QLoRA
model computed.

The output folder is built under a temporary name and renamed at the end; an interrupted merge
leaves nothing under the final name."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from tunesmith.adapters.activation import set_active
from tunesmith.adapters.holders import LinearWrapper
from tunesmith.adapters.merging import unmergeable_message
from tunesmith.adapters.peft_format import CONFIG_NAME, load_adapter
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.adapters.state import adapter_state
from tunesmith.cards import Card, base_license, table, write_card
from tunesmith.combine.skeleton import (
    adapter_name,
    attach_adapters,
    base_config,
    checkpoint_key,
    model_skeleton,
)
from tunesmith.errors import TunesmithError
from tunesmith.io import human_bytes
from tunesmith.provenance import resolve_base
from tunesmith.quantized.bnb import (
    QuantConfig,
    dequantized_weight,
    load_quantized,
    new_quantized_linear,
    quantizable_linears,
    quantized_parameter,
)
from tunesmith.registry import find_method, method_for_peft_type, method_of
from tunesmith.shards import (
    CheckpointReader,
    PlannedTensor,
    check_output,
    large_allocations_via_mmap,
    parse_size,
    shard_names,
    shard_plan,
    staging_dir,
    write_checkpoint,
)

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED_BASES = ("auto", "none", "nf4", "fp4", "int8")


@dataclass
class MergeReport:
    out: str
    dtype: str
    files: list[str]
    total_bytes: int
    tensors: int
    merged_modules: int
    adapters: list[str]
    quantized_base: str | None = None
    dry_run: bool = False
    max_logit_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would write" if self.dry_run else "wrote"
        base = f", from the dequantized {self.quantized_base} base" if self.quantized_base else ""
        merged = f" ({self.merged_modules} modules merged{base})" if self.adapters else ""
        out = [
            f"{verb} {self.out}: {self.tensors} tensors{merged}, {self.dtype}, "
            f"{human_bytes(self.total_bytes)} in {len(self.files)} shard(s)",
        ]
        out += [f"  {name}" for name in self.files]
        out += self.notes
        if self.max_logit_diff is not None:
            out.append(f"max |logit difference| vs base + adapter: {self.max_logit_diff:.3g}")
        return out


def output_plan(reader: CheckpointReader, out_dtype: torch.dtype) -> list[PlannedTensor]:
    """Every tensor of the base checkpoint, in storage order; floating ones in `out_dtype`."""
    return [
        PlannedTensor(name, info.shape, out_dtype if info.dtype.is_floating_point else info.dtype)
        for name, info in reader.tensors.items()
    ]


def planned_report(
    out: Path, out_dtype: torch.dtype, plan: list[PlannedTensor], shard_bytes: int, **fields
) -> MergeReport:
    """The report of writing `plan` to `out` (files and size as they will be)."""
    return MergeReport(
        out=str(out),
        dtype=str(out_dtype).removeprefix("torch."),
        files=shard_names(len(shard_plan(plan, shard_bytes))),
        total_bytes=sum(t.nbytes for t in plan),
        tensors=len(plan),
        **fields,
    )


def write_output(
    out: Path,
    overwrite: bool,
    plan,
    produce,
    shard_bytes: int,
    progress,
    config,
    out_dtype: torch.dtype,
    reader: CheckpointReader,
    tokenizer: str,
    report: MergeReport,
) -> None:
    """Write the whole checkpoint (tensors, config, generation config, tokenizer) into a
    staging folder that becomes `out` in one rename."""
    needed = sum(t.nbytes for t in plan)
    with large_allocations_via_mmap(), staging_dir(out, overwrite, needed) as tmp:
        write_checkpoint(tmp, plan, produce, shard_bytes, progress)
        write_config(config, out_dtype, tmp)
        copy_extras(reader, tokenizer, tmp, report.notes)


def output_dtype(setting: str, config) -> torch.dtype:
    """--dtype: bf16 | fp16 | fp32, or auto (the base checkpoint's dtype; fp32 if it names
    none)."""
    if setting in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[setting]
    if setting != "auto":
        raise TunesmithError(f"--dtype: {setting!r} is not one of auto, {', '.join(OUTPUT_DTYPES)}")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in OUTPUT_DTYPES.values() else torch.float32


def qlora_settings(adapter: str | Path):
    """(QuantConfig, whether its compute dtype was "auto") of the QLoRA run that wrote
    `adapter` (its run's config.yaml sits in the parent folder, as `tunesmith train` leaves
    it), or None for any other adapter."""

    run_config = Path(adapter).parent / "config.yaml"
    if not (Path(adapter) / "adapter_config.json").is_file() or not run_config.is_file():
        return None
    try:
        raw = yaml.safe_load(run_config.read_text()) or {}
    except yaml.YAMLError:
        return None
    section = raw.get("method") if isinstance(raw, dict) else None
    spec = find_method(section.get("name")) if isinstance(section, dict) else None
    if spec is None or not spec.quantized_base:
        return None
    try:
        method = spec.config(**{k: v for k, v in section.items() if k != "name"})
    except TunesmithError:
        return None
    fixed = spec.hook("compute_dtype")
    compute = fixed(method) if fixed is not None else "auto"
    if compute == "auto":
        compute = (raw.get("model") or {}).get("dtype", "auto")
    quant = spec.hook("quant_config")(method, OUTPUT_DTYPES.get(compute, torch.float32))
    return quant, compute == "auto"


def resolve_quantized_base(setting: str, adapters: list[str]):
    """(QuantConfig or None, whether its compute dtype is the stored dtype) for --quantized-base.
    "auto" reads the QLoRA run config beside the first adapter."""
    if setting not in QUANTIZED_BASES:
        raise TunesmithError(
            f"--quantized-base: {setting!r} is not one of {', '.join(QUANTIZED_BASES)}"
        )
    if setting == "none":
        return None, False
    if setting == "auto":
        found = qlora_settings(adapters[0]) if adapters else None
        return found if found else (None, False)
    return QuantConfig(setting), True


@torch.no_grad()
def merge_checkpoint(
    base: str | None,
    adapters: list[str],
    out: str | Path,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    quantized_base: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeReport:
    """Merge `adapters` (folders, applied together as a stack) into the checkpoint `base`
    (None: the first adapter's `base_model_name_or_path`) and write a sharded safetensors
    checkpoint with config, generation config and tokenizer to `out`. See the module docstring.
    With `verify`, both models are loaded afterwards and the largest logit difference is
    reported (this needs memory for both)."""

    if not adapters:
        raise TunesmithError("--adapter: give the adapter folder to merge")
    base = resolve_base(
        base, adapters, "--base: give the base model (the adapter does not name one)"
    )
    out = Path(out)
    shard_bytes = parse_size(max_shard_size)
    if not dry_run:
        check_output(out, overwrite, inputs=[base, *adapters])
    config = base_config(base, trust_remote_code, revision)
    out_dtype = output_dtype(dtype, config)
    quant, quant_as_stored = resolve_quantized_base(quantized_base, adapters)
    model = model_skeleton(config, trust_remote_code)
    quantizable: set[str] = set()
    if quant is not None:
        quantizable = set(quantizable_linears(model, quant))
    for folder in adapters:
        _check_mergeable_folder(folder)
    tied = _tied_modules(model, config)
    names = attach_adapters(model, adapters)
    state = adapter_state(model)
    _check_tied_copies(model, tied)
    reader = CheckpointReader(base, revision)
    resolver = _Resolver(model, reader, names, quantizable, quant, quant_as_stored)
    plan = output_plan(reader, out_dtype)
    resolver.check_complete()
    report = planned_report(
        out,
        out_dtype,
        plan,
        shard_bytes,
        merged_modules=len(resolver.wrapped),
        adapters=[str(a) for a in adapters],
        quantized_base=quant.quant if quant is not None else None,
        dry_run=dry_run,
    )
    methods = sorted({method_of(state.configs[n]).name for n in names})
    report.notes.append(f"adapters: {', '.join(map(str, adapters))} ({', '.join(methods)})")
    if dry_run:
        return report
    tokenizer = adapters[0] if (Path(adapters[0]) / "tokenizer_config.json").is_file() else base
    write_output(
        out,
        overwrite,
        plan,
        resolver.produce_as(out_dtype),
        shard_bytes,
        progress,
        config,
        out_dtype,
        reader,
        tokenizer,
        report,
    )
    if verify:
        report.max_logit_diff = compare_logits(base, adapters, out, quant, revision)
    write_card(out, merge_card(base, report, methods))
    return report


def merge_card(base: str, report: MergeReport, methods: list[str]) -> Card:
    """The merged checkpoint's model card: the base, what was merged into it, how checked."""
    rows = [
        ["adapters merged", ", ".join(f"`{a}`" for a in report.adapters)],
        ["their methods", ", ".join(methods)],
        ["dtype", report.dtype],
        ["tensors", f"{report.tensors} ({report.merged_modules} modules changed)"],
        ["size", f"{human_bytes(report.total_bytes)} in {len(report.files)} shard(s)"],
    ]
    if report.quantized_base:
        rows.append(
            ["from", f"the dequantized {report.quantized_base} base the adapters trained on"]
        )
    if report.max_logit_diff is not None:
        rows.append(
            [
                "verified",
                f"largest logit difference to base + adapters: {report.max_logit_diff:.3g}",
            ]
        )
    return Card(
        title=Path(report.out).name,
        base_model=base,
        library_name="transformers",
        tags=["merge", *methods],
        license=base_license(base),
        summary=(
            f"`{base}` with adapters merged into its weights by `tunesmith merge`: a plain "
            "checkpoint, no adapter library needed."
        ),
        sections=[
            ("Merge", table(["", ""], rows)),
            (
                "Use",
                "```python\nfrom transformers import AutoModelForCausalLM\n\n"
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```',
            ),
        ],
    )


def _check_mergeable_folder(folder: str) -> None:
    """Refuse prompt/prefix/bottleneck adapters before building anything."""
    path = Path(folder) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # load_adapter reports a missing or broken config precisely
    peft_type = raw.get("peft_type", "LORA") if isinstance(raw, dict) else None
    method = method_for_peft_type(peft_type) if isinstance(peft_type, str) else None
    if method is not None and method.merge_refusal is not None:
        message = unmergeable_message(Path(folder).name, method.name, method.merge_refusal)
        raise TunesmithError(f"--adapter {folder}: {message}")


def _tied_modules(model: nn.Module, config) -> set[int]:
    """ids of the input embedding and output head when the checkpoint ties them (stores one)."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return {id(model.get_input_embeddings()), id(model.get_output_embeddings())}


def _check_tied_copies(model: nn.Module, tied: set[int]) -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and id(module.original_module) in tied:
            raise TunesmithError(
                f"--adapter: the adapter trains its own copy of {module_name} "
                "(modules_to_save), which the base ties to the embeddings; a merged checkpoint "
                "cannot untie them. Keep the adapter separate, or train without "
                f"{module_name} in modules_to_save"
            )


class _Resolver:
    """Which tensor of the base checkpoint comes out how: merged (adapted modules), taken from
    an adapter (modules_to_save copies), dequantized (QLoRA bases) or copied."""

    def __init__(self, model, reader, names, quantizable, quant, quant_as_stored) -> None:
        self.model, self.reader, self.names = model, reader, names
        self.quantizable, self.quant, self.quant_as_stored = quantizable, quant, quant_as_stored
        self.wrapped: dict[str, LinearWrapper] = {
            n: m for n, m in model.named_modules() if isinstance(m, LinearWrapper)
        }
        self.cache: tuple[str, dict[str, torch.Tensor]] | None = None

    def check_complete(self) -> None:
        for module_name in self.wrapped:
            if self._key(module_name, "weight") is None:
                raise TunesmithError(
                    f"--adapter: the adapter targets {module_name} but the base checkpoint has "
                    f"no tensor {module_name}.weight; the adapter was made for another model"
                )

    def _key(self, module_name: str, attr: str) -> str | None:
        return checkpoint_key(self.model, self.reader, module_name, attr)

    def _locate(self, key: str) -> tuple[str, nn.Module | None, str]:
        """(module name, wrapper or None, attribute path under it) for a checkpoint key."""
        parts = key.split(".")
        module: nn.Module = self.model
        prefix = getattr(self.model, "base_model_prefix", "")
        if parts[0] not in module._modules and prefix in module._modules:
            module = module._modules[prefix]
            walked = [prefix]
        else:
            walked = []
        for i, part in enumerate(parts[:-1]):
            if isinstance(module, (LinearWrapper, ModulesToSave)):
                return ".".join(walked), module, ".".join(parts[i:])
            child = module._modules.get(part)
            if child is None:
                return ".".join(walked), None, ".".join(parts[i:])
            module = child
            walked.append(part)
        if isinstance(module, (LinearWrapper, ModulesToSave)):
            return ".".join(walked), module, parts[-1]
        return ".".join(walked), None, parts[-1]

    def produce_as(self, out_dtype: torch.dtype):
        def produce(planned: PlannedTensor) -> torch.Tensor:
            tensor = self.tensor(planned.name)
            if tensor.is_floating_point():
                result = tensor.to(out_dtype)
                if not torch.isfinite(result).all() and torch.isfinite(tensor).all():
                    big = float(tensor.abs().max())
                    raise TunesmithError(
                        f"tensor {planned.name} overflows {planned.dtype} (largest |value| "
                        f"{big:.3g}); use --dtype bf16 or fp32"
                    )
                return result
            return tensor

        return produce

    def tensor(self, key: str) -> torch.Tensor:
        module_name, wrapper, attr = self._locate(key)
        if isinstance(wrapper, LinearWrapper) and attr in ("weight", "bias"):
            return self._merged(module_name, wrapper)[attr]
        if isinstance(wrapper, ModulesToSave):
            copy = wrapper.active_copy(module_name)
            state = copy.state_dict() if copy is not wrapper.original_module else {}
            if attr in state:  # the adapter's trained copy replaces the base module
                return state[attr].detach()
        tensor = self.reader.read(key)
        if module_name in self.quantizable and attr == "weight":
            return self._roundtrip(tensor)
        return tensor

    def _roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the QLoRA base computed with: quantize, then dequantize (fp32)."""

        config = self.quant
        if self.quant_as_stored:
            config = dataclasses.replace(config, compute_dtype=weight.dtype)
        layer = new_quantized_linear(weight.shape[1], weight.shape[0], False, config, "cpu")
        layer.weight = quantized_parameter(weight, config, "cpu")
        return dequantized_weight(layer)

    def _merged(self, module_name: str, layer: LinearWrapper) -> dict[str, torch.Tensor]:
        if self.cache is not None and self.cache[0] == module_name:
            return self.cache[1]
        base = layer.base_layer
        weight = self.reader.read(self._key(module_name, "weight"))
        bias_key = self._key(module_name, "bias")
        bias = self.reader.read(bias_key) if bias_key is not None else None
        if module_name in self.quantizable:
            weight = self._roundtrip(weight)
        saved = (base.weight, base.bias)
        try:
            base.weight = nn.Parameter(weight.float(), requires_grad=False)
            if bias is not None:
                base.bias = nn.Parameter(bias.float(), requires_grad=False)
            merged = layer.merged_linear(list(self.names), torch.float32)
        finally:
            base.weight, base.bias = saved
        new_weight = merged.weight.detach()
        result = {"weight": new_weight.T.contiguous() if layer.fan_in_fan_out else new_weight}
        if merged.bias is not None:
            result["bias"] = merged.bias.detach()
        self.cache = (module_name, result)
        return result


def write_config(config, out_dtype: torch.dtype, folder: Path) -> None:

    config = copy.deepcopy(config)
    config.dtype = out_dtype
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(folder)


def copy_extras(reader: CheckpointReader, tokenizer: str, folder: Path, notes: list[str]) -> None:
    """generation_config.json from the base checkpoint, the tokenizer (with its chat template)
    from `tokenizer` (a folder or hub id)."""

    base_folder = next(iter(reader.tensors.values())).file.parent if reader.tensors else None
    if base_folder is not None and (base_folder / "generation_config.json").is_file():
        shutil.copyfile(base_folder / "generation_config.json", folder / "generation_config.json")
    try:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    except (OSError, ValueError, TypeError):
        notes.append(f"note: no tokenizer found in {tokenizer}; the checkpoint has none")


@torch.no_grad()
def compare_logits(
    base: str,
    adapters: list[str],
    merged: str | Path,
    quant=None,
    revision: str | None = None,
    length: int = 32,
) -> float:
    """Largest |logit| difference between base + adapters (fp32; a quantized base when `quant`)
    and the merged checkpoint, on two fixed random token sequences."""

    hf_logging.disable_progress_bar()
    if quant is not None:
        reference = load_quantized(base, dataclasses.replace(quant, compute_dtype=torch.float32))
    else:
        reference = AutoModelForCausalLM.from_pretrained(
            base, revision=revision, dtype=torch.float32, use_safetensors=True
        )
    names = [adapter_name(i) for i in range(len(adapters))]
    for name, folder in zip(names, adapters, strict=True):
        load_adapter(reference, folder, name=name)
    set_active(reference, names)
    reference.eval()
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    expected = reference(input_ids=ids).logits
    del reference
    merged_model = AutoModelForCausalLM.from_pretrained(
        str(merged), dtype=torch.float32, use_safetensors=True
    ).eval()
    got = merged_model(input_ids=ids).logits
    return float((got - expected).abs().max())


__all__ = ["MergeReport", "compare_logits", "merge_checkpoint", "output_dtype"]
