"""What users see while scnym works: INFO lines in a notebook or script without any set-up (silenced with
one call, deferring to logging the program set up itself), and progress lines where no terminal shows a
bar (SLURM logs, CI)."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from conftest import FAST_FLAGS, invoke, make_counts, write_h5ad

LIBRARY_USE = """
import logging, sys
sys.path.insert(0, {tests!r})
{setup}
from conftest import make_counts
from scnym_cli import api
adata = make_counts(n_cells=90, seed=1)
adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
api.scnym_api(adata, "train", groupby="cell_type", out_path={out!r},
              config={{"n_epochs": 2, "min_epochs": 1, "n_hidden": 16, "preset": "no_ssl", "num_threads": 1}})
"""


def library_stderr(tmp_path, setup: str) -> str:
    script = LIBRARY_USE.format(tests=str(pathlib.Path(__file__).parent), setup=setup,
                                out=str(tmp_path / "model"))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          check=True)
    return done.stderr


@pytest.mark.parametrize("setup, expected", [
    ("", "scnym: "),                                                              # nothing configured
    ("logging.basicConfig(level=logging.INFO, format='ROOT %(name)s %(message)s')", "ROOT scnym_cli"),
    ("logging.getLogger('scnym_cli').setLevel(logging.WARNING)", None),          # silenced
], ids=["unconfigured", "program-configured", "silenced"])
def test_library_use_shows_info_lines_once_unless_silenced(tmp_path, setup, expected):
    stderr = library_stderr(tmp_path, setup)
    lines = [line for line in stderr.splitlines() if "all_data: epoch 2/2" in line]
    if expected is None:
        assert lines == [] and "outputs written" not in stderr
    else:
        assert len(lines) == 1 and lines[0].startswith(expected), stderr
        assert sum("outputs written" in line for line in stderr.splitlines()) == 1, stderr


def test_cli_without_a_terminal_logs_progress_lines(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "run", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for model in ("fold00", "fold01", "all_data"):
        assert f"{model}: epoch 4/4, loss" in text, result.output
    quiet = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                   "--out_path", tmp_path / "run2", *FAST_FLAGS, "--quiet")
    assert quiet.exit_code == 0 and "epoch 4/4" not in quiet.output
