"""Continuous batching over one base model with many adapters (the engine of `tunesmith serve`).

One worker thread owns the model. Each turn of its loop it

1. admits waiting sequences: the base's and LoRA-family adapters' (LoRA, DoRA, IA3, bottleneck,
   ...) into a free slot of the slot cache (`tunesmith.serve.slots`), taking the keys and
   values of any prompt blocks already cached for that adapter (`tunesmith.serve.prefix`);
2. prefills: the admitted prompts' next chunks, at most `prefill_tokens` tokens in all, in one
   forward pass (right-padded, each row through its own adapter); a long prompt goes in chunks
   over several turns, so it does not stall the streams already running; a prompt whose last
   chunk this is samples its first token;
3. decodes one token for every running sequence in one forward pass, each row through its own
   adapter (`tunesmith.adapters.route`), at its own position, writing into its own slot;
4. frees the slots of finished, cancelled and timed-out sequences (nothing is copied; the
   buffers stay, at their high-water size, so an idle server does not allocate them again).

A prompt- or prefix-tuning adapter puts virtual tokens in front of every row, so its requests
form a group of their own, on the older path: each prompt prefilled alone into a DynamicCache
that joins the group's left-padded batch (the shorter of batch and newcomer gets zero
keys/values on the left with mask 0, after the group's `lead` of virtual tokens; columns no row
attends to are cut when rows leave). Models with a sliding window take that path for every
group. Padding is masked out on both paths, so a row's greedy tokens are the same alone or in
a batch, on either path (the tests hold the engine to that).

The engine knows nothing of HTTP: a sequence reports through `on_event(kind, value)`, called
from the worker thread, a step's events together when the step ends: ("text", piece),
("logprobs", [(token, logprob, [(alternative, logprob), ...]), ...]) before the text of those
tokens when the request asked for them, ("done", finish_reason) or ("error", (kind, text)),
kind one of `FAILURES` (the HTTP side maps them to statuses).
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import llguidance.hf
import torch
from llguidance import LLMatcher
from transformers.cache_utils import DynamicCache

from tunesmith.adapters.activation import route, set_active
from tunesmith.adapters.peft_format import load_adapter
from tunesmith.adapters.state import adapter_state, delete_adapter
from tunesmith.errors import TunesmithError
from tunesmith.generation import stop_token_ids
from tunesmith.paths import check_name
from tunesmith.registry import method_of
from tunesmith.serve.detok import Detokenizer
from tunesmith.serve.metrics import TTFT_BUCKETS, Histogram
from tunesmith.serve.prefix import BLOCK, PrefixCache
from tunesmith.serve.prepack import prepack
from tunesmith.serve.slots import (
    ATTENTION,
    PACKABLE,
    Packed,
    SlotCache,
    mask_decode,
    mask_prefill,
    packed_pass,
    register_attention,
    supports_slots,
)
from tunesmith.threads import ThreadPlan, apply_threads

log = logging.getLogger("tunesmith.serve")


FAILURES = ("timeout", "failed", "shutdown")
"""Why a sequence ended in an error: past its deadline, its model call raised, the engine
stopped."""


class QueueFull(TunesmithError):
    """The waiting queue is full for now (HTTP 429: waiting helps)."""


class NeverFits(TunesmithError):
    """A request has more sequences than the server queues or runs at once (HTTP 400: waiting
    does not help)."""


class AdapterBusy(TunesmithError):
    """An adapter still has requests in flight (HTTP 409)."""


class UnknownModel(TunesmithError):
    """A request names a model the server does not serve (HTTP 404)."""


class GrammarError(TunesmithError):
    """A response format's schema that the grammar engine refuses (HTTP 400)."""


@dataclass
class Params:
    """How one sequence is decoded."""

    max_tokens: int
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """None: no log-probabilities; k: each token's and its k most likely alternatives'."""
    grammar: str | None = None
    """An llguidance grammar the text must follow (`Engine.json_grammar`), or None."""


Event = Callable[[str, object], None]


class Sequence:
    """One completion being generated: its prompt ids, adapter (None: the base), decoding
    parameters and what it has produced so far."""

    def __init__(
        self,
        prompt: list[int],
        adapter: str | None,
        params: Params,
        on_event: Event,
        timeout_s: float | None = None,
    ) -> None:
        self.prompt = list(prompt)
        self.adapter = adapter
        self.params = params
        self.on_event = on_event
        self.submitted = time.monotonic()
        self.deadline = None if timeout_s is None else self.submitted + timeout_s
        self.tokens: list[int] = []
        """Generated ids, without a final stop token."""
        self.stop_token: int | None = None
        """The stop token that ended it, when one did (GRPO trains on it)."""
        self.generated = 0
        """Generated ids, a final stop token included (what `usage` counts)."""
        self.text = ""
        self.detok: Detokenizer | None = None
        """Set when the sequence is prefilled."""
        self.matcher = None
        """llguidance's matcher of `params.grammar` (set when prefilled)."""
        self.bitmask: torch.Tensor | None = None
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        """With `params.logprobs`: (token, log-prob, [(alternative, log-prob)...]) per token."""
        self.logprobs_sent = 0
        self.sent = 0
        """Characters of `text` already reported."""
        self.finish_reason: str | None = None
        self.exception: Exception | None = None
        """What failed it, when it failed (`Engine.run`'s callers raise it)."""
        self.cancelled = False
        self.generated_at_cancel: int | None = None
        """`generated` when `cancel` was called (the tests measure what came after)."""
        self.first_token_at: float | None = None
        self.position = len(self.prompt) - 1
        """The position of the next token fed to the model (`last`)."""
        self.slot: int | None = None
        """Its slot in the engine's slot cache (None: not there)."""
        self.filled = 0
        """Prompt tokens already in the cache (prefill goes in chunks)."""
        self.cached = 0
        """Prompt tokens whose keys and values came from the prefix cache."""
        self.last = -1
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (the client went away); the slot frees after the step under way."""
        if not self.cancelled:
            self.cancelled = True
            self.generated_at_cancel = self.generated


class _Batch:
    """The running rows of one group and their left-padded KV cache."""

    def __init__(self, virtual: str | None, lead: int) -> None:
        self.virtual = virtual
        self.lead = lead
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        """(rows, cached tokens after the lead): 1 where a row has a token, 0 where padded."""


@dataclass
class Stats:
    """Counters the worker keeps, read by `/metrics`."""

    prompt_tokens: int = 0
    """Prompt tokens computed (prefilled)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens taken from the prefix cache instead."""
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    step_rows: int = 0
    """Sum over decode steps of the rows in them (mean batch size = step_rows / steps)."""
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    """Seconds from arrival to the first token, every sequence since start."""
    busy_s: float = 0.0
    """Seconds the worker spent computing (prefill and decode)."""


SLOTS = object()
"""`_decode`'s argument for the sequences in the slot cache (the others are `_Batch`es)."""


def _cache_argument(model) -> str:
    """The KV cache argument of the model's forward: `past_key_values` up to transformers 5.23,
    `cache` from 5.24."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def context_length(model) -> int:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    text = getter() if getter else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class Engine:
    """Continuous batching for `model` (a transformers causal LM with tunesmith adapters
    loaded). `max_running`: sequences decoded at once; `max_queue`: sequences waiting for a
    slot (`submit` raises `QueueFull` beyond it). `threads`: set in the worker thread when it
    starts (`tunesmith.threads`). `pack_weights`: prepack bf16 linear weights on a CPU
    (`tunesmith.serve.prepack`; the same outputs, faster, twice those weights' memory)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        max_prefills_per_step: int = 4,
        threads: ThreadPlan | None = None,
        prefill_tokens: int = 512,
        prefix_cache_bytes: int = 256 << 20,
        pack_weights: bool = False,
    ) -> None:
        self.model = model.eval()
        self.packed_layers = prepack(model) if pack_weights else 0
        """bf16 linear layers whose weights were prepacked for oneDNN (`serve.prepack`)."""
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_running = max_running
        self.max_queue = max_queue
        self.max_prefills_per_step = max_prefills_per_step
        self.context = context_length(model)
        self.stops = set(stop_token_ids(model, tokenizer))
        self.stats = Stats()
        self._cache_arg = _cache_argument(model)
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._batches: dict[str | None, _Batch] = {}
        self._running = 0
        self._model_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ll_tokenizer = None
        self.prefill_tokens = prefill_tokens
        """Prompt tokens prefilled per step at most, across sequences (a long prompt goes in
        chunks between decode steps, so it does not stall the running streams)."""
        self.slotted = supports_slots(model)
        """Whether the base and LoRA-family adapters run on the slot cache (else: the
        left-padded DynamicCache batches that prompt/prefix adapters use)."""
        self._cache = SlotCache(max_running, self.device)
        self._slots: list[Sequence | None] = [None] * max_running
        self._prefilling: deque[Sequence] = deque()
        self.prefix = PrefixCache(prefix_cache_bytes) if self.slotted else None
        self.packed = self.slotted and type(model).__name__ in PACKABLE
        """Whether decode rows and prefill chunks share one forward pass (`slots.Packed`)."""
        if self.packed:
            register_attention()
        self._base_cache_arg = _cache_argument(model.base_model)
        self._prefilled = False
        """Whether this turn already ran a prefill pass of its own."""
        """Shared prompt blocks, per adapter (`tunesmith.serve.prefix`; 0 bytes: off)."""
        self._outbox: list[tuple[Sequence, str, object]] = []
        """Events of the step under way, sent by `_deliver` when it ends."""
        self.threads = threads
        """Threads and cores the worker computes with (None: torch's settings as they are)."""

    # --- what the server calls ---------------------------------------------------------------
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name → method name."""
        configs = adapter_state(self.model).configs
        return {name: method_of(config).name for name, config in configs.items()}

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue `sequences`, all or none: NeverFits when they are more than the server queues
        or runs at once, QueueFull when they do not fit in the queue now."""
        limit = min(self.max_queue, self.max_running)
        if len(sequences) > limit:
            which = "--max-queue" if self.max_queue <= self.max_running else "--max-running"
            raise NeverFits(
                f"this request asks for {len(sequences)} completions (prompts × n), more than "
                f"this server takes at once ({limit}; {which}); send fewer prompts or a smaller n"
            )
        with self._cv:
            known = adapter_state(self.model).configs
            for seq in sequences:
                if seq.adapter is not None and seq.adapter not in known:
                    raise UnknownModel(f"the model {seq.adapter!r} does not exist")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} sequences wait for a slot "
                    f"(limit {self.max_queue}); retry shortly"
                )
            self._waiting.extend(sequences)
            self._cv.notify_all()

    def json_grammar(self, schema: dict) -> str:
        """The llguidance grammar of a JSON schema, checked against this model's tokenizer
        (GrammarError with llguidance's reason when it is refused)."""
        # compact separators: a weak model given free whitespace can spend every token on it
        grammar = LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        problem = LLMatcher.validate_grammar(grammar, self._grammar_tokenizer())
        if problem:
            raise GrammarError(problem.splitlines()[0])
        return grammar

    def _grammar_tokenizer(self):
        if self._ll_tokenizer is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=vocab, eos_token=sorted(self.stops)
            )
        return self._ll_tokenizer

    def queue_length(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return self._running

    def cached_tokens(self) -> int:
        """KV-cache columns in use across all groups (0 when idle: nothing is kept)."""
        slotted = sum(s.filled + len(s.tokens) for s in self._slots if s is not None)
        return slotted + sum(b.mask.numel() for b in self._batches.values() if b.mask is not None)

    def _in_flight(self) -> list[Sequence]:
        batched = (r for b in self._batches.values() for r in b.rows)
        return [*self._waiting, *batched, *(s for s in self._slots if s is not None)]

    def load(self, name: str, path: str) -> str:
        """Load the adapter at `path` as `name` between decode steps; returns its method."""
        check_name(name)
        with self._model_lock:
            if name in adapter_state(self.model).configs:
                raise TunesmithError(
                    f"an adapter named {name!r} is already loaded; unload it first "
                    f"(DELETE /v1/adapters/{name}) or choose another name"
                )
            load_adapter(self.model, path, name=name)
            self.model.eval()
            return method_of(adapter_state(self.model).configs[name]).name

    def unload(self, name: str) -> None:
        with self._model_lock, self._cv:
            if name not in adapter_state(self.model).configs:
                raise UnknownModel(f"no adapter named {name!r} is loaded")
            busy = sum(1 for seq in self._in_flight() if seq.adapter == name and not seq.done)
            if busy:
                raise AdapterBusy(
                    f"adapter {name!r} has {busy} request(s) in flight; unload it when they finish"
                )
            delete_adapter(self.model, name)
            if self.prefix is not None:
                self.prefix.drop(name)

    # --- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads is not None:
            apply_threads(self.threads)  # this thread runs the model; the HTTP side is not pinned
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._busy():
                    self._cv.wait()
                if self._stopping:
                    break
                joining = self._take()
            self._turn(joining)
        for seq in [r for b in self._batches.values() for r in b.rows] + self._slots:
            if seq is not None:
                self._finish(seq, "error", ("shutdown", "the server is shutting down"))
        self._deliver()
        self._reset()

    def run(self, sequences: list[Sequence]) -> None:
        """Generate `sequences` to their end in the calling thread, as the worker would (the
        worker must not be running): offline generation (`tunesmith.serve.offline`). The
        model's active adapters are as before when it returns (the engine puts the model in
        eval mode; `offline` restores a training model's mode)."""
        if self._thread is not None:
            raise RuntimeError("Engine.run: the worker thread is running; submit() instead")
        model = self.model
        active = list(adapter_state(model).active)
        try:
            self._waiting.extend(sequences)
            while self._waiting or self._busy():
                self._turn(self._take())
        finally:
            self._waiting.clear()
            self._reset()
            set_active(model, active)

    def _take(self) -> list[Sequence]:
        """The waiting sequences that fit in the free slots (the caller holds `_cv`)."""
        joining: list[Sequence] = []
        free = self.max_running - self._running
        while self._waiting and len(joining) < free:
            joining.append(self._waiting.popleft())
        return joining

    def _turn(self, joining: list[Sequence]) -> None:
        """One turn of the loop: admit, prefill, decode every group, send the events."""
        started = time.perf_counter()
        with self._model_lock, torch.inference_mode():
            self._admit(joining)
            self._prefilled = False
            if not (self.packed and self._live()):  # else the decode pass takes the chunks
                self._prefilled = True
                self._prefill_step()
            self._deliver()  # first tokens go out before the decode step
            if self._live():
                self._step(SLOTS)
            for key, batch in list(self._batches.items()):
                self._step(batch, key)
            self._deliver()
        self.stats.busy_s += time.perf_counter() - started
        self._running = sum(len(b.rows) for b in self._batches.values()) + sum(
            s is not None for s in self._slots
        )

    def _reset(self) -> None:
        self._batches.clear()
        self._slots = [None] * self.max_running
        self._prefilling.clear()
        self._cache.clear()
        self._running = 0

    def _live(self) -> bool:
        return any(s is not None and s.filled == len(s.prompt) and not s.done for s in self._slots)

    def _busy(self) -> bool:
        return bool(self._batches) or any(s is not None for s in self._slots)

    def _step(self, batch, key=None) -> None:
        try:
            self._decode(batch)
        except Exception as err:
            log.exception("decode step failed")
            rows = [s for s in self._slots if s is not None] if batch is SLOTS else batch.rows
            for seq in rows:
                self._fail(seq, err)
        if batch is SLOTS:
            self._free_slots()
        else:
            self._compact(key, batch)

    def _admit(self, joining: list[Sequence]) -> None:
        """Start the joining sequences: a slot (prefilled in chunks by `_prefill_step`), or,
        for a prompt/prefix adapter, a prefill now into its group's batch."""
        deferred, prefills = [], 0
        for seq in joining:
            if self._drop_if_over(seq):
                continue
            try:
                self._start(seq)
                key, _ = self._group(seq.adapter)
                if self.slotted and key is None:
                    seq.slot = self._slots.index(None)
                    self._slots[seq.slot] = seq
                    room = min(len(seq.prompt) + seq.params.max_tokens, self.context) + 1
                    self._cache.reserve(room)
                    self._reuse_prefix(seq)
                    self._prefilling.append(seq)
                elif prefills < self.max_prefills_per_step:
                    prefills += 1
                    self._prefill(seq)
                else:  # the rest of this turn's prompt/prefix prefills wait for the next turn
                    deferred.append(seq)
            except Exception as err:  # one bad request must not stop the others
                log.exception("prefill failed")
                self._fail(seq, err)
        with self._cv:
            self._waiting.extendleft(reversed(deferred))

    def _reuse_prefix(self, seq: Sequence) -> None:
        if self.prefix is None or not self._cache.ready():
            return
        for b, block in enumerate(self.prefix.match(seq.adapter, seq.prompt)):
            self._cache.write(seq.slot, b * BLOCK, block)
            seq.filled = seq.cached = (b + 1) * BLOCK
        self.stats.cached_prompt_tokens += seq.cached

    def _start(self, seq: Sequence) -> None:
        seq.detok = Detokenizer(self.tokenizer)
        if seq.params.grammar is not None:
            from llguidance.torch import allocate_token_bitmask

            tokenizer = self._grammar_tokenizer()
            seq.matcher = LLMatcher(tokenizer, seq.params.grammar)
            seq.bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)

    def _prefill_step(self) -> None:
        """Prefill the waiting prompts' next chunks, at most `prefill_tokens` tokens in all, in
        one forward pass; a prompt whose last chunk this is samples its first token."""
        rows = self._next_chunks(self.prefill_tokens)
        if not rows:
            return
        try:
            self._prefill_rows(rows)
        except Exception as err:
            if len(rows) == 1:
                log.exception("prefill failed")
                self._fail(rows[0][0], err)
            else:  # find the request that fails: the others go on
                for row in rows:
                    try:
                        self._prefill_rows([row])
                    except Exception as one:
                        log.exception("prefill failed")
                        self._fail(row[0], one)
        for seq, _, _ in rows:
            if seq.done and seq in self._prefilling:
                self._prefilling.remove(seq)
        self._free_slots()

    def _next_chunks(self, budget: int) -> list[tuple[Sequence, int, int]]:
        """The waiting prompts' next chunks, first come first served, `budget` tokens in all:
        (sequence, first position, tokens)."""
        rows = []
        for seq in list(self._prefilling):
            if self._drop_if_over(seq):
                self._prefilling.remove(seq)
                continue
            n = min(len(seq.prompt) - seq.filled, budget)
            if n <= 0:
                break
            rows.append((seq, seq.filled, n))
            budget -= n
        return rows

    def _prefill_rows(self, rows: list[tuple[Sequence, int, int]]) -> None:
        chunk = max(n for _, _, n in rows)
        ids = torch.zeros((len(rows), chunk), dtype=torch.long)
        for i, (seq, start, n) in enumerate(rows):
            ids[i, :n] = torch.tensor(seq.prompt[start : start + n])
        starts = [start for _, start, _ in rows]
        counts = [n for _, _, n in rows]
        positions = torch.tensor(starts)[:, None] + torch.arange(chunk)[None, :]
        ends = sorted({n - 1 for seq, start, n in rows if start + n == len(seq.prompt)})
        self._cache.plan_prefill([seq.slot for seq, _, _ in rows], starts, counts)
        mask = mask_prefill(starts, counts, self._dtype(), self.device)
        keep = torch.tensor(ends or [chunk - 1], device=self.device)
        logits = self._forward(
            None,
            [seq.adapter for seq, _, _ in rows],
            ids.to(self.device),
            mask,
            positions.to(self.device),
            self._cache,
            keep,
        )
        for i, (seq, _, n) in enumerate(rows):
            seq.filled += n
            self.stats.prompt_tokens += n
            if seq.filled == len(seq.prompt):
                self._prefilling.remove(seq)
                if self.prefix is not None:
                    self.prefix.store(seq.adapter, seq.prompt, self._cache.slot_layers(seq.slot))
                self._accept(seq, self._sample(seq, logits[i, ends.index(n - 1)]))

    def _decode_slots(self) -> None:
        """One decode step for every sequence in a slot whose prompt is in: rows are the slots
        0..high-1, the others (free, prefilling) masked and not read."""
        high = max(i for i, s in enumerate(self._slots) if s is not None) + 1
        rows = self._slots[:high]
        live = [s is not None and s.filled == len(s.prompt) and not s.done for s in rows]
        ids = [s.last if ok else 0 for s, ok in zip(rows, live, strict=True)]
        seen = [s.position if ok else 0 for s, ok in zip(rows, live, strict=True)]
        columns = [
            s.position if ok else (s.filled if s is not None else 0)
            for s, ok in zip(rows, live, strict=True)
        ]
        self._cache.plan_decode(columns, max(seen) + 1)
        logits = self._forward(
            None,
            [s.adapter if ok else None for s, ok in zip(rows, live, strict=True)],
            torch.tensor(ids, device=self.device)[:, None],
            mask_decode(seen, self._dtype(), self.device),
            torch.tensor(seen, device=self.device)[:, None],
            self._cache,
        )
        self.stats.steps += 1
        self.stats.step_rows += sum(live)
        for seq, ok, row in zip(rows, live, logits, strict=True):
            if ok:
                self._accept(seq, self._sample(seq, row))

    def _packed_step(self) -> None:
        """One forward pass for every running sequence's next token and, within
        `prefill_tokens`, the waiting prompts' next chunks (unless this turn prefilled
        already): one pass over the weights for both (`tunesmith.serve.slots.Packed`)."""
        live = [s is not None and s.filled == len(s.prompt) and not s.done for s in self._slots]
        high = max((i for i, ok in enumerate(live) if ok), default=-1) + 1
        scratch = self._cache.columns - 1  # a column no sequence uses (see SlotCache.reserve)
        ids, positions, slots, columns, adapters, seen = [], [], [], [], [], []
        for i in range(high):
            seq = self._slots[i]
            ok = live[i]
            ids.append(seq.last if ok else 0)
            positions.append(seq.position if ok else 0)
            slots.append(i)
            columns.append(seq.position if ok else scratch)
            adapters.append(seq.adapter if ok else None)
            seen.append(seq.position if ok else 0)
        chunks, finishing = [], []
        for seq, start, n in self._next_chunks(0 if self._prefilled else self.prefill_tokens):
            chunks.append((len(ids), n, seq.slot, start))
            ids += seq.prompt[start : start + n]
            positions += range(start, start + n)
            slots += [seq.slot] * n
            columns += range(start, start + n)
            adapters += [seq.adapter] * n
            if start + n == len(seq.prompt):
                finishing.append((seq, len(ids) - 1))
        rows = [i for i in range(high) if live[i]] + [row for _, row in finishing]
        plan = Packed(
            high,
            seen,
            [(first, n, slot, start) for first, n, slot, start in chunks],
            torch.tensor(slots, device=self.device),
            torch.tensor(columns, device=self.device),
        )
        logits = self._packed_forward(plan, ids, positions, adapters, rows)
        self.stats.steps += 1
        self.stats.step_rows += sum(live)
        for _, n, slot, _ in chunks:
            seq = self._slots[slot]
            seq.filled += n
            self.stats.prompt_tokens += n
        by_row = dict(zip(rows, logits, strict=True))
        for i in range(high):
            if live[i]:
                self._accept(self._slots[i], self._sample(self._slots[i], by_row[i]))
        for seq, row in finishing:
            self._prefilling.remove(seq)
            if self.prefix is not None:
                self.prefix.store(seq.adapter, seq.prompt, self._cache.slot_layers(seq.slot))
            self._accept(seq, self._sample(seq, by_row[row]))

    def _packed_forward(self, plan, ids, positions, adapters, rows) -> torch.Tensor:
        """The decoder on single-token rows, then the output head on `rows` only."""
        model = self.model
        set_active(model, [])
        config = model.config
        before = config._attn_implementation
        routing = route(model, adapters) if any(adapters) else nullcontext()
        placeholder = torch.zeros((1, 1, 1, 1), device=self.device)  # a 4-D mask: used as is
        try:
            config._attn_implementation = ATTENTION
            with packed_pass(self._cache, plan), routing:
                out = model.base_model(
                    input_ids=torch.tensor(ids, device=self.device)[:, None],
                    attention_mask=placeholder,
                    position_ids=torch.tensor(positions, device=self.device)[:, None],
                    use_cache=True,
                    **{self._base_cache_arg: self._cache},
                )
        finally:
            config._attn_implementation = before
        hidden = out.last_hidden_state[rows]
        picked = [adapters[r] for r in rows]
        with route(model, picked) if any(picked) else nullcontext():
            return model.get_output_embeddings()(hidden)[:, -1].float()

    def _free_slots(self) -> None:
        for i, seq in enumerate(self._slots):
            if seq is not None and (seq.done or self._drop_if_over(seq)):
                self._slots[i] = None
                if seq in self._prefilling:
                    self._prefilling.remove(seq)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _drop_if_over(self, seq: Sequence) -> bool:
        if seq.cancelled:
            self._finish(seq, "cancelled")
        elif seq.deadline is not None and time.monotonic() > seq.deadline:
            self._finish(seq, "error", ("timeout", "the request timed out before it finished"))
        return seq.done

    def _fail(self, seq: Sequence, err: Exception) -> None:
        if not seq.done:
            seq.exception = err
            self._finish(seq, "error", ("failed", f"generation failed: {type(err).__name__}"))

    def _group(self, adapter: str | None) -> tuple[str | None, int]:
        """(group key, lead): a prompt/prefix adapter's name and its virtual tokens, else
        (None, 0), the shared group."""
        if adapter is None:
            return None, 0
        config = adapter_state(self.model).configs[adapter]
        method = method_of(config)
        if method.virtual_tokens:
            return adapter, method.cache_tokens(config)
        return None, 0

    def _forward(self, key, adapters, ids, mask, positions, cache, keep=1) -> torch.Tensor:
        """The logits of the last position ((rows, vocab)), or with `keep` a tensor of
        positions, of those ((rows, len(keep), vocab))."""
        set_active(self.model, [key] if key is not None else [])
        routing = route(self.model, adapters) if key is None and any(adapters) else nullcontext()
        with routing:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_arg: cache},
            )
        if isinstance(keep, torch.Tensor):
            return out.logits.float()
        return out.logits[:, -1].float()

    def _prefill(self, seq: Sequence) -> None:
        """A prompt/prefix adapter's sequence (or any, without the slot cache): prefilled
        alone, its DynamicCache joins its group's left-padded batch."""
        key, lead = self._group(seq.adapter)
        n = len(seq.prompt)
        ids = torch.tensor([seq.prompt], device=self.device)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        cache = DynamicCache()
        logits = self._forward(key, [seq.adapter], ids, mask, positions, cache)
        self.stats.prompt_tokens += n
        self._accept(seq, self._sample(seq, logits[0]))
        if seq.done:
            return
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(key, lead)
        self._join(batch, seq, cache, mask)

    def _decode(self, batch) -> None:
        if batch is SLOTS:
            self._packed_step() if self.packed else self._decode_slots()
            return
        rows = batch.rows  # never empty, none done: _compact runs after every step
        ids = torch.tensor([[s.last] for s in rows], device=self.device)
        positions = torch.tensor([[s.position] for s in rows], device=self.device)
        ones = torch.ones((len(rows), 1), dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        logits = self._forward(
            batch.virtual, [s.adapter for s in rows], ids, mask, positions, batch.cache
        )
        batch.mask = mask
        self.stats.steps += 1
        self.stats.step_rows += len(rows)
        for seq, row in zip(rows, logits, strict=True):
            self._accept(seq, self._sample(seq, row))

    # --- the KV cache ----------------------------------------------------------------------
    def _join(self, batch: _Batch, seq: Sequence, cache: DynamicCache, mask: torch.Tensor):
        if batch.cache is None:
            batch.cache, batch.mask, batch.rows = cache, mask, [seq]
            return
        width = max(batch.mask.shape[1], mask.shape[1])
        old = _layers(batch.cache)
        new = _layers(cache)
        pad_old, pad_new = width - batch.mask.shape[1], width - mask.shape[1]
        merged = [
            tuple(
                torch.cat([_pad(a, batch.lead, pad_old), _pad(b, batch.lead, pad_new)])
                for a, b in zip(old_kv, new_kv, strict=True)
            )
            for old_kv, new_kv in zip(old, new, strict=True)
        ]
        batch.cache = _cache_of(merged)
        batch.mask = torch.cat([_pad_mask(batch.mask, pad_old), _pad_mask(mask, pad_new)])
        batch.rows.append(seq)

    def _compact(self, key: str | None, batch: _Batch) -> None:
        """Remove finished rows, and cache columns no remaining row attends to."""
        for seq in batch.rows:
            self._drop_if_over(seq)
        keep = [i for i, s in enumerate(batch.rows) if not s.done]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            del self._batches[key]
            return
        index = torch.tensor(keep, device=self.device)
        mask = batch.mask.index_select(0, index)
        used = mask.sum(0).nonzero()
        start = int(used[0]) if len(used) else 0
        lead = batch.lead
        layers = [
            tuple(
                torch.cat([t[:, :, :lead], t[:, :, lead + start :]], dim=2).index_select(0, index)
                for t in kv
            )
            for kv in _layers(batch.cache)
        ]
        batch.cache = _cache_of(layers)
        batch.mask = mask[:, start:]
        batch.rows = [batch.rows[i] for i in keep]

    # --- tokens ------------------------------------------------------------------------------
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        p = seq.params
        raw = logits
        if seq.matcher is not None:  # tokens the grammar does not allow get -inf
            from llguidance.torch import apply_token_bitmask_inplace, fill_next_token_bitmask

            fill_next_token_bitmask(seq.matcher, seq.bitmask, 0)
            logits = logits.clone()
            apply_token_bitmask_inplace(logits[None], seq.bitmask.to(logits.device))
        if p.temperature <= 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1).cpu()
            if p.top_p < 1:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered > p.top_p
                ordered[outside] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            log.error("the grammar refused token %d: %s", token, seq.matcher.get_error())
            self._finish(seq, "error", ("failed", "generation failed: the grammar broke"))
        if p.logprobs is not None and token not in self.stops:
            # the model's own distribution (before temperature and the grammar), as vLLM's
            logprobs = torch.log_softmax(raw, dim=-1)
            top = logprobs.topk(p.logprobs)
            others = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            seq.logprobs.append((token, float(logprobs[token]), others))
        return token

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.done:  # failed while sampling
            return
        seq.generated += 1
        self.stats.generated_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            self.stats.ttft.observe(seq.first_token_at - seq.submitted)
        if token in self.stops:
            seq.stop_token = token
            if not self._add_text(seq, seq.detok.flush()):
                self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.last = token
        seq.position += 1
        if self._add_text(seq, seq.detok.add(token)):
            return
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            if not self._add_text(seq, seq.detok.flush()):
                self._finish(seq, "stop")
            return
        if seq.generated >= seq.params.max_tokens or seq.position + 1 >= self.context:
            if not self._add_text(seq, seq.detok.flush()):
                self._finish(seq, "length")
            return
        self._emit(seq, _held_back(seq.text, seq.params.stop))

    def _add_text(self, seq: Sequence, piece: str) -> bool:
        """Append `piece` to the sequence's text and look for a stop string in what it adds
        (one that ends in it): True when one was found (the text cut before it, finished)."""
        if not piece:
            return False
        stops = seq.params.stop
        start = max(0, len(seq.text) - _longest(stops) + 1)
        seq.text += piece
        cut = _first_stop(seq.text, stops, start)
        if cut is None:
            return False
        seq.text = seq.text[:cut]
        self._finish(seq, "stop")
        return True

    def _emit(self, seq: Sequence, upto: int) -> None:
        if len(seq.logprobs) > seq.logprobs_sent:  # before the text they belong to
            self._outbox.append((seq, "logprobs", seq.logprobs[seq.logprobs_sent :]))
            seq.logprobs_sent = len(seq.logprobs)
        if upto > seq.sent:
            piece = seq.text[seq.sent : upto]
            seq.sent = upto
            self._outbox.append((seq, "text", piece))

    def _deliver(self) -> None:
        """Send the events of the step just computed (all of them at once: the HTTP side
        wakes once per request per step, not once per token)."""
        outbox, self._outbox = self._outbox, []
        for seq, kind, value in outbox:
            seq.on_event(kind, value)

    def _finish(self, seq: Sequence, reason: str, error: tuple[str, str] | None = None) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if error is not None:
            self._outbox.append((seq, "error", error))
        elif reason != "cancelled":
            self._emit(seq, len(seq.text))
            self._outbox.append((seq, "done", reason))


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _pad(t: torch.Tensor, lead: int, width: int) -> torch.Tensor:
    """`t` (rows, heads, tokens, dim) with `width` zero tokens inserted after the first `lead`."""
    if width == 0:
        return t
    zeros = t.new_zeros((t.shape[0], t.shape[1], width, t.shape[3]))
    return torch.cat([t[:, :, :lead], zeros, t[:, :, lead:]], dim=2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    if width == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], width)), mask], dim=1)


def _longest(stops: tuple[str, ...]) -> int:
    return max((len(s) for s in stops), default=0)


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent now: not a trailing part that may grow into a stop
    string, nor a trailing replacement character (an incomplete multi-byte character)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end
