"""Incremental detokenisation: the text of a growing list of token ids, one token at a time, in
constant work per token (decoding the whole list at every step is quadratic in its length).

Each step decodes a short window twice: from `prefix` (the token before the last piece sent)
up to `read` (what has been sent), and from `prefix` to the end; the new text is what the
second has beyond the first. Starting both at the same earlier token keeps what depends on the
neighbour the same as in a whole decode: SentencePiece's dropped leading space of the first
token, byte-level merges, the clean-up of " ." and " n't". A window that ends inside a
multi-byte character (the replacement character U+FFFD at its end) waits for the next token;
`flush` sends what is left when the sequence ends. The pieces joined equal
`tokenizer.decode(ids, skip_special_tokens=True)` (the tests hold it to that on a byte-level BPE
and a SentencePiece-style tokenizer, real text and random ids). One exception, shared with
vLLM's detokenizer: SentencePiece byte tokens that do not form UTF-8 become one replacement
character per byte, valid ones included, so a byte sent before its run went wrong reads as
itself here and as U+FFFD in a whole decode.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append `token`; returns the text it completes ("" while a character is partial)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """What is held back at the end (a partial character, as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        piece = self._decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        self.text += piece
        return piece
