#!/usr/bin/env bash
# The test command: set up this machine (packages, .venv) and run the whole suite against real
# dockerd, ctorrent and opentracker. Extra arguments go to pytest, e.g. scripts/test.sh -k e2e
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
