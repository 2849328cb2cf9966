"""How a generated answer is compared with a reference: `normalize` (lower case, whitespace
collapsed, surrounding punctuation removed), shared by evaluation's exact match and GRPO's
exact-match reward, so a reward of 1 means what the evaluation table counts."""

from __future__ import annotations

import string


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation removed."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")
