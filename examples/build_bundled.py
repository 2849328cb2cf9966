"""Rebuild the bundled quickstart assets (run from the repository root):

    python examples/build_bundled.py [--steps 1000] [--skip-pretrain]

- examples/data/quickstart_{train,val}.jsonl: a small synthetic chat task (questions about a
  list of words: how many, all from nature or not, how many made by people) that the base
  model cannot do and learns with LoRA on a CPU in minutes.
- examples/tiny-llama/: a 3.4 M-parameter Llama (4 layers, hidden 256, vocab 4096) with a
  byte-level BPE tokenizer and the ChatML chat template, pre-trained from scratch on Python's own
  documentation: the reference manual topics in `pydoc_data.topics` and the docstrings of the
  standard library (both under the PSF License 2.0, shipped with every CPython). Nothing is
  downloaded. The held-out perplexity goes to examples/tiny-llama/pretraining.json.

Everything is seeded; with the same Python (3.11) and torch the files come out the same.
Pre-training takes ~25 minutes on a 2-core CPU (the default --steps)."""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "tiny-llama"
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "apple river stone cloud tiger paper lemon candle forest silver window garden rocket "
    "violet ocean pepper castle mirror planet thunder honey marble button sunset pencil "
    "falcon meadow copper winter basket bridge engine lantern orchard parrot quartz saddle "
    "timber valley wagon yellow anchor blanket cactus dragon feather glacier harbor island "
    "jacket kettle ladder magnet needle olive pillow rabbit shadow tunnel umbrella velvet"
).split()
SYSTEM = "You are a careful assistant. Answer with the result only."


# --- the instruction task -------------------------------------------------------------------


NATURE = set(
    "apple river stone cloud tiger lemon forest ocean pepper planet thunder honey sunset falcon "
    "meadow winter parrot quartz valley cactus feather glacier island olive rabbit shadow".split()
)
MADE = set(
    "paper candle window rocket castle mirror button pencil basket bridge engine lantern saddle "
    "wagon anchor blanket jacket kettle ladder magnet needle pillow tunnel umbrella velvet".split()
)


def make_example(rng: random.Random) -> dict:
    """Questions about a list of 3-6 words: how many there are, whether all are from nature,
    how many are made by people. No answer copies a word from the question (the bundled model
    is too small to have learned copying), so the task needs the words' meaning and counting."""
    kind = rng.choice(["count", "nature", "made"])
    n = rng.randint(3, 6)
    if kind == "nature" and rng.random() < 0.5:
        words = rng.sample(sorted(NATURE), n)
    else:
        made = rng.randint(0 if kind == "made" else 1, n)
        words = rng.sample(sorted(MADE), made) + rng.sample(sorted(NATURE), n - made)
        rng.shuffle(words)
    listed = " ".join(words)
    made_count = sum(w in MADE for w in words)
    if kind == "count":
        question, answer = f"How many words: {listed}", f"There are {n} words."
    elif kind == "nature":
        question = f"Are these all from nature: {listed}"
        answer = "No, not all of them." if made_count else "Yes, all of them."
    else:
        question, answer = f"How many are made by people: {listed}", f"{made_count} of them."
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def write_data() -> None:
    rng = random.Random(0)
    for name, count in (("quickstart_train.jsonl", 1200), ("quickstart_val.jsonl", 100)):
        rows = [make_example(rng) for _ in range(count)]
        with (ROOT / "data" / name).open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# --- the pre-training corpus ----------------------------------------------------------------


def python_docs() -> list[str]:
    """Python's reference topics and the standard library's docstrings, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    files = sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py"))
    for path in files:
        if path.name.startswith("test") or "test" in path.parent.name:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    return [doc.strip() for doc in docs]


def split_docs(docs: list[str]) -> tuple[list[str], list[str]]:
    rng = random.Random(1)
    order = list(range(len(docs)))
    rng.shuffle(order)
    held = set(order[: len(docs) // 30])
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [docs[i] for i in sorted(held)]


# --- tokenizer and model --------------------------------------------------------------------


def write_tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunesmith.data.templates import BUILTIN_TEMPLATES

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    tokenizer.save_pretrained(MODEL_DIR)


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]),
        bos_token_id=None,
    )


def token_stream(tokenizer, docs: list[str]):
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += encoded + [eos]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(steps: int, train_docs: list[str], held_docs: list[str]) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = LlamaForCausalLM(model_config(tokenizer))
    train_ids, held_ids = token_stream(tokenizer, train_docs), token_stream(tokenizer, held_docs)
    seq, batch, peak_lr, warmup = 256, 16, 3e-3, 100
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([train_ids[s : s + seq] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed:6.0f}s", flush=True)
    elapsed = time.perf_counter() - started

    model.eval()
    with torch.no_grad():
        windows = held_ids[: len(held_ids) // seq * seq].view(-1, seq)
        total = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows)
    held_ppl = math.exp(total / len(windows))
    model.save_pretrained(MODEL_DIR)
    report = {
        "corpus": "Python 3.11 documentation: pydoc_data.topics + standard-library docstrings "
        "(PSF License 2.0)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_available": len(train_ids),
        "tokens_seen": steps * batch * seq,
        "steps": steps,
        "seq_len": seq,
        "batch": batch,
        "held_out_tokens": int(windows.numel()),
        "held_out_perplexity": round(held_ppl, 2),
        "unigram_perplexity_of_held_out": round(unigram_ppl(train_ids, windows, len(tokenizer)), 1),
        "seconds": round(elapsed),
    }
    (MODEL_DIR / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def unigram_ppl(train_ids, held, vocab: int) -> float:
    """A reference point: the perplexity of add-one unigram counts from the training tokens."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held.flatten()].mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="pre-training steps")
    parser.add_argument("--skip-pretrain", action="store_true", help="only rewrite the data")
    args = parser.parse_args()
    write_data()
    if args.skip_pretrain:
        print("wrote examples/data/")
        return
    docs = python_docs()
    train_docs, held_docs = split_docs(docs)
    # The task's words are in the tokenizer's training text (each becomes one token), its
    # phrasing is not: the tokenizer does not change when the task does.
    write_tokenizer(train_docs + [" ".join(WORDS)] * 20)
    pretrain(args.steps, train_docs, held_docs)
    print("wrote examples/data/ and examples/tiny-llama/")


if __name__ == "__main__":
    main()
