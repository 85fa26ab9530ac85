#!/usr/bin/env bash
# Start a private dockerd (no systemd needed) unless one already answers.
# Prints the DOCKER_HOST to use on stdout; the daemon's pid is in $DOCKET_DOCKERD_DIR/pid.
#   eval "$(scripts/dockerd.sh)"     # exports DOCKER_HOST
set -euo pipefail
if [ -n "${DOCKER_HOST:-}" ] && docker -H "$DOCKER_HOST" version >/dev/null 2>&1; then
  echo "export DOCKER_HOST=$DOCKER_HOST"; exit 0
fi
if [ -S /var/run/docker.sock ] && docker -H unix:///var/run/docker.sock version >/dev/null 2>&1; then
  echo "export DOCKER_HOST=unix:///var/run/docker.sock"; exit 0
fi
dir=${DOCKET_DOCKERD_DIR:-/tmp/docket-dockerd}
mkdir -p "$dir"
host="unix://$dir/docker.sock"
dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/pid" --host "$host" \
  --bridge=none --iptables=false --ip-masq=false >"$dir/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
  if docker -H "$host" version >/dev/null 2>&1; then
    echo "export DOCKER_HOST=$host DOCKET_DOCKERD_PID=$(cat "$dir/pid")"; exit 0
  fi
  sleep 0.5
done
echo "dockerd did not start; see $dir/dockerd.log" >&2
tail -n 20 "$dir/dockerd.log" >&2
exit 1
