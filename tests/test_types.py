"""The package type-checks: every annotation is what the code really holds (mypy, configured in pyproject.toml)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_package_type_checks_clean(tmp_path):
    from mypy import api   # a test dependency (pyproject.toml: the test extra)

    report, errors, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                                      str(tmp_path / "cache"), str(ROOT / "scnym_cli")])
    assert status == 0, f"mypy found type errors:\n{report}{errors}"
    assert "Success" in report
