"""ONNX export for onnxruntime and onnxruntime-genai.

`export_onnx` writes a folder from a Hugging Face checkpoint (or base + adapters, merged first):
`model.onnx` (+ `model.onnx.data`) with the KV cache as inputs and outputs (`past_key_values.N.
key/value` in, `present.N.key/value` out, so generation does not recompute the prompt), the
tokenizer, `genai_config.json` (what `onnxruntime_genai.Model(folder)` reads) and a model card.

Two exporters, both maintained upstream; `exporter="auto"` picks the first that takes the model:
- **genai**: onnxruntime-genai's model builder. It writes its own graph of onnxruntime's fused
  operators (GroupQueryAttention with rotary embedding inside, SkipSimplifiedLayerNormalization,
  MatMulNBits for int4), the fastest graph onnxruntime runs, and quantizes with onnxruntime's
  own quantizers. It knows a list of architectures (Llama, Mistral, Qwen2/3, Gemma, Phi-3 ...,
  not GPT-2), and its CPU attention needs a head size that is a multiple of 16.
- **torch**: `torch.onnx.export` (the dynamo exporter) of the transformers model itself, wrapped
  so the cache is flat tensors: it takes any architecture torch.export can trace. int8 is then
  onnxruntime's dynamic quantization of every MatMul, int4 its MatMulNBits quantizer (blocks of
  32 along the input, symmetric), fp16 the model exported in half precision.
  onnxruntime-genai runs it as its generic decoder ("type": "llama" in genai_config.json:
  the class that feeds input_ids, attention_mask, position_ids and the cache by name).

`verify_onnx` checks a folder against torch on prompts: the logits of the prompt and of each
greedy step through the graph's own KV cache (teacher-forced on torch's greedy tokens), whether
the graph picks the same token at each step, and whether onnxruntime-genai generates the same
tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig
from transformers.utils import logging as hf_logging

from tunesmith.cards import Card, base_license, table, write_card
from tunesmith.combine import merge_checkpoint
from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.io import human_bytes
from tunesmith.methods.prompt.layer import cache_argument
from tunesmith.models import load_tokenizer, read_model_config
from tunesmith.paths import looks_local
from tunesmith.provenance import resolve_base
from tunesmith.shards import staging_dir

ONNX_TYPES = ("fp32", "fp16", "int8", "int4")
EXPORTERS = ("auto", "genai", "torch")
GENAI_ARCHITECTURES = (
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "GraniteForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "OlmoForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
"""The transformers classes onnxruntime-genai's model builder (0.18) writes a graph for and that
tunesmith's tests run through it (the builder knows more; `exporter="genai"` tries any)."""
PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Then it",
    "Question: What is the capital of France?\nAnswer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
"""Held-out prompts `verify_onnx` uses when it is given none."""
PROMPT_TOKENS = 48
"""--verify reads at most this many tokens of each prompt (held-out documents are long)."""
FP32_TOLERANCE = 1e-3
"""--verify's bound on |logit - torch's logit| for an fp32 export."""


@dataclass
class VerifyRow:
    prompt: str
    tokens: int  # the prompt's length in tokens
    steps: int  # greedy steps checked
    max_diff: float  # largest |logit - torch| over the prompt and every step
    agree: int  # steps where the graph's argmax is torch's greedy token
    genai_equal: (
        bool | None
    )  # onnxruntime-genai generates the graph's greedy tokens (None: not run)


@dataclass
class OnnxReport:
    out: str
    exporter: str
    outtype: str
    bytes: int
    checks: list[VerifyRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [
            f"wrote {self.out}: ONNX {self.outtype} via {self.exporter} exporter, "
            f"{human_bytes(self.bytes)}"
        ]
        if self.checks:
            lines += verify_table(self.checks).splitlines()
        return lines + self.notes


def require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxruntime", "onnxruntime_genai", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TunesmithError(
            f"--format onnx: {', '.join(missing)} not installed; pip install 'tunesmith[onnx]'"
        )


def head_size(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def genai_refusal(config, outtype: str = "fp32") -> str | None:
    """Why onnxruntime-genai's builder cannot take `config` for a CPU graph (None: it can)."""
    if outtype == "fp16":
        return "onnxruntime-genai's builder writes fp16 for CUDA only"
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in GENAI_ARCHITECTURES:
        return f"{arch} is not an architecture onnxruntime-genai's builder writes"
    if head_size(config) % 16:
        return (
            f"head size {head_size(config)} is not a multiple of 16 (onnxruntime's CPU "
            "GroupQueryAttention needs one)"
        )
    original = getattr(config, "original_max_position_embeddings", None)
    if arch == "Phi3ForCausalLM" and original not in (None, config.max_position_embeddings):
        return "Phi-3 with long-context rope scaling is not in this builder's CPU path"
    return None


def choose_exporter(config, exporter: str, outtype: str = "fp32") -> str:
    if exporter not in EXPORTERS:
        raise TunesmithError(f"--exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    return "torch" if genai_refusal(config, outtype) else "genai"


def export_onnx(
    model: str | None,
    out: str | Path,
    adapters: list[str] | None = None,
    *,
    outtype: str = "fp32",
    exporter: str = "auto",
    overwrite: bool = False,
    verify: bool = False,
    prompts: list[str] | None = None,
    steps: int = 8,
    threads: int | None = None,
    trust_remote_code: bool = False,
) -> OnnxReport:
    """Export a checkpoint (with `adapters`: merged first) to an ONNX folder; see the module
    docstring. With `verify`, the folder is checked against torch before it is kept, and an
    fp32 export whose logits differ by more than `FP32_TOLERANCE` is an error. `threads` goes
    in genai_config.json as onnxruntime's intra-op threads (onnxruntime-genai 0.18 otherwise
    runs the graph on one thread: measured 2x slower on 2 cores, bench/onnx_speed.py)."""

    if outtype not in ONNX_TYPES:
        raise TunesmithError(f"--outtype: {outtype!r} is not one of {', '.join(ONNX_TYPES)}")
    require_onnx()
    out = Path(out)
    adapters = list(adapters or [])
    model = resolve_base(model, adapters, "--model: give the checkpoint to export")
    config = read_model_config(model, "--model", trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise TunesmithError(
            "--model: the checkpoint is quantized; export its 16/32-bit original (--outtype "
            "int8 or int4 quantizes the ONNX graph)"
        )
    chosen = choose_exporter(config, exporter, outtype)
    if verify and chosen == "genai" and outtype == "fp16":
        raise TunesmithError(
            "--verify: onnxruntime-genai's builder writes fp16 for CUDA only, which this check "
            "cannot run on CPU; verify it on a GPU machine, or use --exporter torch"
        )
    notes = []
    if exporter == "auto" and chosen == "torch":
        notes.append(f"exporter: torch, as {genai_refusal(config, outtype)}")
    with (
        staging_dir(out, overwrite) as folder,
        tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=folder.parent) as scratch,
    ):
        source = model
        if adapters:
            source = str(Path(scratch) / "merged")
            merge_checkpoint(
                model, adapters, source, dtype="fp32", trust_remote_code=trust_remote_code
            )
        tokenizer = load_tokenizer(ModelSection(path=source))
        if chosen == "genai":
            _build_genai(source, folder, outtype, Path(scratch) / "cache")
        else:
            _build_torch(source, folder, outtype, config, Path(scratch))
            write_genai_config(folder, config)
            tokenizer.save_pretrained(folder)
        _fix_genai_config(folder, config, source, threads)
        checks = []
        if verify:
            checks = verify_onnx(folder, source, prompts or list(PROMPTS), steps)
            worst = max(row.max_diff for row in checks)
            if outtype == "fp32" and worst > FP32_TOLERANCE:
                raise TunesmithError(
                    f"--verify: the ONNX logits differ from torch's by up to {worst:.3g} "
                    f"(fp32 allows {FP32_TOLERANCE:g}); nothing was written to {out}"
                )
        size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        report = OnnxReport(str(out), chosen, outtype, size, checks, notes)
        write_card(folder, onnx_card(model, adapters, report))
    return report


def _build_genai(source: str, folder: Path, outtype: str, cache: Path) -> None:
    """onnxruntime-genai's model builder, in a child process (it prints a progress bar per
    tensor). fp16 is its CUDA graph: the builder offers fp16 for GPUs only."""
    provider = "cuda" if outtype == "fp16" else "cpu"
    # a folder is read in place; a hub id is fetched by the builder into `cache`
    where = ["-i", source] if looks_local(source) else ["-m", source]
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", *where]
    command += ["-o", str(folder), "-p", outtype, "-e", provider, "-c", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TunesmithError(
            f"onnxruntime-genai's builder failed on {source}: {last}; try --exporter torch"
        )


class _FlatCache(torch.nn.Module):
    """The model with its KV cache as flat tensors (past key, past value per layer in; logits
    and the present key, value per layer out): what an ONNX graph can take and give."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument(self.model) or "past_key_values": cache},
        )
        flat = []
        for layer in output[cache_argument(self.model) or "past_key_values"].layers[: self.layers]:
            flat += [layer.keys, layer.values]
        return (output.logits, *flat)


def cache_names(layers: int, kind: str) -> list[str]:
    prefix = "past_key_values" if kind == "past" else "present"
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def _build_torch(source: str, folder: Path, outtype: str, config, scratch: Path) -> None:
    import onnx

    dtype = torch.float16 if outtype == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation="eager", use_safetensors=True
    ).eval()
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    past = [torch.zeros(1, kv_heads, 2, head_size(config), dtype=dtype) for _ in range(2 * layers)]
    ids = torch.tensor([[1, 2, 3]])
    args = (ids, torch.ones(1, 5, dtype=torch.long), torch.arange(2, 5)[None], past)
    cache_axes = {0: "batch_size", 2: "past_sequence_length"}
    dynamic = (
        {0: "batch_size", 1: "sequence_length"},
        {0: "batch_size", 1: "total_sequence_length"},
        {0: "batch_size", 1: "sequence_length"},
        [cache_axes] * (2 * layers),
    )
    target = folder if outtype in ("fp32", "fp16") else scratch / "fp32"
    target.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.onnx notes that axes with one constraint share a name: expected here
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        torch.onnx.export(
            _FlatCache(model).eval(),
            args,
            str(target / "model.onnx"),
            input_names=[
                "input_ids",
                "attention_mask",
                "position_ids",
                *cache_names(layers, "past"),
            ],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    del model
    if outtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            target / "model.onnx",
            folder / "model.onnx",
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            use_external_data_format=True,
        )
    elif outtype == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(target / "model.onnx")), block_size=32, is_symmetric=True
        )
        quantizer.process()
        quantizer.model.save_model_to_file(
            str(folder / "model.onnx"), use_external_data_format=True
        )
    _one_data_file(folder)


def _one_data_file(folder: Path) -> None:
    """Re-save a graph whose weights came out in several files as model.onnx + model.onnx.data."""
    import onnx

    extra = [p for p in folder.iterdir() if p.name not in ("model.onnx", "model.onnx.data")]
    if not extra:
        return
    graph = onnx.load(str(folder / "model.onnx"))
    for path in extra:
        path.unlink()
    (folder / "model.onnx.data").unlink(missing_ok=True)
    onnx.save_model(
        graph,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
    )


def write_genai_config(folder: Path, config) -> None:
    """genai_config.json for a torch-exported graph: onnxruntime-genai's generic decoder."""
    layers = config.num_hidden_layers
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": head_size(config),
        "hidden_size": config.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None)
        or config.num_attention_heads,
    }
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    genai = {
        "model": {
            "context_length": context,
            "decoder": decoder,
            "type": "llama",  # genai's generic decoder: inputs and cache fed by the names above
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # the torch graph concatenates past and new keys: its cache grows, not shared
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")


def _fix_genai_config(folder: Path, config, source: str, threads: int | None) -> None:
    """Token ids from the checkpoint's generation config (the builder assumes BOS 1 when the
    model has none), and the threads to run on when given."""
    path = folder / "genai_config.json"
    genai = json.loads(path.read_text())
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = None

    def pick(key):
        value = getattr(generation, key, None) if generation is not None else None
        return value if value is not None else getattr(config, key, None)

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = pick(key)
        if value is None:
            genai["model"].pop(key, None)
        else:
            genai["model"][key] = value
    if "pad_token_id" not in genai["model"] and "eos_token_id" in genai["model"]:
        eos = genai["model"]["eos_token_id"]
        genai["model"]["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    if threads is not None:
        if threads < 1:
            raise TunesmithError(f"--threads: {threads} is not a positive number of threads")
        genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(genai, indent=4) + "\n")


class OnnxDecoder:
    """An exported folder's graph run step by step with its own KV cache (onnxruntime)."""

    def __init__(self, folder: str | Path):
        import onnxruntime as ort

        folder = Path(folder)
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.head_size = decoder["head_size"]
        self.kv_heads = decoder["num_key_value_heads"]
        self.layers = decoder["num_hidden_layers"]

    def _dtype(self, name: str):
        return np.float16 if self.inputs[name].type == "tensor(float16)" else np.float32

    def start(self, batch: int = 1) -> dict:
        """An empty cache for `batch` rows."""
        return {
            name: np.zeros((batch, self.kv_heads, 0, self.head_size), self._dtype(name))
            for name in cache_names(self.layers, "past")
        }

    def step(self, ids: np.ndarray, cache: dict, seen: int) -> tuple[np.ndarray, dict]:
        """Logits (float32) for `ids` [batch, new] after `seen` cached tokens, and the cache
        that includes them."""
        total = seen + ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), **cache}
        feeds["attention_mask"] = np.ones((ids.shape[0], total), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(seen, total), ids.shape).copy()
        results = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        present = {
            past: results[now]
            for past, now in zip(
                cache_names(self.layers, "past"), cache_names(self.layers, "present"), strict=True
            )
        }
        return results["logits"].astype(np.float32), present

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """`steps` greedy tokens after `prompt`, through the cache (no end-of-text stop)."""
        logits, cache = self.step(np.array([prompt]), self.start(), 0)
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits, cache = self.step(
                np.array([[tokens[-1]]]), cache, len(prompt) + len(tokens) - 1
            )
        return tokens


def genai_greedy(folder: str | Path, prompt: list[int], steps: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of `prompt` (it stops at end of text)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


def torch_greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Torch's `steps` greedy tokens after `ids` (argmax, no end-of-text stop and none of
    generate()'s logits processors) and its logits for the prompt and each step."""
    argument = cache_argument(model) or "past_key_values"  # `cache` from transformers 5.24
    with torch.no_grad():
        output = model(torch.tensor([ids]), use_cache=True)
        logits, tokens = [output.logits[0]], []
        for _ in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            output = model(
                torch.tensor([[tokens[-1]]]),
                use_cache=True,
                **{argument: output[argument]},
            )
            logits.append(output.logits[0])
    return tokens, torch.cat(logits).float().numpy()


def verify_onnx(
    folder: str | Path, source: str, prompts: list[str], steps: int = 8
) -> list[VerifyRow]:
    """Check an exported folder against torch (fp32) on `prompts`; see the module docstring."""
    hf_logging.disable_progress_bar()
    if not prompts:
        raise TunesmithError("--verify: no prompts to check with")
    reference = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, use_safetensors=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    graph = OnnxDecoder(folder)
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=True, max_length=PROMPT_TOKENS)["input_ids"]
        if not ids:
            raise TunesmithError(f"--verify: the prompt {prompt[:40]!r} has no tokens")
        wanted, full = torch_greedy(reference, ids, steps)
        # the graph teacher-forced on torch's tokens: prompt in one call, then one per step
        logits, cache = graph.step(np.array([ids]), graph.start(), 0)
        got = [logits[0]]
        for i, token in enumerate(wanted[:-1]):
            logits, cache = graph.step(np.array([[token]]), cache, len(ids) + i)
            got.append(logits[0])
        got = np.concatenate(got)
        max_diff = float(np.abs(got - full[: len(got)]).max())
        picks = got[len(ids) - 1 :].argmax(-1)
        agree = int((picks == np.array(wanted)).sum())
        # genai runs the same graph: it must generate the graph's own greedy tokens
        own = graph.greedy(ids, steps)
        cut = next((i for i, t in enumerate(own) if t in eos), len(own))
        generated = genai_greedy(folder, ids, steps)
        while generated and generated[-1] in eos:  # genai may or may not keep the end token
            generated.pop()
        genai = generated == own[:cut]
        rows.append(VerifyRow(prompt, len(ids), len(wanted), max_diff, agree, genai))
    return rows


def verify_table(rows: list[VerifyRow]) -> str:
    lines = [f"{'prompt':<34} {'tokens':>6} {'max |dlogit|':>12} {'greedy equal':>12} {'genai':>6}"]
    for row in rows:
        shown = row.prompt.replace("\n", " ")
        shown = shown if len(shown) <= 32 else shown[:31] + "…"
        genai = "-" if row.genai_equal is None else ("same" if row.genai_equal else "DIFF")
        lines.append(
            f"{shown:<34} {row.tokens:>6} {row.max_diff:>12.3g} "
            f"{f'{row.agree}/{row.steps}':>12} {genai:>6}"
        )
    return "\n".join(lines)


def onnx_card(model: str, adapters: list[str], report: OnnxReport) -> Card:
    rows = [
        [
            "source",
            f"`{model}`" + (f" + {', '.join(f'`{a}`' for a in adapters)}" if adapters else ""),
        ],
        ["exporter", report.exporter],
        ["weights", report.outtype],
        ["size", human_bytes(report.bytes)],
    ]
    sections = [("Export", table(["", ""], rows))]
    if report.checks:
        checks = [
            [
                r.prompt.replace("\n", " ")[:40],
                r.tokens,
                f"{r.max_diff:.3g}",
                f"{r.agree}/{r.steps}",
                "-" if r.genai_equal is None else ("same" if r.genai_equal else "differs"),
            ]
            for r in report.checks
        ]
        header = ["prompt", "tokens", "max logit diff", "greedy equal", "onnxruntime-genai"]
        sections.append(("Checked against torch", table(header, checks)))
    sections.append(
        (
            "Use",
            "```python\nimport onnxruntime_genai as og\n\n"
            'model = og.Model("path/to/this/folder")\n'
            "tokenizer = og.Tokenizer(model)\n```",
        )
    )
    return Card(
        title=Path(report.out).name,
        base_model=model,
        library_name="onnxruntime-genai",
        tags=["onnx", report.outtype, *(["merge"] if adapters else [])],
        license=base_license(model),
        summary=(
            f"`{model}` exported to ONNX ({report.outtype}) by `tunesmith export --format onnx`, "
            "with the KV cache as inputs and outputs, for onnxruntime and onnxruntime-genai."
        ),
        sections=sections,
    )


def read_prompts(path: str | Path) -> list[str]:
    """Prompts for --verify from a .txt file (one per line) or a .jsonl file (each record's
    "prompt" or "text")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TunesmithError(f"--verify-data: cannot read {path}: {err}") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TunesmithError(f"--verify-data: {path}:{number}: not JSON") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TunesmithError(
                f'--verify-data: {path}:{number}: needs a "prompt" or "text" string'
            )
        prompts.append(text)
    return prompts


__all__ = ["ONNX_TYPES", "OnnxDecoder", "OnnxReport", "export_onnx", "verify_onnx"]
