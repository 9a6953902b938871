"""The ``scnym`` command line: one thin function per subcommand -> Config -> a workflow.

Options are generated from the :class:`~scnym_cli.config.Config` fields, so every config key
is also a flag with the same name (scNym's spelling, e.g. ``--n_epochs``). Values are parsed
by the config layer, which is what makes ``--balance_classes False`` mean false.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand

from ._version import __version__
from .config import (ALL_COMMANDS, CONFIG_KEYS, Config, describe, keys_for, load_config, render_key_value)
from .errors import ScnymError

log = logging.getLogger("scnym_cli")

app = typer.Typer(
    name="scnym",
    help="Cell identity classification for single-cell RNA-seq: train on a labeled reference, "
         "transfer labels to new experiments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def setup_logging(quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger("scnym_cli")
    root.handlers.clear()
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=True, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _run(command: str, config_files: Optional[List[Path]], quiet: bool, flags: dict,
         workflow: Callable[[Config], object]) -> None:
    from .workflows.runtime import teardown_runtime

    setup_logging(quiet)
    try:
        config = load_config(command, config_files or [], flags)
        workflow(config)
    except ScnymError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; no outputs were written", 130)
    finally:
        teardown_runtime()


def _is_boolean(key: str) -> bool:
    return describe(key)["type"].startswith("bool")


def _option_help(key: str) -> str:
    """A key's help with its allowed values and its default, each said once. rich reads ``[...]`` as markup:
    escaped, the allowed values stay visible."""
    info = describe(key)
    text = info["help"]
    if info["choices"]:
        text += f" [{'|'.join(info['choices'])}]"
    # keys whose text already says what leaving them unset does get no second "(default: none)"
    if not (info["default"] is None and "default" in info["help"].lower()):
        default = info["default"]
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        text += f" (default: {shown})"
    if _is_boolean(key):
        text += "; a bare flag means true"
    return escape(text)


class _BareBooleanFlags(TyperCommand):
    """Boolean keys work as bare flags (``--overwrite``) and with a value (``--overwrite false``), as in the
    CLIs users know: a boolean option followed by another option, or by nothing, reads as ``true``."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        flags = {f"--{p.name}" for p in self.params if p.name in CONFIG_KEYS and _is_boolean(p.name)}
        completed: list[str] = []
        for position, arg in enumerate(args):
            completed.append(arg)
            following = args[position + 1] if position + 1 < len(args) else None
            if arg in flags and (following is None or following.startswith("-")):
                completed.append("true")
        return super().parse_args(ctx, completed)


def _options_signature(command: str) -> inspect.Signature:
    """Keyword-only Typer options: -c/--config, --quiet, then every config key of ``command``."""
    K = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("config", K, annotation=Optional[List[Path]], default=typer.Option(
            None, "-c", "--config", help="Config file(s): key: value lines, YAML or JSON; later ones win, "
                                         "flags win over files.", show_default=False)),
        inspect.Parameter("quiet", K, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="Only warnings and errors.")),
    ]
    for key in keys_for(command):
        info = describe(key)
        parameters.append(inspect.Parameter(key, K, annotation=Optional[str], default=typer.Option(
            None, f"--{key}", help=_option_help(key), show_default=False,
            metavar=info["type"].upper().replace(" | NONE", ""), rich_help_panel=info["section"])))
    return inspect.Signature(parameters)


def _register(command: str, help_text: str, workflow: Callable[[Config], object]) -> None:
    def run(**options) -> None:
        config_files, quiet = options.pop("config"), options.pop("quiet")
        _run(command, config_files, quiet, options, workflow)

    signature = _options_signature(command)
    setattr(run, "__signature__", signature)  # what typer reads the options from
    run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    run.__doc__ = help_text
    app.command(command, help=help_text, cls=_BareBooleanFlags)(run)


def _workflow(module: str, function: str) -> Callable[[Config], object]:
    """The workflow ``function`` of ``scnym_cli.workflows.<module>``, imported when the command runs
    (``scnym --help`` stays fast)."""
    def run(config: Config) -> object:
        return getattr(importlib.import_module(f"scnym_cli.workflows.{module}"), function)(config)

    return run


_register("train_tissue_independent",
          "Train one classifier on all cells (stratified k-fold cross-validation plus a final all_data model).",
          _workflow("train", "train_tissue_independent"))
_register("train_tissue_dependent",
          "Train one classifier conditioned on the upper group (tissue one-hot appended to the input).",
          _workflow("tissues", "train_tissue_dependent"))
_register("train_tissue_specific",
          "Train one cross-validated classifier per upper group (tissue) under tissues/<group>/.",
          _workflow("tissues", "train_tissue_specific"))
_register("collect_folds",
          "Assemble a run whose folds were trained by separate jobs (--fold / --folds): check that every "
          "model is there and complete, then write fold_eval_acc.csv and the other run tables.",
          _workflow("collect", "collect_folds"))
_register("predict_cell_types",
          "Predict cell types of new data with a trained model (any input format; genes aligned to the model).",
          _workflow("predict", "predict_cell_types"))
_register("find_cell_type_markers",
          "Find the genes that drive each class: input optimization and expected-gradient attributions.",
          _workflow("markers", "find_cell_type_markers"))


@app.command("print_config")
def print_config(
    config: Optional[List[Path]] = typer.Option(None, "-c", "--config", help="Config file(s) to merge."),
    command: Optional[str] = typer.Option(None, "--command", help=f"Only keys of this command: "
                                                                  f"{', '.join(sorted(ALL_COMMANDS))}."),
    json_output: bool = typer.Option(False, "--json", help="JSON instead of key: value lines."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE overrides, like command-line flags."),
) -> None:
    """Print the effective config (defaults < files < --set): a starting point for a config file."""
    import json

    setup_logging(quiet=True)
    try:
        if command is not None and command not in ALL_COMMANDS:
            raise ScnymError(f"--command {command!r} is not one of {', '.join(sorted(ALL_COMMANDS))}")
        flags = {}
        for item in set_ or []:
            if "=" not in item:
                raise ScnymError(f"--set {item!r} must look like KEY=VALUE")
            key, value = item.split("=", 1)
            flags[key.strip()] = value
        effective = load_config(None, config or [], flags)
        keys = keys_for(command) if command else list(CONFIG_KEYS)
        if json_output:
            typer.echo(json.dumps({k: effective.to_dict()[k] for k in keys}, indent=1))
        else:
            typer.echo(render_key_value(effective, keys), nl=False)
    except ScnymError as e:
        _fail(str(e), e.exit_code)


@app.command("print_model")
def print_model(
    path: Path = typer.Argument(..., help="A model directory (all_data/, fold00/...) or a training run."),
    raw: bool = typer.Option(False, "--raw", help="The card's Markdown as it is (YAML header included)."),
) -> None:
    """Show a model's card: what it is, what it was trained on, how good it is per class, its limits."""
    from .card import card_text

    setup_logging(quiet=True)
    try:
        text = card_text(path)
    except ScnymError as e:
        _fail(str(e), e.exit_code)
    if raw:
        typer.echo(text, nl=False)
        return
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.syntax import Syntax

    header, body = "", text
    if text.startswith("---\n") and "\n---\n" in text[4:]:   # the YAML header, shown as YAML
        header, body = text[4:].split("\n---\n", 1)
    console = Console()
    if header:
        console.print(Syntax(header, "yaml", theme="ansi_dark", background_color="default"))
    console.print(Markdown(body))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scnym {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """scnym: semi-supervised adversarial cell-type classification (scNym, rebuilt)."""


def main() -> None:
    app(prog_name="scnym")


if __name__ == "__main__":
    main()
