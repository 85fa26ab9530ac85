"""Rows for docs/robustness.md's "Attacks" section, written by the tests/*/test_attack_*.py modules.

With DOCKET_ATTACK_RESULTS=FILE each case appends one JSON line (area, case, observed) after its assertions
held, so a missing row means the test did not pass. scripts/robustness_table.py runs those modules with the
variable set and renders the table; nothing in it is typed in by hand.
"""

from __future__ import annotations

import json
import os


def record(area: str, case: str, observed: str) -> None:
    """One row: what was attacked (area), how (case), and what the registry or client did (observed)."""
    path = os.environ.get("DOCKET_ATTACK_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"table": "attacks", "area": area, "case": case, "observed": observed[:200]}) + "\n")
