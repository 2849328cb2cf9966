"""Errors a user can act on. The message names what is wrong, where, and what to do."""


class TunesmithError(ValueError):
    """Base class for tunesmith's user-facing errors (the CLI prints the message, no traceback)."""


class AdapterError(TunesmithError):
    """A problem with an adapter: its config, its files, or the model it is applied to."""
