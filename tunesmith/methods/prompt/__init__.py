"""Prompt tuning (method `prompt`: trainable virtual-token embeddings in front of every input)
and prefix tuning (method `prefix`: trainable key/value prefixes in every attention layer).

This module is the schema (importable without torch); `layer.py` holds the virtual-token
modules and hooks, `impl.py` attaches them and reads and writes PEFT's format."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tunesmith.errors import AdapterError
from tunesmith.methods.schema import field_name, method_config
from tunesmith.registry import Method, register_method

Count = Annotated[int, Field(gt=0, strict=True)]
Init = Literal["vocab", "random", "text"]


def _check_text(init: str, init_text: str | None, what: str) -> None:
    if init == "text" and not init_text:
        raise AdapterError(f'init "text" needs init_text (the text whose {what} start it)')


@method_config
class PromptTuningConfig:
    """Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to the input."""

    name: Literal["prompt"] = field_name("prompt")
    num_virtual_tokens: Count = 20
    """How many virtual tokens (PEFT: `num_virtual_tokens`)."""
    init: Init = "vocab"
    """"vocab": embeddings of random vocabulary tokens (Lester et al.'s recommendation);
    "random": normal with the embedding matrix's standard deviation; "text": the embeddings of
    init_text's tokens, repeated or cut to the count (PEFT: `prompt_tuning_init`)."""
    init_text: str | None = None
    """The text for init "text", e.g. "Answer the question about the word list:"."""

    def __post_init__(self) -> None:
        _check_text(self.init, self.init_text, "embeddings")


@method_config
class PrefixTuningConfig:
    """Prefix tuning: `num_virtual_tokens` trainable key/value pairs in every attention layer."""

    name: Literal["prefix"] = field_name("prefix")
    num_virtual_tokens: Count = 20
    """Prefix length in virtual tokens (PEFT: `num_virtual_tokens`)."""
    projection: bool = False
    """Train the prefix through an MLP (embedding → Linear → tanh → Linear); the MLP's output
    is what gets saved, as PEFT does (PEFT: `prefix_projection`)."""
    encoder_hidden_size: Count | None = None
    """Hidden size of that MLP (default: the model's hidden size)."""
    init: Init = "vocab"
    """"vocab": the keys and values the model computes for random vocabulary tokens (real
    activations, which Li & Liang found train best); "text": those of init_text's tokens, so
    the fresh adapter behaves exactly as if that text were prepended; "random": standard normal,
    PEFT's default. With projection, only "random"."""
    init_text: str | None = None
    """The text for init "text"."""

    def __post_init__(self) -> None:
        _check_text(self.init, self.init_text, "keys/values")
        if self.projection and self.init != "random":
            raise AdapterError(
                f"init {self.init!r} sets the prefix itself, which projection=true computes from "
                'an MLP; use init "random" with projection, or projection=false'
            )


PROMPT = register_method(
    Method(
        name="prompt",
        config=PromptTuningConfig,
        summary="Prompt tuning: trainable virtual-token embeddings prepended to every input.",
        default_lr=3e-2,
        implementation="tunesmith.methods.prompt.impl",
        peft_types=("PROMPT_TUNING",),
        merge_refusal="it adds virtual input tokens, not weights",
        virtual_tokens=True,
        sequence_tokens=lambda config: config.num_virtual_tokens,
        cache_tokens=lambda config: config.num_virtual_tokens,
    )
)
PREFIX = register_method(
    Method(
        name="prefix",
        config=PrefixTuningConfig,
        summary="Prefix tuning: trainable key/value prefixes in every attention layer.",
        default_lr=1e-2,
        implementation="tunesmith.methods.prompt.impl",
        peft_types=("PREFIX_TUNING",),
        merge_refusal="it adds key/value prefixes, not weights",
        virtual_tokens=True,
        cache_tokens=lambda config: config.num_virtual_tokens,
    )
)
