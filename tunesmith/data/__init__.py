"""The data pipeline: sources → formats → chat templates and masking → tokens (cached) →
validation split, mixing, packing → batches."""

from tunesmith.data.encode import IGNORE_INDEX, EncodeSettings, SampleSet, encode_examples
from tunesmith.data.formats import Completion, Conversation, FormatSpec, Tokens, parse_record
from tunesmith.data.pack import collate, collate_packed, pack_groups, packing_efficiency
from tunesmith.data.prepare import PreparedData, SourceStats, prepare_data
from tunesmith.data.preview import show_sample, summary_lines
from tunesmith.data.sources import DataError, Record, read_records
from tunesmith.data.templates import BUILTIN_TEMPLATES, render_segments, resolve_chat_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "Completion",
    "Conversation",
    "DataError",
    "EncodeSettings",
    "FormatSpec",
    "PreparedData",
    "Record",
    "SampleSet",
    "SourceStats",
    "Tokens",
    "collate",
    "collate_packed",
    "encode_examples",
    "pack_groups",
    "packing_efficiency",
    "parse_record",
    "prepare_data",
    "read_records",
    "render_segments",
    "resolve_chat_template",
    "show_sample",
    "summary_lines",
]
