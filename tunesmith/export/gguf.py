"""GGUF export for llama.cpp (and everything built on it: Ollama, LM Studio, llama-cpp-python).

`export_gguf` writes one .gguf file from a Hugging Face checkpoint (or base + adapters, merged
first): the architecture's hyper-parameters, the tokenizer (vocabulary, token types, BPE merges,
special-token ids, whether to add BOS, the pre-tokenizer name llama.cpp splits text with) and
the chat template as metadata, and every weight under llama.cpp's tensor names in f32, f16,
bf16, q8_0 or q4_0, or in a K-quant preset's mix (`kquants.py`: q2_k, q3_k_s/m/l, q4_k_s/m,
q5_k_s/m, q6_k, as llama-quantize mixes them). As llama.cpp's own converter does: 1-D tensors
(norms, biases) stay f32, a matrix whose rows are not a whole number of 32-value blocks falls
back to f16, a tied output head is not written (llama.cpp reuses the embedding), and Llama's q/k
projection rows are permuted from Hugging Face's rotate-half layout to the interleaved one
llama.cpp's rope expects.

`export_lora_gguf` writes a LoRA adapter alone as a GGUF LoRA file (`llama-cli --lora`,
`Llama(lora_path=...)`), applied at run time on the base model's GGUF.

The file is written with header and tensor table first, then one tensor at a time (memory
holds about one tensor), into a temporary file beside the output that is renamed into place
only when complete: an interrupted export or a full disk leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import torch

from tunesmith.adapters.peft_format import CONFIG_NAME, find_adapter_folder, read_adapter_weights
from tunesmith.cards import base_license
from tunesmith.combine import merge_checkpoint
from tunesmith.config import ModelSection
from tunesmith.data.templates import end_of_turn_markers
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_tokenizer import add_tokenizer
from tunesmith.export.imatrix import calibration_files, compute_importance
from tunesmith.export.kquants import PRESETS, QUANTIZERS, preset_type
from tunesmith.export.ollama import write_modelfile
from tunesmith.io import human_bytes, reporting_full_disk, share_like_umask
from tunesmith.models import load_tokenizer, read_model_config
from tunesmith.paths import looks_local
from tunesmith.provenance import resolve_base
from tunesmith.registry import method_for_peft_type
from tunesmith.shards import CheckpointReader, check_output

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", *PRESETS)
"""--outtype: a storage type, or a K-quant preset (`kquants.PRESETS`: a mix per tensor)."""
ARCHITECTURES = {  # transformers class → llama.cpp architecture
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
PERMUTED_ARCHITECTURES = ("llama",)  # rope in llama.cpp's interleaved layout


@dataclass
class ExportReport:
    out: str
    arch: str
    outtype: str
    tensors: int
    bytes: int
    kept_f16: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:

        out = [
            f"wrote {self.out}: {self.arch}, {self.outtype}, {self.tensors} tensors, "
            f"{human_bytes(self.bytes)}"
        ]
        if self.kept_f16:
            out.append(
                f"note: {len(self.kept_f16)} matrices have rows that are not whole 32-value "
                f"blocks and stay f16 (e.g. {self.kept_f16[0]})"
            )
        return out + self.notes


def _qtype(name: str):
    Q = gguf.GGMLQuantizationType

    return {
        "f32": Q.F32,
        "f16": Q.F16,
        "bf16": Q.BF16,
        "q8_0": Q.Q8_0,
        "q4_0": Q.Q4_0,
        "q5_0": Q.Q5_0,
        "q5_1": Q.Q5_1,
        "iq4_nl": Q.IQ4_NL,
        "q2_k": Q.Q2_K,
        "q3_k": Q.Q3_K,
        "q4_k": Q.Q4_K,
        "q5_k": Q.Q5_K,
        "q6_k": Q.Q6_K,
    }[name]


def _file_type(name: str) -> int:
    F = gguf.LlamaFileType

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
        "q2_k": F.MOSTLY_Q2_K,
        "q3_k_s": F.MOSTLY_Q3_K_S,
        "q3_k_m": F.MOSTLY_Q3_K_M,
        "q3_k_l": F.MOSTLY_Q3_K_L,
        "q4_k_s": F.MOSTLY_Q4_K_S,
        "q4_k_m": F.MOSTLY_Q4_K_M,
        "q5_k_s": F.MOSTLY_Q5_K_S,
        "q5_k_m": F.MOSTLY_Q5_K_M,
        "q6_k": F.MOSTLY_Q6_K,
    }[name]


def check_outtype(outtype: str, allowed=GGUF_TYPES) -> None:
    if outtype not in allowed:
        raise TunesmithError(f"--outtype: {outtype!r} is not one of {', '.join(allowed)}")


def gguf_architecture(config, what: str = "--model") -> str:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = names[0] if names else getattr(config, "model_type", "unknown")
    raise TunesmithError(
        f"{what}: {found} cannot be exported to GGUF; supported architectures: "
        f"{', '.join(ARCHITECTURES)}"
    )


def permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or its LoRA B) from Hugging Face's rotate-half layout (each
    head: first half of the rotary pairs, then the second half) to llama.cpp's interleaved one
    (pairs adjacent)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope scaling parameters or {}) from either config layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    return float(theta), ({} if kind == "default" else {**merged, "rope_type": kind})


def _llama3_rope_factors(config, theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (llama.cpp's rope_freqs tensor)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's rope_freqs tensor for Llama 3.1-style rope scaling, else None."""
    theta, scaling = _rope(config)
    if scaling.get("rope_type") != "llama3":
        return None
    return torch.from_numpy(_llama3_rope_factors(config, theta, _head_dim(config), scaling))


def add_hyperparameters(writer, config, outtype: str) -> None:
    """The architecture's metadata (rope scaling llama3 also needs `rope_factors`)."""

    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_file_type(_file_type(outtype))
    if outtype in ("q8_0", "q4_0", *PRESETS):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = scaling.get("rope_type")
    if kind is None or kind == "llama3":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
        return
    raise TunesmithError(
        f"--model: rope scaling {kind!r} is not supported by the GGUF export (default, linear "
        "and llama3 are)"
    )


@dataclass
class _Planned:
    name: str
    qtype: str  # one of GGUF_TYPES
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    importance: np.ndarray | None = None  # per column, from --imatrix-data (K types only)


def _encode(tensor: torch.Tensor, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:

    data = tensor.detach().float().cpu().numpy()
    if qtype == "f32":
        return data.astype(np.float32)
    if qtype == "f16":
        return data.astype(np.float16)
    if qtype in QUANTIZERS:  # K-quants: tunesmith's own (the gguf package has no quantizer)
        rows = QUANTIZERS[qtype](data.reshape(-1, data.shape[-1]), importance)
        return rows.reshape(_byte_shape(tuple(data.shape), qtype)[0])
    return gguf.quants.quantize(data, _qtype(qtype))


def _byte_shape(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], np.dtype]:

    if qtype == "f32":
        return shape, np.dtype(np.float32)
    if qtype == "f16":
        return shape, np.dtype(np.float16)
    return tuple(gguf.quants.quant_shape_to_byte_shape(shape, _qtype(qtype))), np.dtype(np.uint8)


def tensor_type(
    shape: tuple[int, ...],
    outtype: str,
    name: str = "",
    layers: int = 0,
    tied: bool = False,
    gqa: int = 1,
) -> str:
    """What a tensor is stored as: 1-D in f32, rows that are not whole blocks in f16; under a
    K-quant preset, the type `llama-quantize` gives GGUF tensor `name` (`kquants.preset_type`)."""
    if len(shape) == 1:
        return "f32"
    if outtype in PRESETS:
        return preset_type(name, shape[-1], outtype, layers, tied, gqa)
    if outtype in ("q8_0", "q4_0") and shape[-1] % 32:
        return "f16"
    return outtype


def write_gguf(out: Path, arch: str, add_metadata: Callable, planned: list[_Planned]) -> int:
    """Write the file through a temporary beside `out`, renamed into place when complete.
    Returns its size."""

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    with reporting_full_disk(out):
        _write_gguf_to(tmp, out, arch, add_metadata, planned)
    return out.stat().st_size


def _write_gguf_to(tmp: Path, out: Path, arch: str, add_metadata: Callable, planned) -> None:

    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        add_metadata(writer)
        for t in planned:
            byte_shape, dtype = _byte_shape(t.shape, t.qtype)
            nbytes = int(np.prod(byte_shape)) * dtype.itemsize
            raw = None if t.qtype in ("f32", "f16") else _qtype(t.qtype)
            writer.add_tensor_info(t.name, byte_shape, dtype, nbytes, raw)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in planned:
            writer.write_tensor_data(_encode(t.produce(), t.qtype, t.importance))
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
        writer.close()
        share_like_umask(tmp)
        os.replace(tmp, out)
    except BaseException:
        for fout in getattr(writer, "fout", None) or []:
            with contextlib.suppress(OSError):  # a full disk fails the flush too
                fout.close()
        tmp.unlink(missing_ok=True)
        raise


def _tensor_names(arch: str, blocks: int):

    enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    return gguf.get_tensor_name_map(enum, blocks)


def _plan_model(reader, config, arch: str, outtype: str, importance=None) -> Iterator[_Planned]:
    names = _tensor_names(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key in reader.names:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd for a missing output head
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunesmithError(f"--model: tensor {key} has no GGUF name for {arch}")
        permute = None
        if arch in PERMUTED_ARCHITECTURES and key.endswith("q_proj.weight"):
            permute = heads
        elif arch in PERMUTED_ARCHITECTURES and key.endswith("k_proj.weight"):
            permute = kv_heads

        def produce(key=key, permute=permute) -> torch.Tensor:
            tensor = reader.read(key)
            return permute_rope_rows(tensor, permute) if permute else tensor

        shape = tuple(reader.tensors[key].shape)
        gqa = heads // kv_heads
        kind = tensor_type(shape, outtype, name, config.num_hidden_layers, tied, gqa)
        weights = (importance or {}).get(key)
        yield _Planned(name, kind, shape, produce, weights if kind in QUANTIZERS else None)


def export_gguf(
    model: str | None,
    out: str | Path,
    adapters: list[str] | None = None,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    trust_remote_code: bool = False,
    ollama: bool = False,
    imatrix_data: str | None = None,
) -> ExportReport:
    """Export a checkpoint (with `adapters`: merged first) to one GGUF file. See the module
    docstring. With `ollama`, an Ollama Modelfile is written beside it (`export/ollama.py`).
    With `imatrix_data` (a data file or run config), a K-quant preset's K-type tensors are
    quantized weighted by an importance matrix computed from that text (`imatrix.py`)."""

    check_outtype(outtype)
    if imatrix_data is not None and outtype not in PRESETS:
        raise TunesmithError(
            f"--imatrix-data: only the K-quant presets ({', '.join(PRESETS)}) use an "
            f"importance matrix; --outtype is {outtype}"
        )
    if imatrix_data is not None:
        calibration_files(imatrix_data)  # a missing file fails before any merging
    out = Path(out)
    adapters = list(adapters or [])
    model = resolve_base(model, adapters, "--model: give the checkpoint to export")
    check_output(out, overwrite, folder=False, inputs=[model, *adapters])
    config = read_model_config(model, "--model", trust_remote_code=trust_remote_code)
    arch = gguf_architecture(config)
    if getattr(config, "quantization_config", None):
        raise TunesmithError(
            "--model: the checkpoint is quantized; export its 16/32-bit original (GGUF has its "
            "own quantization: --outtype q8_0 or q4_0)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        source = model
        if adapters:
            source = str(Path(scratch) / "merged")
            merge_checkpoint(
                model, adapters, source, dtype="fp32", trust_remote_code=trust_remote_code
            )
        # a merged folder holds the adapter's tokenizer when training saved one there
        tokenizer = load_tokenizer(ModelSection(path=source))
        reader = CheckpointReader(source)
        notes: list[str] = []
        importance = None
        if imatrix_data is not None:
            importance = compute_importance(source, imatrix_data, tokenizer)
            notes.append(
                f"importance matrix: {len(importance.values)} matrices from "
                f"{importance.windows} windows of {importance.seq_len} tokens of {imatrix_data}"
            )
        planned = list(_plan_model(reader, config, arch, outtype, importance and importance.values))

        factors = rope_factors(config)
        if factors is not None:
            planned.insert(0, _Planned("rope_freqs.weight", "f32", factors.shape, factors.clone))

        def metadata(writer) -> None:
            writer.add_name(name or Path(model).name)
            add_card_facts(writer, model, adapters)
            add_hyperparameters(writer, config, outtype)
            if importance is not None:  # the keys llama-quantize writes
                writer.add_string("quantize.imatrix.dataset", str(imatrix_data))
                used = sum(t.importance is not None for t in planned)
                writer.add_int32("quantize.imatrix.entries_count", used)
                writer.add_int32("quantize.imatrix.chunks_count", importance.windows)
            notes.extend(add_tokenizer(writer, tokenizer, config.vocab_size))

        size = write_gguf(out, arch, metadata, planned)
        if ollama:
            stops = list(end_of_turn_markers(tokenizer))
            template = getattr(tokenizer, "chat_template", None)
            if isinstance(template, dict):
                template = template.get("default")
            path, more = write_modelfile(out, template, stops, source)
            notes += [*more, f"wrote {path}: ollama create NAME -f {path}"]
    kept = [t.name for t in planned if t.qtype == "f16" and outtype in ("q8_0", "q4_0")]
    if outtype in PRESETS:
        mix = Counter(t.qtype for t in planned if len(t.shape) > 1)
        notes.insert(0, "tensor types: " + ", ".join(f"{k} {n}" for k, n in sorted(mix.items())))
    return ExportReport(str(out), arch, outtype, len(planned), size, kept, notes)


def add_card_facts(writer, model: str, adapters: list[str]) -> None:
    """The model card's facts in GGUF's general.* keys: the base model, tags, the license (the
    base's own, when its folder's README.md says one), and what was merged."""
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, Path(model).name)
    if not looks_local(model):
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{model}")
    tags = ["tunesmith", *(["merge"] if adapters else [])]
    writer.add_tags(tags)
    license_ = base_license(model)
    if license_:
        writer.add_license(license_)
    if adapters:
        merged = ", ".join(
            Path(a).name if Path(a).name not in ("adapter",) else Path(a).parent.name
            for a in adapters
        )
        writer.add_description(f"{Path(model).name} with adapters merged by tunesmith: {merged}")


# --- LoRA adapters --------------------------------------------------------------------------

LORA_TYPES = ("f32", "f16", "bf16")


def export_lora_gguf(
    adapter: str,
    out: str | Path,
    model: str | None = None,
    *,
    outtype: str = "f32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportReport:
    """A LoRA/rsLoRA adapter (PEFT format) as a GGUF LoRA file for the base model's GGUF. The
    scaling is carried exactly: as adapter.lora.alpha = s·r when every module has the same rank
    and scaling, else folded into lora_b with alpha 0 (llama.cpp then applies scale 1)."""

    check_outtype(outtype, LORA_TYPES)
    out = Path(out)
    check_output(out, overwrite, folder=False, inputs=[adapter, model])
    folder = find_adapter_folder(adapter, "default")
    config = _lora_for_llamacpp(adapter, folder)
    model = resolve_base(
        model, [adapter], "--model: give the base model (the adapter does not name one)"
    )
    base_config = read_model_config(model, "--model", trust_remote_code=trust_remote_code)
    arch = gguf_architecture(base_config)
    names = _tensor_names(arch, base_config.num_hidden_layers)
    heads = base_config.num_attention_heads
    kv_heads = getattr(base_config, "num_key_value_heads", None) or heads
    pairs = _lora_pairs(adapter, read_adapter_weights(folder))
    scalings = {m: config.scaling_for(m) for m in pairs}
    ranks = {m: p["lora_A"].shape[0] for m, p in pairs.items()}
    uniform = len(set(scalings.values())) == 1 and len(set(ranks.values())) == 1
    alpha = next(iter(scalings.values())) * next(iter(ranks.values())) if uniform else 0.0
    planned: list[_Planned] = []
    for module, pair in sorted(pairs.items(), key=lambda kv: _natural(kv[0])):
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise TunesmithError(f"--adapter: module {module} has no GGUF tensor for {arch}")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if not uniform:
            b = b * scalings[module]
        if arch in PERMUTED_ARCHITECTURES and module.endswith("q_proj"):
            b = permute_rope_rows(b, heads)
        elif arch in PERMUTED_ARCHITECTURES and module.endswith("k_proj"):
            b = permute_rope_rows(b, kv_heads)
        planned.append(_Planned(f"{name}.lora_a", outtype, tuple(a.shape), lambda a=a: a))
        planned.append(_Planned(f"{name}.lora_b", outtype, tuple(b.shape), lambda b=b: b))

    def metadata(writer) -> None:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        writer.add_name(Path(adapter).name)

    size = write_gguf(out, arch, metadata, planned)
    note = [] if uniform else ["note: modules differ in rank or scaling; scales folded into lora_b"]
    return ExportReport(str(out), arch, f"lora {outtype}", len(planned), size, [], note)


def _lora_for_llamacpp(adapter: str, folder: Path):
    """The adapter's LoRA config, refusing what llama.cpp cannot apply at run time."""
    raw = json.loads((folder / CONFIG_NAME).read_text())
    method = method_for_peft_type(str(raw.get("peft_type", "LORA")))
    if method is None or not method.low_rank:
        raise TunesmithError(
            f"--adapter: {adapter} is a {raw.get('peft_type')} adapter; llama.cpp applies LoRA "
            "adapters only. Export the merged model instead: tunesmith export --adapter DIR"
        )
    if raw.get("use_dora"):
        raise TunesmithError(
            f"--adapter: {adapter} is a DoRA adapter, which llama.cpp cannot apply at run time; "
            "export the merged model instead (drop --lora-only)"
        )
    if raw.get("modules_to_save"):
        raise TunesmithError(
            f"--adapter: {adapter} trains full copies of {', '.join(raw['modules_to_save'])}, "
            "which a GGUF LoRA file cannot carry; export the merged model instead"
        )
    return method.impl.config_from_peft(raw, source=str(folder / CONFIG_NAME), folder=folder)


def _lora_pairs(adapter: str, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{module: {"lora_A": A, "lora_B": B}}; anything else in the file is refused."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key.removeprefix("base_model.model.").removesuffix(marker)
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise TunesmithError(
                f"--adapter: {adapter} holds {key}, which a GGUF LoRA file cannot carry "
                "(only lora_A/lora_B of linear layers); export the merged model instead"
            )
    return pairs


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
