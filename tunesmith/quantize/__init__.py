"""Post-training weight quantization: round-to-nearest (the baseline), GPTQ and AWQ on a
shared group-wise integer grid (`rtn.py`, `gptq.py`, `awq.py`), run layer by layer through a
model (`calibrate.py`), written in GPTQ's checkpoint format (`pack.py`, `checkpoint.py`) and
loaded back by `GPTQLinear` (`layers.py`); `run.py` is `tunesmith quantize`, bitsandbytes
int8/NF4 included."""

from tunesmith.quantize.awq import AWQScales, awq_search
from tunesmith.quantize.gptq import HessianAccumulator, gptq_quantize
from tunesmith.quantize.rtn import QuantGrid, rtn_quantize
from tunesmith.quantized.gptq.weights import QuantizedWeight

__all__ = [
    "AWQScales",
    "awq_search",
    "HessianAccumulator",
    "QuantGrid",
    "QuantizedWeight",
    "gptq_quantize",
    "rtn_quantize",
]
