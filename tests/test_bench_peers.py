"""bench/peers.py runs (quick mode: logistic regression on a 200-cell subsample, no peer venvs needed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def load_peers_bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_peers_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    peers = load_peers_bench()
    if not (peers.PEER_SCRIPTS / "run_linear.py").exists():
        pytest.skip(f"{peers.PEER_SCRIPTS} (../shared/peers) is not available")
    out, work = tmp_path / "r", tmp_path / "w"
    rows = peers.main(["--quick", "--out", str(out), "--work", str(work), "--tag", "t"])

    assert len(rows) == 2 and rows["status"].tolist() == ["ok", "ok"], rows.get("error")
    table = pd.read_csv(out / "t.csv")
    assert table["peer"].tolist() == ["logreg", "scnym_cli"] and set(table["split"]) == {"kang_ctrl_to_stim"}
    assert table["n_scored"].tolist() == [peers.QUICK_CELLS] * 2
    assert "run_scnym_cli.py" in table["command"].iloc[1]    # this repository's scnym, side by side
    for column in ("balanced_accuracy", "accuracy", "macro_f1", "ece"):
        assert table[column].between(0, 1).all(), column
    assert table["balanced_accuracy"].iloc[0] > 0.5  # five PBMC types: far above chance (scnym: 2 epochs only)
    assert (table["seconds"] > 0).all() and (table["peak_mb"] > 0).all()
    assert table["runner_train_s"].notna().all()  # the runner's own meta.json was read
    assert "run_linear.py" in table["command"].iloc[0]
    assert table["runner_train_s"].iloc[1] > 0 and table["runner_predict_s"].iloc[1] > 0

    payload = json.loads((out / "t.json").read_text())
    assert "python bench/peers.py --quick" in payload["command"]
    assert payload["machine"]["cores"] and payload["machine"]["nice"] == 19
    assert payload["rows"][0]["runner_meta"]["peer"] == "logreg"

    report = (out / "t.md").read_text()
    assert "Kang ctrl -> stim" in report and "logistic regression" in report
    assert "shared machine" in report
    # the peer ran on copies that tell run_linear.py the Kang file holds counts
    assert list((work / "data").glob("*.x_kind_counts.h5ad"))

    # --merge: rows of an earlier report join this one, unless this invocation runs them again
    earlier = tmp_path / "earlier.json"
    other = {**payload["rows"][0], "split": "chemistry_5p"}
    earlier.write_text(json.dumps({"command": "python bench/peers.py --splits chemistry_5p", "rows": [
        other, payload["rows"][0]]}))
    again = peers.main(["--quick", "--resume", "--out", str(out), "--work", str(work), "--tag", "t2",
                        "--merge", str(earlier)])
    assert again["split"].tolist() == ["chemistry_5p", "kang_ctrl_to_stim", "kang_ctrl_to_stim"]
    assert "1 rows come from an earlier report" in (out / "t2.md").read_text()


def test_install_runs_the_installer_only_for_missing_venvs(tmp_path, monkeypatch):
    peers = load_peers_bench()
    scripts, home = tmp_path / "scripts", tmp_path / "peers"
    scripts.mkdir()
    (scripts / "env.sh").write_text('export PIP_CACHE_DIR=${PEERS_DIR:-$HOME/scnym-peers}/.cache/pip\n')
    # a stand-in installer with the real ones' interface: install_<peer>.sh [VENV], sourcing $PEERS_DIR/env.sh
    (scripts / "install_celltypist.sh").write_text(
        'set -eu\nsource "$PEERS_DIR/env.sh"\nmkdir -p "$1/bin"\necho "$PIP_CACHE_DIR" > "$1/cache"\n'
        f'ln -s {sys.executable} "$1/bin/python"\n')
    monkeypatch.setattr(peers, "PEER_SCRIPTS", scripts)
    monkeypatch.setattr(peers, "PEERS_DIR", home)
    celltypist = peers.Peer("celltypist", "CellTypist", "run_celltypist.py", "celltypist-venv",
                            "install_celltypist.sh", None, None, "")
    outcome = peers.install([celltypist, peers.PEERS["logreg"]])  # logreg needs no venv
    assert list(outcome) == ["celltypist"] and outcome["celltypist"].startswith("exit 0")
    assert (home / "celltypist-venv" / "cache").read_text().strip() == str(home / ".cache" / "pip")
    assert peers.install([celltypist]) == {}  # present now: not installed again


INFO = {"cpu": "AMD EPYC", "cores": 2, "memory_gb": 24, "torch": "2.13.0", "scnym": "0.1", "git_commit": "abc",
        "date": "2026-12-02"}


def test_timing_table_is_the_median_of_rounds_against_scnym():
    load_peers_bench()
    spec = importlib.util.spec_from_file_location("bench_timing", REPO / "bench" / "timing.py")
    timing = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = timing
    spec.loader.exec_module(timing)
    frame = pd.DataFrame([
        {"peer": "scnym_cli", "seed": 0, "status": "ok", "seconds": 20.0, "runner_train_s": 14.0, "peak_mb": 900,
         "balanced_accuracy": 0.83, "load_1min_before": 0.1},
        {"peer": "logreg", "seed": 0, "status": "ok", "seconds": 12.0, "runner_train_s": 3.0, "peak_mb": 400,
         "balanced_accuracy": 0.81, "load_1min_before": 0.2},
        {"peer": "scnym_cli", "seed": 1, "status": "ok", "seconds": 30.0, "runner_train_s": 15.0, "peak_mb": 950,
         "balanced_accuracy": 0.82, "load_1min_before": 0.3},
        {"peer": "scnym_cli", "seed": 2, "status": "ok", "seconds": 18.0, "runner_train_s": 13.0, "peak_mb": 920,
         "balanced_accuracy": 0.84, "load_1min_before": 0.1},
        {"peer": "scanvi", "seed": 0, "status": "failed", "seconds": 5.0, "error": "venv missing"},
    ])
    table = timing.summarize(frame)
    assert table.loc["scnym_cli", "wall_median"] == 20.0 and table.loc["scnym_cli", "runs"] == 3
    assert table.loc["scnym_cli", "peak_mb"] == 950 and table.loc["scnym_cli", "train_median"] == 14.0
    assert table.loc["logreg", "vs_scnym"] == pytest.approx(0.6)
    assert "scanvi" not in table.index                      # a failed run is reported, not timed
    report = "\n".join(timing.markdown(table, frame, "kang_cross_donor", INFO, "python bench/timing.py"))
    assert "| scnym (this repository) | 3 | 20.0 (18.0-30.0) | 14.0 | 950 | 0.830 | 1.00 |" in report
    assert "FAILED: scanvi" in report and "0.10-0.30" in report
