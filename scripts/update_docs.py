"""Regenerate the documentation that is derived from code: default_config.txt and the README's
table of config keys. tests/test_docs.py fails when they are out of date.

    python scripts/update_docs.py
"""

import re
from pathlib import Path

from scnym_cli.config import Config, render_key_value, render_markdown_table

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def readme_with_keys(text: str) -> str:
    block = f"{START}\n{render_markdown_table()}{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    (REPO / "default_config.txt").write_text(render_key_value(Config()))
    readme = REPO / "README.md"
    readme.write_text(readme_with_keys(readme.read_text()))
    print("updated default_config.txt and README.md")
