"""tunesmith: fine-tune large language models on the hardware you have."""

__version__ = "0.1.0"

from tunesmith import adapters  # noqa: E402
from tunesmith.adapters import *  # noqa: E402, F403
from tunesmith.errors import AdapterError, TunesmithError  # noqa: E402

__all__ = ["AdapterError", "TunesmithError", "__version__", *adapters.__all__]
