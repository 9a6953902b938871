"""Configuration: precedence, formats, validation and the effective config."""

import json
from pathlib import Path

import pytest

from scnym_cli.config import (CONFIG_KEYS, Config, ConfigLayer, build_config, describe, load_config, parse_bool,
                              render_key_value)
from scnym_cli.errors import ScnymError

from conftest import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[1]


def test_the_2021_config_file_brings_back_the_published_settings():
    c = Config()
    assert (c.lr, c.optimizer, c.weight_decay, c.batch_size, c.n_hidden, c.n_layers, c.n_folds) == \
        (1.0, "adadelta", 1e-4, 256, 256, 2, 5)                    # shared by the 2021 settings and ours
    published = load_config(None, [REPO / "configs" / "scnym_2021.txt"])
    assert (published.n_epochs, published.patience, published.min_epochs, published.min_steps_per_epoch) == \
        (100, 40, 20, 0)
    assert (published.unsup_ramp_epochs, published.dan_ramp_epochs) == (100, 20)
    assert published.n_top_genes is None and not published.shared_genes and not published.dan_on_mixes
    changed = {k for k, v in published.to_dict().items() if v != c.to_dict()[k]}
    assert changed == {"n_epochs", "patience", "min_epochs", "min_steps_per_epoch", "unsup_ramp_epochs",
                       "dan_ramp_epochs", "n_top_genes", "shared_genes", "dan_on_mixes",
                       "pseudolabel_min_confidence", "adaptive_thresholds", "balance_classes", "augmentation_rate"}
    # the file keeps the augmentation rate its benchmark figures were measured with
    assert published.augmentation_rate == 0.1 and c.augmentation_rate == 0.2
    assert published.balance_classes is False and c.balance_classes is None   # auto: balanced when adapting
    assert load_config(None, [], {"balance_classes": "auto"}).balance_classes is None
    assert load_config(None, [], {"balance_classes": "no"}).balance_classes is False


def test_precedence_defaults_files_flags(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("# scNym style\nn_epochs: 10\nbatch_size: 64  # trailing comment\nlr: 0.5\n")
    second = tmp_path / "b.yaml"
    second.write_text("n_epochs: 20\nweight_decay: 1e-3\n")
    config = load_config(None, [first, second], {"lr": "0.25", "n_hidden": None})
    assert config.n_epochs == 20          # second file beats first
    assert config.batch_size == 64        # only in the first file
    assert config.lr == 0.25              # flag beats files
    assert config.weight_decay == 1e-3    # YAML's '1e-3' string is parsed as a number
    assert config.n_hidden == 256         # a flag that was not given (None) does not override


@pytest.mark.parametrize("name,text", [
    ("c.json", '{"n_epochs": 7, "balance_classes": true, "mixup_alpha": null}'),
    ("c.yml", "n_epochs: 7\nbalance_classes: yes\nmixup_alpha:\n"),
    ("c.txt", "n_epochs: 7\nbalance_classes: True\nmixup_alpha:\n"),
    ("c.cfg", "n_epochs = 7\nbalance_classes = 1\nmixup_alpha = none\n"),
    ("noext", '{"n_epochs": 7, "balance_classes": "on", "mixup_alpha": "None"}'),
])
def test_every_format_reads_the_same(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    config = load_config(None, [path])
    assert config.n_epochs == 7 and config.balance_classes is True and config.mixup_alpha is None


@pytest.mark.parametrize("text,expected", [
    ("False", False), ("false", False), ("0", False), ("no", False), ("off", False),
    ("True", True), ("true", True), ("1", True), ("yes", True), (True, True), (False, False),
])
def test_booleans_parse_as_users_mean(text, expected):
    assert parse_bool(text) is expected
    assert load_config(None, [], {"residual": text}).residual is expected


@pytest.mark.parametrize("values,fragments", [
    ({"n_epoch": "3"}, ["unknown config key 'n_epoch'", "did you mean 'n_epochs'"]),
    ({"n_epochs": "ten"}, ["'n_epochs'", "expected an integer"]),
    ({"n_epochs": "0"}, ["'n_epochs'", ">= 1"]),
    ({"lr": "-1"}, ["'lr'", "> 0"]),
    ({"lr": "nan"}, ["'lr'", "finite"]),
    ({"init_dropout": "1.0"}, ["'init_dropout'", "< 1"]),
    ({"optimizer": "adamm"}, ["'optimizer'", "did you mean 'adam'"]),
    ({"residual": "maybe"}, ["'residual'", "true or false"]),
    ({"device": "gpu"}, ["'device'", "cuda"]),
    ({"n_folds": "1"}, ["n_folds", "at least 2"]),
    ({"balance_classes": "true", "weight_classes": "true"}, ["balance_classes", "weight_classes"]),
    ({"n_hidden": ""}, ["'n_hidden'", "value is required"]),
])
def test_validation_errors_name_the_key(values, fragments):
    with pytest.raises(ScnymError) as error:
        build_config([ConfigLayer("test", values)])
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_size: many\n")
    with pytest.raises(ScnymError, match="bad.yaml"):
        load_config(None, [path])


@pytest.mark.parametrize("text", ["n_epochs: [1, 2]\n", "just words\n"])
def test_malformed_config_files(tmp_path, text):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ScnymError):
        load_config(None, [path])


def test_config_is_immutable_and_replace_validates():
    c = Config()
    with pytest.raises(Exception):
        c.n_epochs = 3  # frozen
    d = c.replace(n_epochs="5")
    assert d.n_epochs == 5 and c.n_epochs == 15
    with pytest.raises(ScnymError):
        c.replace(n_epochs=-1)


def test_required_keys_and_paths_are_checked_before_work(tmp_path):
    with pytest.raises(ScnymError, match="needs --input_counts"):
        load_config("train_tissue_independent", [], {"out_path": str(tmp_path)})
    with pytest.raises(ScnymError, match="does not exist"):
        load_config("train_tissue_independent", [], {"out_path": str(tmp_path),
                                                      "input_counts": str(tmp_path / "absent.h5ad")})


def test_default_config_txt_is_in_sync_with_the_defaults():
    shipped = (REPO / "default_config.txt").read_text()
    assert shipped == render_key_value(Config()), "run: python scripts/update_docs.py"
    assert load_config(None, [REPO / "default_config.txt"]) == Config()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*")), ids=lambda p: p.name)
def test_shipped_example_configs_are_valid(path):
    load_config(None, [path])


def test_print_config_cli(runner, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("n_epochs: 12\n")
    result = invoke(runner, "print_config", "-c", path, "--set", "lr=0.3", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["n_epochs"] == 12 and printed["lr"] == 0.3
    result = invoke(runner, "print_config", "--command", "predict_cell_types")
    assert "model_path:" in result.stdout and "n_epochs" not in result.stdout


def test_cli_rejects_unknown_key_in_file(runner, tmp_path, h5ad_path):
    path = tmp_path / "c.txt"
    path.write_text("n_epochz: 3\n")
    result = invoke(runner, "train_tissue_independent", "-c", path, "--input_counts", h5ad_path,
                    "--out_path", tmp_path / "out")
    assert_one_line_error(result, "n_epochz", "did you mean 'n_epochs'")
    assert not (tmp_path / "out").exists()


def test_cli_flag_typo_is_suggested(runner):
    result = invoke(runner, "train_tissue_independent", "--n_epoch", "3")
    assert result.exit_code != 0
    assert "--n_epochs" in result.output


# keys whose other values only make sense together with another key (Config's combination checks)
COMPANIONS = {"weighted_sets": {"coverage": "0.9"}, "coverage_per_class": {"coverage": "0.9"},
              "fold": {"n_folds": "3"}, "folds": {"n_folds": "3"}}
TEXT_CANDIDATES = ["cpu", "mouse:human", "reference", "a,b", "x1"]


def _candidates(key: str, tmp_path):
    """Texts of values other than the default, most likely valid first."""
    info = describe(key)
    default, kind = info["default"], info["type"]
    if info["choices"]:
        return [c for c in info["choices"] if c != default]
    if kind.startswith("bool"):
        return ["false" if default else "true"]
    if kind.startswith("path"):
        path = tmp_path / f"{key}.txt"
        path.write_text("gene_a\n")
        return [str(path)]
    if kind.startswith("int"):
        low = int(info["min"]) if info["min"] is not None else 0
        return [str(v) for v in ((default or 0) + 1, low + 1, low + 2, 3, 7) if v != default]
    if kind.startswith("float"):
        return [repr(v) for v in (0.5 * default if default else 0.5, 0.25, 0.9, 2.0, 12.5) if v != default]
    return [t for t in TEXT_CANDIDATES if t != default]


def test_every_key_means_the_same_through_every_face(tmp_path):
    """A value other than the default, for every key, given as a command-line flag, in a key: value file, in
    a JSON file, in an API dict (as text and as a typed value) and as a Config: one effective value."""
    from scnym_cli.api import make_config

    checked = []
    for key in CONFIG_KEYS:
        if key == "preset":
            continue
        companions = dict(COMPANIONS.get(key, {}))
        if key == "unlabeled_genes":  # names the genes of a target file
            companions["unlabeled_counts"] = _candidates("unlabeled_counts", tmp_path)[0]
        for text in _candidates(key, tmp_path):
            try:
                from_flags = load_config(None, [], {**companions, key: text})
            except ScnymError:
                continue
            break
        else:
            pytest.fail(f"no valid non-default value found for {key}")
        value = getattr(from_flags, key)
        assert value != describe(key)["default"], key
        typed = {k: getattr(from_flags, k) for k in (*companions, key)}
        lines = tmp_path / f"{key}.conf"
        lines.write_text("".join(f"{k}: {v}\n" for k, v in {**companions, key: text}.items()))
        as_json = tmp_path / f"{key}.json"
        as_json.write_text(json.dumps(typed, default=str))
        faces = {"key: value file": load_config(None, [lines], {}), "JSON file": load_config(None, [as_json], {}),
                 "API dict of text": make_config({**companions, key: text}),
                 "API dict of values": make_config(typed), "Config": make_config(Config(**typed))}
        for face, config in faces.items():
            assert getattr(config, key) == value, f"{key} through {face}: {getattr(config, key)!r} != {value!r}"
        checked.append(key)
    assert len(checked) == len(CONFIG_KEYS) - 1


@pytest.mark.parametrize("name, data, fragments", [
    ("latin1.txt", b"lr: 0.5\n# caf\xe9\n", ["line 2 is not UTF-8", "save it as UTF-8"]),
    ("twice.txt", b"lr: 0.5\nlr: 0.7\n", ["line 2 sets 'lr' a second time"]),
    ("twice.yaml", b"lr: 0.5\nlr: 0.7\n", ["line 2", "'lr' is given more than once"]),
    ("twice.json", b'{"lr": 0.5, "lr": 0.7}', ["sets 'lr' more than once"]),
    ("broken.yaml", b"lr: 0.5\n  bad: [\n", ["could not be parsed (line 2 column"]),
])
def test_config_files_that_were_read_wrong_or_crashed(runner, tmp_path, h5ad_path, name, data, fragments):
    """A non-UTF-8 byte was a traceback, a repeated key silently took the last value, YAML errors had no line."""
    path = tmp_path / name
    path.write_bytes(data)
    result = invoke(runner, "train_tissue_independent", "-c", path, "--input_counts", h5ad_path,
                    "--lower_group", "cell_type", "--out_path", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
