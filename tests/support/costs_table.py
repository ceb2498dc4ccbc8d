"""The documented traffic table (docs/costs.md, "Traffic per step, by configuration"), read by the tests that
count what the VR source reduces: the doc is the one statement of the figures."""

from __future__ import annotations

import functools
import re

from tests.support import REPO

ROW = re.compile(r"^\| `(?P<id>[\w-]+)` \|(?P<cells>.*)\|\s*$")


@functools.lru_cache(maxsize=None)
def documented_rows() -> dict[str, list[str]]:
    """Row id -> its cells, from docs/costs.md."""
    rows = {}
    for line in (REPO / "docs" / "costs.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match["id"]] = [cell.strip() for cell in match["cells"].split("|")]
    return rows


def vr_bytes_per_element(row_id: str, gas: int) -> int:
    """The table's "VR bytes / element / step" of a row (an expression in GA: 4, 8, GA, 2 GA, ...)."""
    expression = documented_rows()[row_id][4]
    match = re.fullmatch(r"(\d+)?\s*(GA)?", expression)
    assert match and expression, f"docs/costs.md row {row_id}: cannot read {expression!r}"
    factor = int(match[1]) if match[1] else 1
    return factor * (gas if match[2] else 1)
