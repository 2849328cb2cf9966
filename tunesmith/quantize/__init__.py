"""Post-training weight quantization: round-to-nearest (the baseline) and GPTQ, on a shared
group-wise integer grid, and AWQ's activation-aware scale search. (Folding AWQ scales into
a model, the `tunesmith quantize` command and its checkpoint format are
still to come: see the README's Status.)"""

from tunesmith.quantize.awq import AWQScales, awq_search
from tunesmith.quantize.gptq import HessianAccumulator, gptq_quantize
from tunesmith.quantize.rtn import QuantGrid, QuantizedWeight, rtn_quantize

__all__ = [
    "AWQScales",
    "awq_search",
    "HessianAccumulator",
    "QuantGrid",
    "QuantizedWeight",
    "gptq_quantize",
    "rtn_quantize",
]
