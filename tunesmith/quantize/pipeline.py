"""`tunesmith quantize`: a checkpoint (or base + adapter, merged first) to a quantized
checkpoint that tunesmith (and, for each format, its usual consumers) loads back, with a quality
report: perplexity of the original and the quantized model on held-out text, and size on disk.

- rtn | gptq | awq: group-wise integer weights (2/3/4/8 bits) written in GPTQ's format
  (`checkpoint.py`); calibration runs layer by layer (`calibrate.py`).
- int8 | nf4: bitsandbytes LLM.int8 / NF4 (double-quantized, 64-weight blocks), quantized and
  saved by transformers' own bitsandbytes integration, so `from_pretrained` loads it natively.

Calibration and held-out text come from `--calib` (jsonl/json/csv/parquet/txt records in any
format the data pipeline reads: completion text, chat, alpaca, tokenized), tokenized as one
stream and cut into windows of `seq_len` tokens: the first `calib_samples` windows calibrate,
the following `eval_samples` windows measure perplexity (or `--eval-data` gives them).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunesmith.cards import Card, base_license, table, write_card
from tunesmith.combine import merge_checkpoint
from tunesmith.combine.merge import copy_extras, output_dtype
from tunesmith.config import ModelSection
from tunesmith.data.formats import Completion, Conversation, FormatSpec, detect_format, parse_record
from tunesmith.data.sources import read_records
from tunesmith.errors import TunesmithError
from tunesmith.io import human_bytes
from tunesmith.models import load_model, load_tokenizer, read_model_config, resolve_device
from tunesmith.provenance import resolve_base
from tunesmith.quantize.calibrate import (
    Settings,
    check_model,
    decoder_layers,
    layer_linears,
    perplexity,
    quantize_layers,
)
from tunesmith.quantize.rtn import QuantGrid
from tunesmith.quantized.bnb import bitsandbytes
from tunesmith.quantized.gptq.files import LAYOUTS, quantization_config, write_gptq_checkpoint
from tunesmith.shards import (
    CheckpointReader,
    check_output,
    large_allocations_via_mmap,
    parse_size,
    staging_dir,
)

QUANTIZE_METHODS = ("rtn", "gptq", "awq", "int8", "nf4")
GRID_METHODS = ("rtn", "gptq", "awq")
REPORT_NAME = "quantize_report.json"


@dataclass
class QuantizeReport:
    out: str
    method: str
    bits: int
    group_size: int | None
    source: str
    calib_windows: int
    eval_windows: int
    seq_len: int
    perplexity_original: float
    perplexity_quantized: float
    bytes_original: int
    bytes_quantized: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:

        grid = f", group size {self.group_size}" if self.group_size else ""
        ratio = self.bytes_original / max(self.bytes_quantized, 1)
        calib = f", calibrated on {self.calib_windows} windows" if self.calib_windows else ""
        change = self.perplexity_quantized / self.perplexity_original - 1
        return [
            f"wrote {self.out}: {self.method} {self.bits}-bit{grid}{calib} ({self.seconds:.0f} s)",
            f"{'':22}{'original':>12}{'quantized':>12}",
            f"{'perplexity':22}{self.perplexity_original:>12.3f}{self.perplexity_quantized:>12.3f}"
            f"   ({change:+.1%}, {self.eval_windows} held-out windows of {self.seq_len} tokens)",
            f"{'size on disk':22}{human_bytes(self.bytes_original):>12}"
            f"{human_bytes(self.bytes_quantized):>12}   ({ratio:.2f}x smaller)",
            *self.notes,
        ]


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def check_settings(method: str, bits: int | None, group_size: int | None):
    """(bits, group size or None, QuantGrid or None) for a method, or a one-line error."""

    if method not in QUANTIZE_METHODS:
        raise TunesmithError(f"--method: {method!r} is not one of {', '.join(QUANTIZE_METHODS)}")
    if method in ("int8", "nf4"):
        fixed = 8 if method == "int8" else 4
        if bits is not None and bits != fixed:
            raise TunesmithError(
                f"--bits: {method} is {fixed}-bit; drop --bits, or use --method gptq, awq or rtn "
                f"for {bits} bits"
            )
        if group_size is not None:
            raise TunesmithError(
                f"--group-size: {method} uses bitsandbytes' own blocks "
                f"({'one scale per row' if method == 'int8' else '64 weights'}); drop "
                "--group-size, or use --method gptq, awq or rtn"
            )
        return fixed, None, None
    grid = QuantGrid(4 if bits is None else bits, 128 if group_size is None else group_size)
    return grid.bits, grid.group_size, grid


def token_stream(path: str, tokenizer, what: str = "--calib") -> list[int]:
    """All records of `path` as one token stream, documents separated by EOS."""

    if not Path(path).expanduser().exists():
        raise TunesmithError(f"{what}: {path}: no such file or folder")
    records = list(read_records(path))
    if not records:
        raise TunesmithError(f"{what}: {path}: no records")
    fmt = detect_format(records[0], {}, what)
    spec = FormatSpec(fmt, {}, {}, None, what)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = getattr(tokenizer, "chat_template", None)
    stream: list[int] = []
    for record in records:
        example = parse_record(record, spec)
        if isinstance(example, Completion):
            text = example.text
        elif isinstance(example, Conversation):
            if template:
                text = tokenizer.apply_chat_template(example.messages, tokenize=False)
            else:
                text = "\n\n".join(m["content"] for m in example.messages)
        else:
            stream += list(example.input_ids) + eos
            continue
        stream += tokenizer(text, add_special_tokens=True)["input_ids"] + eos
    return stream


def windows_of(stream: list[int], seq_len: int) -> torch.Tensor:
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def calibration_and_eval(
    tokenizer,
    calib: str | None,
    eval_data: str | None,
    calib_samples: int,
    eval_samples: int,
    seq_len: int,
    needs_calibration: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows)."""
    if seq_len < 2:
        raise TunesmithError(f"--seq-len: {seq_len} is too short; use at least 2 (e.g. 512)")
    if calib_samples < 1 or eval_samples < 1:
        raise TunesmithError("--calib-samples and --eval-samples must be at least 1")
    if calib is None and eval_data is None:
        raise TunesmithError(
            "--calib: give a data file (calibration text, and held-out text for the quality "
            "report's perplexity), or --eval-data for the report alone with --method rtn, "
            "int8 or nf4"
        )
    if needs_calibration and calib is None:
        raise TunesmithError("--calib: GPTQ and AWQ need calibration data; give a data file")
    used = calib_samples  # always skipped, so every method is measured on the same text
    calib_windows = torch.empty(0, seq_len, dtype=torch.long)
    if calib is not None:
        stream = token_stream(calib, tokenizer)
        all_windows = windows_of(stream, seq_len)
        needed = used + (0 if eval_data else 1)
        if len(all_windows) < needed:
            raise TunesmithError(
                f"--calib: {calib} has {len(stream):,} tokens, {len(all_windows)} windows of "
                f"{seq_len}; {used} calibration windows"
                + ("" if eval_data else " plus at least 1 held-out window")
                + f" need {needed * seq_len:,} tokens. Give more text, or lower "
                "--calib-samples or --seq-len"
            )
        calib_windows = all_windows[:used] if needs_calibration else calib_windows
        held = all_windows[used : used + eval_samples]
    if eval_data is not None:
        stream = token_stream(eval_data, tokenizer, "--eval-data")
        held = windows_of(stream, seq_len)[:eval_samples]
        if not len(held):
            raise TunesmithError(
                f"--eval-data: {eval_data} has {len(stream):,} tokens, fewer than one window "
                f"of {seq_len}; give more text or lower --seq-len"
            )
    return calib_windows, held


@dataclass(frozen=True)
class QuantizeSettings:
    """How `quantize_checkpoint` quantizes: every `tunesmith quantize` option but the paths and
    the device. `checked()` validates them and resolves the defaults."""

    method: str = "gptq"
    """rtn, gptq, awq (group-wise integers), int8 or nf4 (bitsandbytes)."""
    bits: int | None = None
    """2, 3, 4 or 8 for the grid methods (default 4); int8 and nf4 have their own."""
    group_size: int | None = None
    """Weights per scale: a multiple of 8, or -1 for one per row (default 128)."""
    calib: str | None = None
    """Calibration data (GPTQ and AWQ need it; held-out text comes after it)."""
    calib_samples: int = 128
    """Windows of `seq_len` tokens that calibrate."""
    eval_data: str | None = None
    """Held-out text for the perplexity report (default: `calib` after the calibration)."""
    eval_samples: int = 32
    seq_len: int = 512
    act_order: bool = False
    """GPTQ: quantize columns in order of activation size."""
    damp: float = 0.01
    """GPTQ: added to the Hessian's diagonal, a fraction of its mean."""
    layout: str = "gptq"
    """How grid results are written: GPTQ's format or compressed-tensors'."""
    skip: str | None = None
    """A regular expression of linears kept in floating point."""

    def checked(self) -> tuple[QuantizeSettings, QuantGrid | None]:
        """These settings with `bits` and `group_size` resolved, and the integer grid (None
        for int8 and nf4); a one-line error naming the option that is wrong."""
        bits, group_size, grid = check_settings(self.method, self.bits, self.group_size)
        if not 0 <= self.damp < 1:
            raise TunesmithError(
                f"--damp: {self.damp} must be in [0, 1) (a fraction of the mean diagonal)"
            )
        if self.act_order and self.method != "gptq":
            raise TunesmithError("--act-order: only GPTQ quantizes in activation order; drop it")
        if self.skip is not None:
            if grid is None:
                raise TunesmithError(
                    f"--skip: only rtn, gptq and awq leave linears out, not {self.method}"
                )
            try:
                re.compile(self.skip)
            except re.error as err:
                raise TunesmithError(
                    f"--skip: {self.skip!r} is not a regular expression: {err}"
                ) from None
        if self.layout not in LAYOUTS:
            raise TunesmithError(f"--format: {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.layout != "gptq" and grid is None:
            raise TunesmithError(
                f"--format {self.layout}: only rtn, gptq and awq results are written in it; "
                f"{self.method} is saved in bitsandbytes' format (drop --format)"
            )
        return replace(self, bits=bits, group_size=group_size), grid


def quantize_checkpoint(
    model: str | None,
    out: str | Path,
    settings: QuantizeSettings = QuantizeSettings(),
    *,
    adapters: list[str] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize `model` (a checkpoint folder or hub id; with `adapters`, base + adapters are
    merged first) into `out` as `settings` say. See the module docstring."""
    started = time.perf_counter()
    settings, grid = settings.checked()
    out = Path(out)
    shard_bytes = parse_size(max_shard_size)
    adapters = list(adapters or [])
    model = resolve_base(model, adapters, "--model: give the checkpoint to quantize")
    check_output(out, overwrite, inputs=[model, *adapters, settings.calib, settings.eval_data])
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=_parent(out)) as scratch:
        source = model
        if adapters:
            source = str(Path(scratch) / "merged")
            merge_checkpoint(model, adapters, source, trust_remote_code=trust_remote_code)
        run = _Run(settings, grid, device, overwrite, shard_bytes, trust_remote_code, progress)
        report = _quantize(source, out, run)
    report.source = model + (f" + {', '.join(adapters)}" if adapters else "")
    report.seconds = time.perf_counter() - started
    (out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    write_card(out, quantize_card(model, adapters, report))
    return report


def quantize_card(model: str, adapters: list[str], report: QuantizeReport) -> Card:
    """The quantized checkpoint's model card: the source, the method and its measured cost."""
    grid = f", group size {report.group_size}" if report.group_size else ""
    rows = [
        ["source", f"`{report.source}`"],
        ["method", f"{report.method}, {report.bits}-bit{grid}"],
        ["calibration", f"{report.calib_windows} windows of {report.seq_len} tokens"],
        [
            "perplexity (held-out)",
            f"{report.perplexity_original:.3f} -> {report.perplexity_quantized:.3f}",
        ],
        ["size", f"{report.bytes_original:,} -> {report.bytes_quantized:,} bytes"],
    ]
    return Card(
        title=Path(report.out).name,
        base_model=model,
        library_name="transformers",
        tags=["quantized", report.method, f"{report.bits}-bit", *(["merge"] if adapters else [])],
        license=base_license(model),
        summary=f"`{report.source}` quantized by `tunesmith quantize` ({report.method}).",
        sections=[
            ("Quantization", table(["", ""], rows)),
            (
                "Use",
                "```python\nfrom transformers import AutoModelForCausalLM\n\n"
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```\n\n'
                "(GPTQ's format needs a GPTQ kernel package; compressed-tensors' loads with "
                "`compressed-tensors`; vLLM serves both.)",
            ),
        ],
    )


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


@dataclass(frozen=True)
class _Run:
    """A quantization's checked settings and how it runs."""

    settings: QuantizeSettings
    grid: QuantGrid | None
    device: str
    overwrite: bool
    shard_bytes: int
    trust_remote_code: bool
    progress: Callable[[int, int], None] | None


def _quantize(source: str, out: Path, run: _Run) -> QuantizeReport:
    q, grid, trust_remote_code = run.settings, run.grid, run.trust_remote_code
    method, bits, group_size, layout, skip = q.method, q.bits, q.group_size, q.layout, q.skip
    section = ModelSection(path=source, trust_remote_code=trust_remote_code, device=run.device)
    device = resolve_device(section.device)
    tokenizer = load_tokenizer(section)
    calib_windows, held = calibration_and_eval(
        tokenizer,
        q.calib,
        q.eval_data,
        q.calib_samples,
        q.eval_samples,
        q.seq_len,
        method in ("gptq", "awq"),
    )
    reader = CheckpointReader(source)
    compute = torch.float32 if device == "cpu" else torch.float16
    fp_model = load_model(section, "cpu", compute).eval()
    _check_quantizable(fp_model, method)
    if layout == "compressed-tensors":
        _check_whole_groups(fp_model, group_size, skip)
    store_dtype = output_dtype("auto", _source_config(source, trust_remote_code))
    ppl_original = perplexity(fp_model.to(device), held, device)
    notes: list[str] = []
    with large_allocations_via_mmap(), staging_dir(out, run.overwrite) as tmp:
        if grid is not None:
            fp_model.to("cpu")

            settings = Settings(method, grid, q.damp, q.act_order, skip=skip)
            quantized = quantize_layers(fp_model, calib_windows, settings, device, run.progress)
            ignore = [
                name
                for name, module in fp_model.named_modules()
                if isinstance(module, torch.nn.Linear) and name not in quantized
            ]
            qconfig = quantization_config(
                method, bits, group_size, q.act_order, q.damp, layout, ignore
            )
            write_gptq_checkpoint(fp_model, quantized, tmp, store_dtype, qconfig, run.shard_bytes)
            del fp_model, quantized
        else:
            del fp_model
            _write_bitsandbytes(source, method, tmp, compute, device, trust_remote_code)
        copy_extras(reader, source, tmp, notes)
        quantized_model = load_model(section.model_copy(update={"path": str(tmp)}), device, compute)
        ppl_quantized = perplexity(quantized_model, held, device)
        del quantized_model
        report = QuantizeReport(
            out=str(out),
            method=method,
            bits=bits,
            group_size=group_size,
            source=source,
            calib_windows=len(calib_windows),
            eval_windows=len(held),
            seq_len=q.seq_len,
            perplexity_original=ppl_original,
            perplexity_quantized=ppl_quantized,
            bytes_original=reader.nbytes(),
            bytes_quantized=_checkpoint_bytes(tmp),
            seconds=0.0,
            notes=notes,
        )
    return report


def _check_whole_groups(model, group_size: int, skip: str | None) -> None:
    """compressed-tensors' group strategy needs every quantized linear's input width to be a
    multiple of the group size (GPTQ's format allows a shorter last group)."""
    if group_size == -1:
        return
    path, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, linear in layer_linears(layer, f"{path}.{i}", skip).items():
            if linear.in_features % group_size:
                raise TunesmithError(
                    f"--format compressed-tensors: --group-size {group_size} does not divide "
                    f"{path}.{i}.{name}'s {linear.in_features} input columns, and that format "
                    "stores whole groups only; choose a group size that divides every width "
                    "(or -1), or keep --format gptq"
                )


def _source_config(source: str, trust_remote_code: bool):
    """The checkpoint's own config: non-quantized tensors keep its dtype whatever the compute
    dtype was."""

    return read_model_config(source, "--model", trust_remote_code=trust_remote_code)


def _check_quantizable(model, method: str) -> None:

    if getattr(model.config, "quantization_config", None):
        raise TunesmithError(
            "--model: the checkpoint is already quantized; quantize its 16/32-bit original"
        )
    if method in GRID_METHODS:
        check_model(model, method)


def _write_bitsandbytes(source, method, folder: Path, compute, device, trust_remote_code) -> None:

    bitsandbytes()
    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=config,
        device_map=device,
        dtype=compute,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.save_pretrained(folder)
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)
