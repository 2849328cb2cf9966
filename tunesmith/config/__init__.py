"""The run config: `schema.py` (the sections; `method:` is the chosen method's own config
class), `load.py` (YAML, overrides, validation), `messages.py` (one line per problem, with
file, line and YAML path) and `docs.py` (`tunesmith config schema`, the resolved YAML)."""

from tunesmith.config.docs import config_yaml, schema_text
from tunesmith.config.load import apply_override, config_from_dict, load_config
from tunesmith.config.messages import FOREIGN_KEYS, ConfigError
from tunesmith.config.schema import (
    BUILTIN_TEMPLATE_NAMES,
    FIELD_ROLES,
    DataSection,
    DatasetSource,
    EvalSection,
    ModelSection,
    RunConfig,
    Section,
    TrainSection,
    method_section,
)

__all__ = [
    "BUILTIN_TEMPLATE_NAMES",
    "FIELD_ROLES",
    "FOREIGN_KEYS",
    "ConfigError",
    "DataSection",
    "DatasetSource",
    "EvalSection",
    "ModelSection",
    "RunConfig",
    "Section",
    "TrainSection",
    "apply_override",
    "config_from_dict",
    "config_yaml",
    "load_config",
    "method_section",
    "schema_text",
]
