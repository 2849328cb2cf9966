"""Incremental detokenisation: the pieces joined equal one whole decode, on the bundled
byte-level BPE and on a SentencePiece-style tokenizer (leading-space marker, byte fallback,
the first space stripped), for real text with multi-byte characters and for random ids."""

from __future__ import annotations

import json
import random

import pytest
from helpers.data import chat_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from tunesmith.serve.detok import Detokenizer

TEXTS = [
    "Hello, world. It isn't late; is it ?",
    "naïve café — 東京 and 🦙🦙 llamas",
    "  two leading spaces\nand a newline\n\n",
    "def f(x):\n    return x * 2  # done",
]


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer trained here: ▁ for spaces, byte tokens <0x..> (ordinary
    vocabulary, as in Llama's) for what the merges lack, and a decoder that drops the first
    leading space."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    corpus = TEXTS[:1] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    trained.train_from_iterator(corpus, trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request):
    return chat_tokenizer() if request.param == "byte-level" else _sentencepiece_style()


def _pieces(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return pieces, detok.text


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, joined = _pieces(tokenizer, ids)
    assert joined == tokenizer.decode(ids, skip_special_tokens=True)
    # no piece ends inside a character: none holds a replacement character
    assert all("\ufffd" not in p for p in pieces)


def test_random_ids_and_special_tokens(tokenizer):
    # not the byte tokens of the SentencePiece style: a run of them that is not UTF-8 turns
    # into one replacement character per byte, its valid bytes too, so a byte sent before the
    # run went wrong reads differently from a whole decode (vLLM's detokenizer does the same)
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    allowed = [i for i, name in enumerate(names) if not name.startswith("<0x")]
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.choice(allowed) for _ in range(rng.randrange(1, 40))]
        assert _pieces(tokenizer, ids)[1] == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_partial_character_waits_for_its_last_byte():
    tokenizer = _sentencepiece_style()
    ids = tokenizer("🦙", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4  # four byte tokens (and maybe the space marker)
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert pieces[-1].endswith("🦙") and "".join(pieces[:-1]).strip() == ""
    # cut short, the held-back bytes come out at the end as one replacement character
    detok = Detokenizer(tokenizer)
    sent = "".join(detok.add(t) for t in ids[:-1])
    tail = detok.flush()
    assert "\ufffd" not in sent and tail.endswith("\ufffd")
    assert sent + tail == tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_work_per_token_does_not_grow_with_the_length():
    class Counting:
        def __init__(self, inner):
            self.inner, self.decoded = inner, 0

        def decode(self, ids, **kw):
            self.decoded += len(ids)
            return self.inner.decode(ids, **kw)

    tokenizer = Counting(chat_tokenizer())
    ids = chat_tokenizer()(" ".join(["word"] * 400), add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    for t in ids:
        detok.add(t)
    assert len(ids) >= 400
    assert tokenizer.decoded <= 4 * len(ids)  # a whole decode per step would be ~n²/2
