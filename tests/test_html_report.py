"""report.html: one self-contained page per training run and per prediction, rendered in a real headless
browser (Chromium): it loads with no error, fetches nothing, and shows every section."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import invoke, make_counts, write_h5ad

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(page, tmp_path):
    """The DOM after Chromium loaded the page, its log, and the seconds it took."""
    if BROWSER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no headless Chromium under CI=true (.ci/run installs Debian's chromium package)")
        pytest.skip("no Chromium on this machine (apt-get install chromium) to render the report")
    started = time.perf_counter()
    result = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr, time.perf_counter() - started


def _check_loads_cleanly(dom, log):
    # no script error, no resource that failed to load (the page fetches nothing: images are inlined)
    assert not re.search(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror|net::ERR_", log), log[-2000:]
    sources = re.findall(r'<img[^>]+src="([^"]{0,40})', dom)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in dom and "https://" not in dom


def test_the_run_report_renders_with_every_section(trained_run, tmp_path):
    page = trained_run / "report.html"
    assert page.stat().st_size < 5_000_000
    dom, log, seconds = _render(page, tmp_path)
    _check_loads_cleanly(dom, log)
    for section in ("summary", "cv", "per-class", "confusion", "calibration", "training", "map"):
        assert f'id="{section}"' in dom, section
    summary = json.loads((trained_run / "run_summary.json").read_text())
    for name in summary["classes"]:
        assert f"<td>{name}</td>" in dom
    for model in ("fold00", "fold01", "all_data"):      # a training curve per model
        assert f"<h3>{model}</h3>" in dom
    assert dom.count("<img") == 2 + 3 + 1               # confusion, reliability, 3 curves, the map
    assert seconds < 60                                 # (loads in about a second here; a generous bound)


def test_the_prediction_report_of_a_labeled_query(runner, trained_run, tmp_path):
    query = make_counts(n_cells=90, seed=5)
    data = write_h5ad(query, tmp_path / "q.h5ad")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", tmp_path / "p", "--lower_group", "cell_type", "--coverage", "0.9")
    assert result.exit_code == 0, result.output
    dom, log, _ = _render(tmp_path / "p" / "report.html", tmp_path)
    _check_loads_cleanly(dom, log)
    for section in ("summary", "counts", "metrics", "per-class", "confusion", "calibration", "map"):
        assert f'id="{section}"' in dom, section
    cells = __import__("pandas").read_csv(tmp_path / "p" / "embedding_map.csv")
    assert len(cells) == 90 and {"x", "y", "predicted", "confidence", "label"} <= set(cells.columns)
