"""Building a Config: reading files (``key: value`` lines, YAML, JSON), parsing and checking every value,
presets, merging the layers (defaults < files < flags), the checks across keys and per command, and writing a
config back out (default_config.txt, the README's table)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence, Union

import yaml

from ..errors import ScnymError
from .keys import (_FIELDS, _HINTS, ALL_COMMANDS, CONFIG_KEYS, COLLECT_COMMANDS, PREDICT_COMMANDS, SECTIONS,
                   TRAIN_COMMANDS, ConfigKeys, _type_name, _unwrap_optional, describe, keys_for)

@dataclass(frozen=True)
class Config(ConfigKeys):
    """The effective configuration of a run: every key (config/keys.py), built and validated once
    (:func:`build_config`), then passed down read-only."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some values changed (the original is never mutated)."""
        return build_config([ConfigLayer("code", changes)], base=self)

    def path(self, key: str) -> Path:
        """A path the command cannot run without (``out_path``, ``model_path``...), as a Path.

        Commands check their required paths when the config is built; this names the key if code reached
        one that was never given."""
        value = getattr(self, key)
        if value is None:
            raise ScnymError(f"--{key} is required here: give it on the command line or in a config file")
        return Path(value)


# ---------------------------------------------------------------------- reading files
@dataclass(frozen=True)
class ConfigLayer:
    """Values from one source (a file, the command line, code), with the source's name for errors."""

    source: str
    values: Mapping[str, Any]


def read_config_file(path: Union[str, Path]) -> ConfigLayer:
    """Read ``key: value`` lines, YAML or JSON, chosen by extension or, failing that, by content."""
    path = Path(path)
    if not path.is_file():
        raise ScnymError(f"config file {path} does not exist; check the path given to -c/--config")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ScnymError(f"config file {path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as "
                         "UTF-8 (a character pasted from another program, even in a comment, can do this)") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
            values = json.loads(text or "{}", object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        elif suffix in (".yaml", ".yml"):
            values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        else:
            values = _parse_key_value_lines(text, path)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ScnymError(f"config file {path} could not be parsed ({_where(e)}); fix its syntax") from None
    if not isinstance(values, dict):
        raise ScnymError(f"config file {path} must hold key: value pairs, not a {type(values).__name__}")
    for key, value in values.items():
        if isinstance(value, (dict, list)):
            raise ScnymError(f"config key {key!r} in {path} must be a single value, not a {type(value).__name__}")
    return ConfigLayer(str(path), values)


def _parse_key_value_lines(text: str, path: Path) -> dict[str, Any]:
    """scNym's default_config.txt format: ``key: value`` (or ``key = value``), ``#`` comments."""
    values: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_\-]*)\s*[:=]\s*(.*)$", line)
        if not match:
            raise ScnymError(f"config file {path} line {number} is not 'key: value': {raw.strip()!r}")
        key, value = match.group(1).replace("-", "_"), match.group(2).strip().strip("'\"")
        if key in values:
            raise ScnymError(f"config file {path} line {number} sets {key!r} a second time; keep one of them")
        values[key] = value
    return values


def _unique_keys(pairs: list, path: Path) -> dict:
    """A JSON object whose keys are unique (json keeps the last of a repeated key without a word)."""
    values: dict = {}
    for key, value in pairs:
        if key in values:
            raise ScnymError(f"config file {path} sets {key!r} more than once; keep one of them")
        values[key] = value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given more than once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _where(error: Exception) -> str:
    """A parser's complaint with its line (and column): JSON says them, YAML's marks hold them."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno} column {error.colno}: {error.msg}"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1} column {mark.column + 1}: {problem}" if mark is not None else problem


# ---------------------------------------------------------------------- parsing values
_TRUE = {"true", "yes", "1", "on", "y", "t"}
_FALSE = {"false", "no", "0", "off", "n", "f"}
_NONE = {"", "none", "null", "~"}


def parse_bool(value: Any) -> bool:
    """Booleans as users mean them: ``False``, ``false``, ``0``, ``no`` are false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_value(key: str, value: Any) -> Any:
    base, optional = _unwrap_optional(_HINTS[key])
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        if base is str and value == "":
            return ""
        raise ValueError(f"a value is required ({_type_name(_HINTS[key])})")
    if base is bool:
        if optional and isinstance(value, str) and value.strip().lower() == "auto":
            return None   # an optional switch: None = decided by the run (balance_classes)
        return parse_bool(value)
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            try:
                as_float = float(str(value).strip())
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ValueError(f"expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if base is Path:
        return Path(str(value).strip()).expanduser()
    return str(value).strip()


def _check_rules(key: str, value: Any) -> None:
    rules = _FIELDS[key].metadata
    if value is None:
        return
    if rules["choices"] and value not in rules["choices"]:
        suggestion = difflib.get_close_matches(str(value), rules["choices"], n=1)
        hint = f" (did you mean {suggestion[0]!r}?)" if suggestion else ""
        raise ValueError(f"must be one of {', '.join(rules['choices'])}; got {value!r}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = rules["min"], rules["max"]
        if low is not None and (value < low or (rules["min_exclusive"] and value == low)):
            raise ValueError(f"must be {'>' if rules['min_exclusive'] else '>='} {low}; got {value}")
        if high is not None and (value > high or (rules["max_exclusive"] and value == high)):
            raise ValueError(f"must be {'<' if rules['max_exclusive'] else '<='} {high}; got {value}")
    if key == "gene_species":
        from ..data.orthologs import parse_species_pair

        parse_species_pair(value)
    if key == "device" and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps; got {value!r}")


def suggest_key(key: str) -> str:
    """' (did you mean X?)' for a misspelt key, or ''."""
    match = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---------------------------------------------------------------------- presets
# The named configurations of scNym's 2021 API, as changes to the built-in defaults ("default" is
# the defaults themselves; configs/scnym_2021.txt brings back the 2021 training settings). Read-only:
# no run can change them.
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "default": MappingProxyType({}),
    "no_new_identity": MappingProxyType({"pseudolabel_min_confidence": 0.0, "dan_use_conf_pseudolabels": False}),
    "new_identity_discovery": MappingProxyType({"pseudolabel_min_confidence": 0.9,
                                                "dan_use_conf_pseudolabels": True}),
    "no_dan": MappingProxyType({"dan_max_weight": 0.0}),
    "no_ssl": MappingProxyType({"unsup_max_weight": 0.0, "dan_max_weight": 0.0}),
})


def _with_preset(layers: Sequence[ConfigLayer]) -> list[ConfigLayer]:
    """Put the chosen preset's values below every other layer."""
    chosen = None
    for layer in layers:
        for key, value in layer.values.items():
            if str(key).replace("-", "_") == "preset" and value not in (None, ""):
                chosen = (str(value).strip(), layer.source)
    if chosen is None:
        return list(layers)
    name, source = chosen
    if name not in PRESETS:
        match = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ScnymError(f"config key 'preset' (from {source}): must be one of {', '.join(PRESETS)}; "
                         f"got {name!r}{hint}")
    return [ConfigLayer(f"preset {name!r}", PRESETS[name]), *layers]


# ---------------------------------------------------------------------- building
def build_config(
    layers: Sequence[ConfigLayer],
    command: str | None = None,
    *,
    base: Config | None = None,
) -> Config:
    """Merge layers over the defaults (or ``base``), parse and validate every value.

    Parameters
    ----------
    layers
        Sources in increasing precedence (config files, then command-line flags).
    command
        The subcommand about to run: its required keys and input paths are checked.
    """
    # Keys absent from every layer keep the dataclass defaults (valid by construction).
    merged: dict[str, Any] = base.to_dict() if base else {}
    sources: dict[str, str] = {}
    for layer in _with_preset(layers):
        for raw_key, value in layer.values.items():
            key = str(raw_key).replace("-", "_")
            if key not in _FIELDS:
                raise ScnymError(f"unknown config key {raw_key!r} in {layer.source}{suggest_key(key)}")
            merged[key] = value
            sources[key] = layer.source
    parsed: dict[str, Any] = {}
    for key, value in merged.items():
        where = sources.get(key, "defaults")
        try:
            parsed[key] = _parse_value(key, value)
            _check_rules(key, parsed[key])
        except ValueError as e:
            raise ScnymError(f"config key {key!r} (from {where}): {e}") from None
    config = Config(**parsed)
    _check_combinations(config)
    if command is not None:
        _check_for_command(config, command)
    return config


def _check_combinations(config: Config) -> None:
    if config.n_folds == 1:
        raise ScnymError("config key 'n_folds' must be 0 (no cross-validation) or at least 2; got 1")
    if config.balance_classes and config.weight_classes:
        raise ScnymError("balance_classes and weight_classes both correct class imbalance; turn one of them off")
    if config.fold is not None and config.folds is not None:
        raise ScnymError("give --fold or --folds, not both")
    if config.gene_map is not None and config.gene_species is not None:
        raise ScnymError("give --gene_map or --gene_species, not both (put the species translations you want into "
                         "the map)")
    if config.unlabeled_genes is not None and config.unlabeled_counts is None:
        raise ScnymError("--unlabeled_genes names the genes of --unlabeled_counts, which is not given")
    if config.weighted_sets and config.coverage is None:
        raise ScnymError("--weighted_sets true weights the calibration of prediction sets; give their --coverage "
                         "too (e.g. --coverage 0.9)")
    if config.coverage_per_class and config.coverage is None:
        raise ScnymError("--coverage_per_class true asks for per-class prediction sets; give their --coverage too "
                         "(e.g. --coverage 0.9)")


_REQUIRED = {
    "train": ("input_counts", "out_path"),
    "predict": ("input_counts", "model_path", "out_path"),
    "markers": ("model_path", "out_path"),
    "collect": ("out_path",),
}


def _check_for_command(config: Config, command: str) -> None:
    if command not in ALL_COMMANDS | COLLECT_COMMANDS:
        return
    kind = ("train" if command in TRAIN_COMMANDS else "predict" if command in PREDICT_COMMANDS
            else "collect" if command in COLLECT_COMMANDS else "markers")
    for key in _REQUIRED[kind]:
        if getattr(config, key) is None:
            raise ScnymError(f"{command} needs --{key} (on the command line or in a config file)")
    for key in keys_for(command):
        value = getattr(config, key)
        if _FIELDS[key].metadata["must_exist"] and value is not None and not Path(value).exists():
            raise ScnymError(f"--{key} {value} does not exist; check the path")


def load_config(command: str | None, config_files: Sequence[Union[str, Path]] = (),
                flags: Mapping[str, Any] | None = None) -> Config:
    """Defaults < config files (in order) < flags: the effective, validated config."""
    layers = [read_config_file(p) for p in config_files]
    if flags:
        layers.append(ConfigLayer("the command line", {k: v for k, v in flags.items() if v is not None}))
    return build_config(layers, command)


def _unset_text(key: str) -> str:
    """How an unset key reads: "auto" for an optional switch (decided by the run), else empty (none)."""
    return "auto" if _unwrap_optional(_HINTS[key])[0] is bool else ""


def render_key_value(config: Config, keys: Iterable[str] | None = None, with_help: bool = True) -> str:
    """The config as scNym-style ``key: value`` lines grouped by section (default_config.txt)."""
    wanted = list(keys) if keys is not None else list(CONFIG_KEYS)
    lines = ["# scnym configuration: key: value lines; '#' starts a comment; empty value = none.",
             "# Precedence: built-in defaults < these files (-c, in order) < command-line flags."]
    for section in SECTIONS:
        in_section = [k for k in wanted if _FIELDS[k].metadata["section"] == section]
        if not in_section:
            continue
        lines += ["", f"# ---- {section}"]
        for key in in_section:
            value = getattr(config, key)
            text = _unset_text(key) if value is None else str(value)
            if with_help:
                lines.append(f"# {describe(key)['help']}")
            lines.append(f"{key}: {text}".rstrip())
    return "\n".join(lines) + "\n"


def render_markdown_table() -> str:
    """The README's tables of config keys, one per section (kept in sync by a test)."""
    short = {"train_tissue_independent": "train", "train_tissue_dependent": "train",
             "train_tissue_specific": "train", "predict_cell_types": "predict",
             "find_cell_type_markers": "markers", "collect_folds": "collect"}
    rows: list[str] = []
    for section in SECTIONS:
        rows += [f"**{section}**", "", "| key | default | used by | meaning |", "|---|---|---|---|"]
        for f in fields(Config):
            if f.metadata["section"] != section:
                continue
            info = describe(f.name)
            used = ", ".join(sorted({short[c] for c in info["commands"]}))
            default = f"`{info['default']}`" if info["default"] is not None else \
                (f"`{_unset_text(f.name)}`" if _unset_text(f.name) else "")
            choices = f" One of: {', '.join(info['choices'])}." if info["choices"] else ""
            rows.append(f"| `{f.name}` | {default} | {used} | {info['help']}{choices} |")
        rows.append("")
    return "\n".join(rows)
