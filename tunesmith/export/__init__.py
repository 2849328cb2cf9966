"""Export for deployment: GGUF for llama.cpp (`gguf.py`)."""
