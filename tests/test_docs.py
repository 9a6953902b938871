"""Documentation derived from code stays in sync (regenerate with scripts/update_docs.py)."""

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_update_docs():
    spec = importlib.util.spec_from_file_location("update_docs", REPO / "scripts" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_table_is_current():
    readme = (REPO / "README.md").read_text()
    assert load_update_docs().readme_with_keys(readme) == readme, "run: python scripts/update_docs.py"


def test_readme_holds_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "bash demo_script.sh" in readme and "bash run_tests.sh" in readme
    assert "run_tests.sh" in (REPO / ".ci" / "run").read_text()


def test_every_config_key_is_documented_in_the_readme():
    from scnym_cli.config import CONFIG_KEYS

    readme = (REPO / "README.md").read_text()
    for key in CONFIG_KEYS:
        assert re.search(rf"\| `{key}` \|", readme), key
