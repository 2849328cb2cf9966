"""The `tunesmith` command. Thin: it parses arguments and calls the library by keyword. Verbs:
`config schema`, `config check`, `preprocess`, `train`, `plot`, `eval`, `plan`
(`run_commands.py`); `generate`, `chat`, `merge`, `combine`, `merge-models`, `quantize`,
`export` (`model_commands.py`); `serve` (`serve_command.py`); `data report`, `report`,
`review`, `bench` (`judge_commands.py`); the app and `main` are in `app.py`."""

# isort: off
# Importing the command modules registers their commands, in this order in `--help`.
from tunesmith.cli import run_commands  # noqa: F401
from tunesmith.cli import model_commands  # noqa: F401
from tunesmith.cli import serve_command  # noqa: F401
from tunesmith.cli import judge_commands  # noqa: F401
from tunesmith.cli.app import app, main

# isort: on

__all__ = ["app", "main"]
