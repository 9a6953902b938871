"""One typed configuration object, built and validated once, then passed down read-only.

Precedence, lowest first: built-in defaults < ``-c/--config`` files (in the order given) <
command-line flags. Config files may be scNym's ``key: value`` lines (``#`` comments), YAML
or JSON. Every value is parsed and range-checked before any work starts; unknown keys are an
error that suggests the closest valid key.

The keys are declared in config/keys.py, built and checked in config/build.py.
"""

from .build import (PRESETS, Config, ConfigLayer, build_config, load_config, parse_bool, read_config_file,
                    render_key_value, render_markdown_table, suggest_key)
from .keys import (ALL_COMMANDS, COLLECT_COMMANDS, CONFIG_KEYS, MARKER_COMMANDS, PREDICT_COMMANDS, SECTIONS,
                   TRAIN_COMMANDS, describe, keys_for)

__all__ = ["ALL_COMMANDS", "COLLECT_COMMANDS", "CONFIG_KEYS", "MARKER_COMMANDS", "PREDICT_COMMANDS", "PRESETS",
           "SECTIONS", "TRAIN_COMMANDS", "Config", "ConfigLayer", "build_config", "describe", "keys_for",
           "load_config", "parse_bool", "read_config_file", "render_key_value", "render_markdown_table",
           "suggest_key"]
