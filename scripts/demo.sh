#!/usr/bin/env bash
# The first set-up command: install what Docket needs, bring up docket-registry with its own opentracker,
# then show a push and a pull of a small image built offline. The registry keeps running until Ctrl-C
# (DEMO_EXIT=1 stops it right after the demo). Ports: DOCKET_PORT (8000), DOCKET_TRACKER_PORT (6969).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${DOCKET_PORT:-8000}
TRACKER_PORT=${DOCKET_TRACKER_PORT:-6969}
DEMO_DIR=${DEMO_DIR:-$(mktemp -d /tmp/docket-demo.XXXXXX)}
mkdir -p "$DEMO_DIR"
REF=docket-demo/hello:v1

scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
unset DOCKET_DOCKERD_PID  # set below only if this script starts a dockerd: never stop one it did not start
eval "$(DOCKET_DOCKERD_DIR="$DEMO_DIR/dockerd" scripts/dockerd.sh)"

registry_pid=""
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null || true
  [ -n "${DOCKET_DOCKERD_PID:-}" ] && kill "$DOCKET_DOCKERD_PID" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> starting docket-registry on http://127.0.0.1:$PORT (tracker on 127.0.0.1:$TRACKER_PORT), data in $DEMO_DIR/registry"
docket-registry --port "$PORT" --bind 127.0.0.1 --advertise-address 127.0.0.1 --tracker-port "$TRACKER_PORT" \
  --location "$DEMO_DIR/registry" --log-level INFO >"$DEMO_DIR/registry.log" 2>&1 </dev/null &
registry_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$registry_pid" 2>/dev/null || { echo "docket-registry exited:" >&2; tail -n 20 "$DEMO_DIR/registry.log" >&2; exit 1; }
  sleep 0.2
done

echo "==> building $REF offline (FROM scratch + busybox-static)"
ctx="$DEMO_DIR/context"; mkdir -p "$ctx"
cp /bin/busybox "$ctx/busybox"
head -c $((8 * 1024 * 1024)) /dev/urandom >"$ctx/payload.bin"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nCOPY payload.bin /payload.bin\nCMD ["/bin/busybox", "echo", "hello from a docket pull"]\n' >"$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$REF" "$ctx" >/dev/null

export DOCKET_HOST=http://127.0.0.1 DOCKET_PORT="$PORT" DOCKET_LOCATION="$DEMO_DIR/client"
echo "==> docket push $REF"
docket push "$REF"
echo "==> docket images"
docket images
echo "==> docker rmi $REF   (as if this were a fresh host)"
docker rmi -f "$REF" >/dev/null
echo "==> docket pull $REF   (through BitTorrent)"
docket pull --seed-time 0 "$REF"
echo "==> docker run $REF"
docker run --rm --network none "$REF"
echo "==> docker pull 127.0.0.1:$PORT/$REF   (the same image through the standard registry API)"
docker pull -q "127.0.0.1:$PORT/$REF"
docker rmi -f "127.0.0.1:$PORT/$REF" >/dev/null
echo "==> the web page: http://127.0.0.1:$PORT/   (repositories, layers and their swarms, health, hosts)"
curl -fsS "http://127.0.0.1:$PORT/" -o "$DEMO_DIR/page.html"
grep -q "${REF%%:*}" "$DEMO_DIR/page.html" || { echo "the web page does not list ${REF%%:*}" >&2; exit 1; }
echo "==> the metrics: http://127.0.0.1:$PORT/metrics   (Prometheus text format; a few of them:)"
curl -fsS "http://127.0.0.1:$PORT/metrics" -o "$DEMO_DIR/metrics.txt"
grep -E '^docket_(pushes_total|pulls_total|blobs_stored|seeders_running)' "$DEMO_DIR/metrics.txt" \
  || { echo "the metrics lack docket_pushes_total" >&2; exit 1; }

if [ "${DEMO_EXIT:-0}" = "1" ]; then
  echo "==> demo done; stopping the registry"
  exit 0
fi
echo "==> the registry is running at http://127.0.0.1:$PORT - try: DOCKET_PORT=$PORT .venv/bin/docket images"
echo "    web page: http://127.0.0.1:$PORT/   metrics: http://127.0.0.1:$PORT/metrics"
echo "    press Ctrl-C to stop it (log: $DEMO_DIR/registry.log)"
wait "$registry_pid"
