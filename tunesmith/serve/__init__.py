"""`tunesmith serve`: an OpenAI-compatible server for a base model and many adapters, with
continuous batching (`engine.py`), the HTTP API (`app.py`) and Prometheus metrics
(`metrics.py`). Starlette and uvicorn come with the `serve` extra."""
