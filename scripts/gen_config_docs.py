"""Regenerate the field table in docs/configuration.md from AlignPropConfig (tests check it is current).

usage: python scripts/gen_config_docs.py [--check]
"""

import sys
from pathlib import Path

from alignprop_core.config import field_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN, END = "<!-- fields:begin -->", "<!-- fields:end -->"


def table() -> str:
    rows = []
    group = None
    for name, type_name, default, text, section in field_docs():
        if section != group:
            group = section
            rows += ["", f"**{group}**", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        shown = "`None`" if default is None else f"`{default!r}`" if not isinstance(default, (list, dict)) \
            else f"`{default}`"
        rows.append(f"| `{name}` | {type_name} | {shown} | {text.replace('|', '/')} |")
    return "\n".join(rows).strip()


def render(current: str) -> str:
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    current = DOC.read_text()
    updated = render(current)
    if "--check" in sys.argv:
        sys.exit(0 if updated == current else "docs/configuration.md is stale: run python scripts/gen_config_docs.py")
    DOC.write_text(updated)
