#!/usr/bin/env bash
# The test command: set up this machine (packages, .venv) and run the whole suite against real
# dockerd, ctorrent and opentracker. Extra arguments go to pytest, e.g. scripts/test.sh -k e2e, or
# scripts/test.sh tests/registry for one area (tests/registry, tests/client, tests/torrent, tests/e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Three workers, one test module each at a time (--dist loadfile keeps a module's fixtures in one process): most
# tests wait on real processes and timeouts, so on 2 cores three workers beat two (931 tests: 903 s -> 629 s,
# 2026-12-01). DOCKET_TEST_WORKERS=0
# runs everything in this process; later arguments (e.g. -n 0) override these.
exec .venv/bin/python -m pytest -ra -n "${DOCKET_TEST_WORKERS:-3}" --dist loadfile --durations=25 "$@"
