"""The tokenizer in a GGUF file: vocabulary, merges, token types, special tokens and chat
template of a byte-level BPE tokenizer, and the llama.cpp pre-tokenizer its split pattern
names."""

from __future__ import annotations

import json

import gguf

from tunesmith.data.encode import bos_prefix
from tunesmith.errors import TunesmithError

PRE_TOKENIZERS = {  # split regex of a byte-level BPE tokenizer → llama.cpp's pre-tokenizer name
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
GPT2_REGEX = next(iter(PRE_TOKENIZERS))


def _pre_tokenizer(data: dict) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, a note when it had to guess)."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex], None
            return "default", (
                "note: the tokenizer's split pattern is not one llama.cpp names; it will use its "
                "default pre-tokenizer, so tokenization of some text may differ"
            )
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return PRE_TOKENIZERS[GPT2_REGEX], None
    return "default", None


def add_tokenizer(writer, tokenizer, n_vocab: int) -> list[str]:
    """Vocabulary, merges, special tokens and chat template; returns notes."""

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunesmithError(
            "--model: GGUF export needs a fast tokenizer (tokenizer.json); this one has none"
        )
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise TunesmithError(
            f"--model: the tokenizer is {model.get('type')}; the GGUF export supports BPE "
            "tokenizers (GPT-2-style byte-level and SentencePiece-style byte-fallback)"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise TunesmithError(
            f"--model: the tokenizer has token id {max(vocab.values())} but the model's "
            f"vocab_size is {n_vocab}"
        )
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    scores = [0.0] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        scores[i] = -float(i)
        if text in added:
            types[i] = (
                gguf.TokenType.CONTROL if added[text]["special"] else (gguf.TokenType.USER_DEFINED)
            )
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    notes = []
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    else:
        writer.add_tokenizer_model("gpt2")
        pre, note = _pre_tokenizer(data)
        writer.add_tokenizer_pre(pre)
        notes += [note] if note else []
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_token_scores(scores)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(bos_prefix(tokenizer)))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return notes


# --- writing --------------------------------------------------------------------------------
