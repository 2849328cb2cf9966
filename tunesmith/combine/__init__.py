"""Combine: merge adapters into a checkpoint (`merge_checkpoint`), combine adapters into one
(`combine_adapters`) and merge whole fine-tuned models (`merge_models`)."""

from tunesmith.combine.adapter_arithmetic import COMBINE_METHODS, combine_adapters
from tunesmith.combine.merge import MergeReport, compare_logits, merge_checkpoint
from tunesmith.combine.model_merging import MODEL_MERGE_METHODS, merge_models

__all__ = [
    "COMBINE_METHODS",
    "MODEL_MERGE_METHODS",
    "MergeReport",
    "combine_adapters",
    "compare_logits",
    "merge_checkpoint",
    "merge_models",
]
