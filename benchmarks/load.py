"""Load: concurrent `images` listings while pushes run against a real docket-registry.

    .venv/bin/python benchmarks/load.py [--readers 50] [--requests-each 10] [--pushes 4] [--push-mib 32]

Starts docket-registry (cheroot, managed opentracker, real ctorrent seeders) on free loopback ports, then at
once: PUSHES threads each push a distinct generated image tarball of PUSH_MIB MiB, and READERS threads each send
REQUESTS_EACH `GET /api/v1/images`. Prints errors, p50/p99/max latency of the listings, and push times as JSON.
`run()` is also used by tests/e2e/test_load.py with a small configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.support.procs import free_port, stop_process, wait_until  # noqa: E402
from tests.support.registry_images import build_image_tar  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(readers: int = 50, requests_each: int = 10, pushes: int = 4, push_mib: int = 32,
        workdir: Path | None = None) -> dict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="docket-load-"))
    port, tport = free_port(), free_port()
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "docket.registry.cli", "--port", str(port), "--bind", "127.0.0.1",
         "--advertise-address", "127.0.0.1", "--tracker-port", str(tport), "--location", str(workdir / "reg"),
         "--threads", "64", "--log-level", "info"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).ok, timeout=60, what="registry")
        tarballs = []
        for i in range(pushes):
            path = workdir / f"image{i}.tar"
            build_image_tar(path, payload=os.urandom(push_mib * 1024 * 1024), repo_tag=f"load/app{i}:v1")
            tarballs.append(path)

        latencies: list[float] = []
        errors: list[str] = []
        push_seconds: list[float] = []
        lock = threading.Lock()
        go = threading.Event()

        def reader() -> None:
            with requests.Session() as s:
                go.wait()
                for _ in range(requests_each):
                    start = time.monotonic()
                    try:
                        resp = s.get(f"{url}/api/v1/images", timeout=30)
                        ok = resp.status_code == 200 and "images" in resp.json()
                        problem = None if ok else f"images: HTTP {resp.status_code}"
                    except requests.RequestException as exc:
                        problem = f"images: {exc}"
                    with lock:
                        latencies.append(time.monotonic() - start)
                        if problem:
                            errors.append(problem)

        def pusher(i: int) -> None:
            go.wait()
            start = time.monotonic()
            try:
                with open(tarballs[i], "rb") as f:
                    resp = requests.put(f"{url}/api/v1/repositories/load/app{i}/tags/v1", data=f,
                                        headers={"Content-Type": "application/x-tar"}, timeout=300)
                problem = None if resp.status_code == 201 else f"push {i}: HTTP {resp.status_code} {resp.text[:200]}"
            except requests.RequestException as exc:
                problem = f"push {i}: {exc}"
            with lock:
                push_seconds.append(time.monotonic() - start)
                if problem:
                    errors.append(problem)

        threads = [threading.Thread(target=pusher, args=(i,)) for i in range(pushes)]
        threads += [threading.Thread(target=reader) for _ in range(readers)]
        for t in threads:
            t.start()
        began = time.monotonic()
        go.set()
        for t in threads:
            t.join()
        listed = requests.get(f"{url}/api/v1/images", timeout=30).json()["images"]
        return {
            "readers": readers, "requests": len(latencies), "pushes": pushes, "push_mib": push_mib,
            "errors": errors, "images_after": len(listed), "wall_s": round(time.monotonic() - began, 2),
            "images_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "images_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "images_max_ms": round(max(latencies) * 1000, 1),
            "push_s": sorted(round(s, 2) for s in push_seconds),
        }
    finally:
        stop_process(proc, timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--requests-each", type=int, default=10)
    parser.add_argument("--pushes", type=int, default=4)
    parser.add_argument("--push-mib", type=int, default=32)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="docket-load-") as tmp:
        result = run(opts.readers, opts.requests_each, opts.pushes, opts.push_mib, Path(tmp))
    print(json.dumps(result, indent=2))
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
