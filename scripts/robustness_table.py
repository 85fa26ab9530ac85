#!/usr/bin/env python3
"""Write docs/robustness.md from test runs: bad input (tests/registry/test_bad_input.py), faults
(tests/e2e/test_faults.py), attacks (tests/*/test_attack_*.py) and load figures (benchmarks/load.py).

    scripts/robustness_table.py                 # runs all three (a few minutes), writes docs/robustness.md
    scripts/robustness_table.py --no-load       # keep the load figures out (no benchmark run)
    scripts/robustness_table.py --bad-input-from a.jsonl --faults-from b.jsonl --load-from load.json -o -

The test modules append JSON lines when DOCKET_BAD_INPUT_RESULTS / DOCKET_ROBUSTNESS_RESULTS name a file; a fault
test writes its row as its last step, so a test without a row did not pass. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_table import ROOT, cell, render as render_bad_input  # noqa: E402

FAULTS = ROOT / "tests" / "e2e" / "test_faults.py"


def _rows_from_pytest(test_file: str | list[str], env_name: str, pytest_args: list[str]) -> tuple[list[dict], int]:
    fd, name = tempfile.mkstemp(prefix="robustness-", suffix=".jsonl")
    os.close(fd)
    rows_file = Path(name)
    try:
        env = {**os.environ, env_name: str(rows_file)}
        files = [test_file] if isinstance(test_file, str) else test_file
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", *pytest_args]
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL).returncode
        return _read_rows(rows_file), status
    finally:
        rows_file.unlink(missing_ok=True)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_load(args: list[str]) -> tuple[dict | None, int]:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-2000:])
        return None, result.returncode
    return json.loads(result.stdout), 0


def fault_tests() -> list[str]:
    return re.findall(r"^def (test_\w+)\(", FAULTS.read_text(), flags=re.MULTILINE)


def render_faults(rows: list[dict], status: int | None) -> str:
    out = ["## Faults", "", "Generated from `tests/e2e/test_faults.py` (real registry, opentracker, ctorrent and "
           "dockerd). "
           "Each row is written by the test after its last assertion.", ""]
    if status not in (None, 0):
        out += [f"**The fault test run failed (pytest exit {status}).**", ""]
    out += ["| test | what was done | outcome |", "|---|---|---|"]
    by_test = {r["test"]: r for r in rows}
    for name in fault_tests():
        r = by_test.get(name)
        did, observed = (r["did"], r["observed"]) if r else ("", "**no row: the test did not pass in this run**")
        out.append(f"| `{name}` | {cell(did)} | {cell(observed)} |")
    return "\n".join(out) + "\n"


def render_attacks(rows: list[dict], status: int | None) -> str:
    out = ["## Attacks", "", "Generated from `tests/*/test_attack_*.py`: the registry and the client attacked and "
           "damaged on "
           "purpose (real servers, real processes). Each row is written after the case's assertions held.", ""]
    if status not in (None, 0):
        out += [f"**The attack test run failed (pytest exit {status}).**", ""]
    out += ["| area | case | observed |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["area"], r["case"])):
        out.append(f"| {cell(r['area'])} | {cell(r['case'])} | {cell(r['observed'])} |")
    return "\n".join(out) + "\n"


def render_load(load: dict | None, status: int | None) -> str:
    out = ["## Load", "", "`python benchmarks/load.py` (real docket-registry on this host): concurrent "
           "`GET /api/v1/images` listings while whole-tarball pushes run.", ""]
    if load is None:
        return "\n".join(out + [f"**The load benchmark failed (exit {status}).**" if status else
                                "(not run: --no-load)"]) + "\n"
    errors = ": " + cell("; ".join(map(str, load["errors"])))[:300] if load["errors"] else ""
    out += ["| figure | value |", "|---|---|",
            f"| readers x requests | {load['readers']} x {load['requests'] // max(1, load['readers'])} "
            f"({load['requests']} listings) |",
            f"| concurrent pushes | {load['pushes']} x {load['push_mib']} MiB |",
            f"| listing latency p50 / p99 / max | {load['images_p50_ms']} / {load['images_p99_ms']} / "
            f"{load['images_max_ms']} ms |",
            f"| push times | {', '.join(f'{s:g}' for s in load['push_s'])} s |",
            f"| wall time | {load['wall_s']} s |",
            f"| errors | {len(load['errors'])}{errors} |",
            f"| images listed afterwards | {load['images_after']} |"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bad-input-from", type=Path, help="bad-input rows (JSON lines) instead of running the tests")
    ap.add_argument("--faults-from", type=Path, help="fault rows (JSON lines) instead of running the tests")
    ap.add_argument("--attacks-from", type=Path, help="attack rows (JSON lines) instead of running the tests")
    ap.add_argument("--load-from", type=Path, help="benchmarks/load.py JSON output instead of running it")
    ap.add_argument("--no-load", action="store_true", help="leave the load figures out")
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "robustness.md"), help="output file, - for stdout")
    args = ap.parse_args()

    bad_status = fault_status = load_status = None
    if args.bad_input_from:
        bad_rows = _read_rows(args.bad_input_from)
    else:
        bad_rows, bad_status = _rows_from_pytest("tests/registry/test_bad_input.py", "DOCKET_BAD_INPUT_RESULTS", [])
    if args.faults_from:
        fault_rows = _read_rows(args.faults_from)
    else:
        fault_rows, fault_status = _rows_from_pytest("tests/e2e/test_faults.py", "DOCKET_ROBUSTNESS_RESULTS", [])
    attack_status = None
    if args.attacks_from:
        attack_rows = _read_rows(args.attacks_from)
    else:
        attack_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*/test_attack_*.py"))
        attack_rows, attack_status = _rows_from_pytest(attack_files, "DOCKET_ATTACK_RESULTS", [])
    load: dict | None = None
    if args.load_from:
        load = json.loads(args.load_from.read_text())
    elif not args.no_load:
        load, load_status = run_load([])

    text = render_bad_input(bad_rows, bad_status).replace(
        "# Robustness: bad input and what the registry and client answer",
        "# Robustness: bad input, faults and load\n\n"
        "Generated by `scripts/robustness_table.py`; sections: bad input, faults, attacks, load.\n\n## Bad input", 1).replace(
        "Generated by `scripts/bad_input_table.py` from "
        "`tests/registry/test_bad_input.py`.",
        "From `tests/registry/test_bad_input.py`.", 1)
    text += ("\n" + render_faults(fault_rows, fault_status) + "\n" + render_attacks(attack_rows, attack_status)
             + "\n" + render_load(load, load_status))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({len(bad_rows)} bad-input cases, {len(fault_rows)} fault rows, "
              f"load {'yes' if load else 'no'})", file=sys.stderr)
    return max(bad_status or 0, fault_status or 0, attack_status or 0, load_status or 0)


if __name__ == "__main__":
    sys.exit(main())
