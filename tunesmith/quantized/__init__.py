"""Quantized weights as they are stored and run: bitsandbytes bases for QLoRA, quantized while
loading (`bnb.py`: NF4, FP4, int8), and group-quantized checkpoint layouts (`gptq/`: GPTQ's
format and compressed-tensors' pack-quantized one, with the layer that runs them).
`tunesmith.quantize` makes such checkpoints; this package reads, writes and runs them."""
