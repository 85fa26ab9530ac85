#!/usr/bin/env bash
# Idempotent set-up of a Debian/Ubuntu machine for Docket: system packages and a virtualenv in .venv.
# containerd is a dependency of docker.io already; it is named because tests run it on its own (ctr pulls).
# Used by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

packages=(docker.io docker-compose ctorrent opentracker busybox-static iproute2 curl skopeo python3 python3-venv python3-pip
          containerd systemd   # containerd (ctr) and systemd (systemd-analyze): the deploy/ files checked with them
          chromium chromium-driver   # the web page's browser test (tests/e2e/test_web_page.py, Selenium)
          postgresql haproxy)  # registry tests on PostgreSQL, several instances behind HAProxy (tests/support/postgres.py)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing docket and its test extras into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
