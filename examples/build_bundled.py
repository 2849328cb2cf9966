"""Rebuild the bundled quickstart assets (run from the repository root):

    python examples/build_bundled.py

- examples/data/quickstart_{train,val}.jsonl: a small synthetic chat task (reverse, sort,
  count, repeat words) that a tiny model learns on a CPU in minutes.
- examples/tiny-llama/: a randomly initialised 2-layer Llama-shape model (~0.3 M parameters)
  with a byte-level BPE tokenizer trained on that data and the ChatML chat template.

Everything is seeded, so the files only change when this script does."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORDS = (
    "apple river stone cloud tiger paper lemon candle forest silver window garden rocket "
    "violet ocean pepper castle mirror planet thunder honey marble button sunset pencil "
    "falcon meadow copper winter basket"
).split()
SYSTEM = "You are a careful assistant. Answer with the result only."


def make_example(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 5))
    kind = rng.choice(["reverse", "sort", "count", "first", "last"])
    if kind == "reverse":
        question, answer = f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    elif kind == "sort":
        question, answer = f"Sort the words: {' '.join(words)}", " ".join(sorted(words))
    elif kind == "count":
        question, answer = f"How many words: {' '.join(words)}", str(len(words))
    elif kind == "first":
        question, answer = f"First word: {' '.join(words)}", words[0]
    else:
        question, answer = f"Last word: {' '.join(words)}", words[-1]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def write_data() -> list[str]:
    rng = random.Random(0)
    texts = []
    for name, count in (("quickstart_train.jsonl", 600), ("quickstart_val.jsonl", 60)):
        rows = [make_example(rng) for _ in range(count)]
        with (ROOT / "data" / name).open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        texts += [m["content"] for row in rows for m in row["messages"]]
    return texts


def write_tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunesmith.data.templates import BUILTIN_TEMPLATES

    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    roles = ["system", "user", "assistant", "\n"]
    core.train_from_iterator(texts + roles * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    tokenizer.save_pretrained(ROOT / "tiny-llama")


def write_model() -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]),
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(ROOT / "tiny-llama")


if __name__ == "__main__":
    write_tokenizer(write_data())
    write_model()
    print("wrote examples/data/ and examples/tiny-llama/")
