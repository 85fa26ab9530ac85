"""Slow clients: many half-open and trickling connections while normal requests must still be answered fast.

    .venv/bin/python benchmarks/slow_clients.py [--slow 200] [--duration 60] [--interval 0.25] [--threads 16]

Starts a real docket-registry (defaults, managed opentracker, real ctorrent seeders) on free loopback ports and
keeps SLOW slow connections open for DURATION seconds, reopening each one the server closes (as an attacker would),
in four equal groups:

* ``head-silent``: part of a request line, then nothing;
* ``head-trickle``: a request line that never ends, one byte a second;
* ``body-post``: ``POST /api/v1/blobs`` announcing 1 MiB, whose body then comes one byte a second;
* ``body-v2``: a /v2 monolithic blob upload (``POST .../blobs/uploads/?digest=``), the same way.

Meanwhile four clients each make one request every INTERVAL seconds on a new connection: ``GET /api/v1/images``,
``GET /v2/_catalog``, a small blob ``GET`` and a small push (``PUT /api/v1/repositories/...``). Prints, as JSON,
their latency p50/p99/max and errors, how many slow connections the server closed (and after how long, with which
answer), the peak number of registry threads, and what was left in the upload directory. Loopback only; stops by
itself; removes what it made.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.support.procs import free_port, stop_process, wait_until  # noqa: E402
from tests.support.registry_images import build_image_tar  # noqa: E402

KINDS = ("head-silent", "head-trickle", "body-post", "body-v2")
BODY_BYTES = 1024 * 1024
FAKE_DIGEST = "sha256:" + "ab" * 32


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def opening(kind: str) -> bytes:
    """What a slow connection of ``kind`` sends at once."""
    if kind == "head-silent":
        return b"GET /api/v1/ima"
    if kind == "head-trickle":
        return b"GET /api/v1/images?x="
    target = ("/api/v1/blobs?kind=layer" if kind == "body-post"
              else f"/v2/slow/clients/blobs/uploads/?digest={FAKE_DIGEST}")
    return (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {BODY_BYTES}\r\n\r\n").encode()


@dataclass
class Slow:
    kind: str
    sock: socket.socket
    opened: float
    next_byte: float
    answer: bytes = b""


@dataclass
class Attack:
    """SLOW slow connections held open (reopened when the server closes one) until ``stop`` is set."""

    host: str
    port: int
    count: int
    stop: threading.Event = field(default_factory=threading.Event)
    opened: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    closed_after: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    answers: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {} for k in KINDS})
    open_failures: int = 0
    first_close: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def _open(self, kind: str) -> Slow | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=5)
            sock.sendall(opening(kind))
            sock.setblocking(False)
        except OSError:
            self.open_failures += 1
            return None
        self.opened[kind] += 1
        now = time.monotonic()
        return Slow(kind, sock, now, now + 1.0)

    def _closed(self, slow: Slow, now: float) -> None:
        self.closed_after[slow.kind].append(now - slow.opened)
        self.first_close.setdefault(slow.kind, now - self.started)
        status = slow.answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "none"
        self.answers[slow.kind][status] = self.answers[slow.kind].get(status, 0) + 1
        slow.sock.close()

    def _alive(self, slow: Slow, now: float) -> bool:
        """Read what the server sent; False once it closed the connection."""
        try:
            while True:
                data = slow.sock.recv(65536)
                if not data:
                    return False
                slow.answer += data
        except BlockingIOError:
            pass
        except OSError:
            return False
        if now >= slow.next_byte and slow.kind != "head-silent":
            slow.next_byte += 1.0
            try:
                slow.sock.send(b"a")
            except BlockingIOError:
                pass
            except OSError as exc:
                return exc.errno not in (errno.EPIPE, errno.ECONNRESET)
        return True

    def run(self) -> None:
        self.started = time.monotonic()
        conns = [c for c in (self._open(KINDS[i % len(KINDS)]) for i in range(self.count)) if c is not None]
        try:
            while not self.stop.wait(0.1):
                now = time.monotonic()
                keep = []
                for slow in conns:
                    if self._alive(slow, now):
                        keep.append(slow)
                        continue
                    self._closed(slow, now)
                    again = self._open(slow.kind)
                    if again is not None:
                        keep.append(again)
                conns = keep
        finally:
            for slow in conns:
                slow.sock.close()

    def summary(self) -> dict:
        out = {}
        for kind in KINDS:
            after = self.closed_after[kind]
            out[kind] = {
                "opened": self.opened[kind], "closed_by_server": len(after),
                "first_close_s": round(self.first_close[kind], 1) if kind in self.first_close else None,
                "closed_after_s_p50": round(statistics.median(after), 1) if after else None,
                "closed_after_s_max": round(max(after), 1) if after else None,
                "answers": self.answers[kind],
            }
        out["open_failures"] = self.open_failures
        return out


def _threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(slow: int = 200, duration: float = 60.0, interval: float = 0.25, threads: int = 16,
        registry_args: tuple[str, ...] = (), workdir: Path | None = None) -> dict:
    own = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="docket-slow-"))
    port, tport = free_port(), free_port()
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "docket.registry.cli", "--port", str(port), "--bind", "127.0.0.1",
         "--advertise-address", "127.0.0.1", "--tracker-port", str(tport), "--location", str(workdir / "reg"),
         "--threads", str(threads), "--log-level", "info", *registry_args],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).ok, timeout=60, what="registry")
        blob = os.urandom(64 * 1024)
        resp = requests.post(f"{url}/api/v1/blobs?kind=layer", data=blob, timeout=60,
                             headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code in (200, 201), resp.text
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        tarball = workdir / "small.tar"
        build_image_tar(tarball, payload=os.urandom(32 * 1024), repo_tag="bench/small:v1")
        small = tarball.read_bytes()

        samples: dict[str, list[float]] = {k: [] for k in ("images", "catalog", "blob", "push")}
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def one(kind: str, n: int) -> None:
            if kind == "images":
                r = requests.get(f"{url}/api/v1/images", timeout=10)
                ok = r.status_code == 200
            elif kind == "catalog":
                r = requests.get(f"{url}/v2/_catalog", timeout=10)
                ok = r.status_code == 200
            elif kind == "blob":
                r = requests.get(f"{url}/api/v1/blobs/{digest}", timeout=10)
                ok = r.status_code == 200 and r.content == blob
            else:
                r = requests.put(f"{url}/api/v1/repositories/bench/small/tags/t{n}", data=small, timeout=10,
                                 headers={"Content-Type": "application/x-tar"})
                ok = r.status_code == 201
            if not ok:
                raise RuntimeError(f"HTTP {r.status_code} {r.text[:120]}")

        def client(kind: str) -> None:
            n = 0
            next_at = time.monotonic()
            while not stop.is_set():
                n += 1
                start = time.monotonic()
                problem = None
                try:
                    one(kind, n)
                except (requests.RequestException, RuntimeError) as exc:
                    problem = f"{kind} at {start - began:.1f}s: {exc}"
                with lock:
                    samples[kind].append(time.monotonic() - start)
                    if problem:
                        errors.append(problem)
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))

        attack = Attack("127.0.0.1", port, slow)
        began = time.monotonic()
        attacker = threading.Thread(target=attack.run, name="attack")
        attacker.start()
        time.sleep(min(2.0, duration / 10))  # the slow connections are in place before measuring
        clients = [threading.Thread(target=client, args=(k,), name=k) for k in samples]
        for t in clients:
            t.start()
        peak_threads = 0
        while time.monotonic() - began < duration:
            peak_threads = max(peak_threads, _threads(proc.pid))
            time.sleep(0.5)
        stop.set()
        attack.stop.set()
        for t in [*clients, attacker]:
            t.join()
        time.sleep(1.0)
        all_lat = [x for v in samples.values() for x in v]
        leftovers = sorted(p.name for p in (workdir / "reg" / "uploads").rglob("*") if p.is_file()) \
            if (workdir / "reg" / "uploads").exists() else []
        return {
            "slow_connections": slow, "duration_s": duration, "interval_s": interval, "threads": threads,
            "registry_args": list(registry_args),
            "requests": {k: {"n": len(v), "p50_ms": round(statistics.median(v) * 1000, 1),
                             "p99_ms": round(percentile(v, 0.99) * 1000, 1), "max_ms": round(max(v) * 1000, 1)}
                         for k, v in samples.items() if v},
            "all_max_ms": round(max(all_lat) * 1000, 1) if all_lat else None,
            "over_1s": sum(1 for x in all_lat if x > 1.0),
            "errors": errors[:20], "error_count": len(errors),
            "slow": attack.summary(),
            "registry_threads_peak": peak_threads,
            "registry_threads_after": _threads(proc.pid),
            "upload_leftovers": leftovers,
            "healthz_after": requests.get(f"{url}/healthz", timeout=10).status_code,
        }
    finally:
        stop_process(proc, timeout=60)
        log.close()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", type=int, default=200, help="slow connections held open (at most 1000)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (at most 600)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between each client's requests")
    parser.add_argument("--threads", type=int, default=16, help="the registry's --threads")
    parser.add_argument("--registry-arg", action="append", default=[],
                        help="extra docket-registry argument (repeatable), e.g. --registry-arg=--body-timeout=10")
    args = parser.parse_args()
    if not 1 <= args.slow <= 1000 or not 1 <= args.duration <= 600 or args.interval < 0.05:
        parser.error("--slow 1..1000, --duration 1..600 s, --interval >= 0.05 s")
    print(json.dumps(run(args.slow, args.duration, args.interval, args.threads, tuple(args.registry_arg)),
                     indent=2))


if __name__ == "__main__":
    main()
