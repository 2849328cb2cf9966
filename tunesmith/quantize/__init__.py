"""Post-training weight quantization: round-to-nearest (the baseline) and GPTQ, on a shared
group-wise integer grid. (AWQ, the `tunesmith quantize` command and its checkpoint format are
still to come: see the README's Status.)"""

from tunesmith.quantize.gptq import HessianAccumulator, gptq_quantize
from tunesmith.quantize.rtn import QuantGrid, QuantizedWeight, rtn_quantize

__all__ = ["HessianAccumulator", "QuantGrid", "QuantizedWeight", "gptq_quantize", "rtn_quantize"]
