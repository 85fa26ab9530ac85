#!/usr/bin/env bash
# The test command: set up this machine (packages, .venv) and run the whole suite against real
# dockerd, ctorrent, opentracker and PostgreSQL. Extra arguments go to pytest, e.g. scripts/test.sh -k e2e, or
# scripts/test.sh tests/registry for one area (tests/registry, tests/client, tests/torrent, tests/e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One PostgreSQL server for the run (tests/support/postgres.py: initdb in a temporary directory, run as the
# postgres user, a free port); tests make their own databases in it. Stopped and removed on exit. A server of
# your own: DOCKET_TEST_POSTGRES=postgresql+psycopg://USER@HOST:PORT/postgres (a superuser: tests create databases).
if [ -z "${DOCKET_TEST_POSTGRES:-}" ]; then
  pg_env=$(.venv/bin/python -m tests.support.postgres start)  # fails the run when PostgreSQL cannot start
  eval "$pg_env"
  stop_postgres() {
    .venv/bin/python -m tests.support.postgres stop "$DOCKET_TEST_POSTGRES_PID" "$DOCKET_TEST_POSTGRES_DIR"
  }
  trap stop_postgres EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
export DOCKET_TEST_POSTGRES
# Three workers, one test module each at a time (--dist loadfile keeps a module's fixtures in one process): most
# tests wait on real processes and timeouts, so on 2 cores three workers beat two (931 tests: 903 s -> 629 s,
# 2026-12-01). DOCKET_TEST_WORKERS=0
# runs everything in this process; later arguments (e.g. -n 0) override these.
status=0
.venv/bin/python -m pytest -ra -n "${DOCKET_TEST_WORKERS:-3}" --dist loadfile --durations=25 "$@" || status=$?
exit "$status"
