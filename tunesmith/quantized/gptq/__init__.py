"""Quantized checkpoints in GPTQ's format, what `tunesmith quantize` writes and model loading
reads: the weights (`weights.py`), packing into int32 words (`packing.py`), the `GPTQLinear`
layer that computes from them (`layer.py`), and reading and writing checkpoints (`files.py`).
Nothing here quantizes: the algorithms are in `tunesmith.quantize`."""
