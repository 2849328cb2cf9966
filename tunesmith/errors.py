"""Errors a user can act on. The message names what is wrong, where, and what to do."""


class TunesmithError(ValueError):
    """Base class for tunesmith's user-facing errors (the CLI prints the message, no traceback)."""


def first_line(err: BaseException) -> str:
    """An exception from another library as one line: its first line without a final period,
    or its type name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


class AdapterError(TunesmithError):
    """A problem with an adapter: its config, its files, or the model it is applied to."""


class TrainingError(TunesmithError):
    """The run cannot continue (non-finite loss, inconsistent resume)."""


class TrainingInterrupted(TunesmithError):
    """The user stopped the run (Ctrl-C); the message names the checkpoint to resume from."""


class ProcessesFailed(TunesmithError):
    """A relaunch under torchrun ended with a non-zero exit; its processes said why."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode
