"""Layer distribution benchmark: what a new image version costs when only its app layer changed.

One command (needs a dockerd reachable through DOCKER_HOST, ctorrent, opentracker; root for opentracker):

    python benchmarks/layers.py [--base-mib 200] [--app-mib 8] [--keep]

It starts its own docket-registry (free ports, temporary location), builds base (busybox + BASE MiB),
v1 = base + APP MiB app layer, v2 = base + another APP MiB app layer, pushes v1 then v2 and reports the bytes
v2's push uploaded (target <= 1.1 x APP MiB); removes the three images locally and pulls v1 then v2 as a
"second host" (own --location, DOCKET_PEER_IP) and reports the bytes v2's pull transferred (target <= 1.1 x APP
MiB); and checks that the registry stores the shared base once (its blobs directory against the sum of both
images' sizes). It prints a table and removes everything it made (images, registry, temp dirs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker
import requests

MIB = 1024 * 1024
PEER_IP = "127.0.0.41"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="docket-layers-bench-"))
        self.client = docker.from_env(timeout=600)
        self.registry: subprocess.Popen | None = None
        self.port = free_port()
        self.tracker_port = free_port()
        name = f"docket-bench/{uuid.uuid4().hex[:8]}"
        self.base, self.v1, self.v2 = f"{name}-base:1", f"{name}:v1", f"{name}:v2"
        self.rows: list[tuple[str, str, str, str]] = []
        self.ok = True

    # -- plumbing -------------------------------------------------------------------------------------------
    def start_registry(self) -> None:
        log = open(self.tmp / "registry.log", "ab")  # noqa: SIM115 - closed at exit with the process
        self.registry = subprocess.Popen(
            [sys.executable, "-m", "docket.registry.cli", "--port", str(self.port), "--bind", "127.0.0.1",
             "--location", str(self.tmp / "registry"), "--advertise-address", "127.0.0.1",
             "--tracker-port", str(self.tracker_port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.registry.poll() is not None:
                raise SystemExit(f"registry exited; see {self.tmp / 'registry.log'}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit("registry did not become healthy in 60 s")

    def docket(self, *args: str, location: Path, peer_ip: str | None = None) -> dict:
        env = dict(os.environ)
        if peer_ip:
            env["DOCKET_PEER_IP"] = peer_ip
        cmd = [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port", str(self.port),
               "--location", str(location), *args]
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return json.loads(res.stdout)

    def build(self) -> None:
        ctx = self.tmp / "ctx"
        ctx.mkdir()
        shutil.copy("/bin/busybox", ctx / "busybox")
        with open(ctx / "base.bin", "wb") as f:
            for _ in range(self.args.base_mib):
                f.write(os.urandom(MIB))
        (ctx / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\nCOPY base.bin /base.bin\n'
                                        'ENTRYPOINT ["/bin/busybox"]\n')
        self.client.images.build(path=str(ctx), tag=self.base, rm=True, forcerm=True)
        shutil.rmtree(ctx)
        for ref in (self.v1, self.v2):
            ctx = self.tmp / "ctx"
            ctx.mkdir()
            (ctx / "app.bin").write_bytes(os.urandom(self.args.app_mib * MIB))
            (ctx / "Dockerfile").write_text(f"FROM {self.base}\nCOPY app.bin /app.bin\n")
            self.client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True)
            shutil.rmtree(ctx)

    def remove_images(self) -> None:
        for ref in (self.v1, self.v2, self.base):
            try:
                self.client.images.remove(ref, force=True)
            except docker.errors.ImageNotFound:
                pass

    def row(self, what: str, value: int, target: int | None, seconds: float | None = None) -> None:
        verdict = ""
        if target is not None:
            good = value <= target
            self.ok &= good
            verdict = f"{'OK' if good else 'FAIL'} (<= {target / MIB:.2f} MiB)"
        self.rows.append((what, f"{value / MIB:10.2f} MiB", f"{seconds:.1f} s" if seconds is not None else "",
                          verdict))

    # -- the measurement ------------------------------------------------------------------------------------
    def run(self) -> int:
        app = self.args.app_mib * MIB
        target = int(1.1 * app)
        self.start_registry()
        self.build()
        ids = {ref: self.client.images.get(ref).id for ref in (self.v1, self.v2)}
        loc = self.tmp / "host1"
        p1 = self.docket("push", "--json", self.v1, location=loc)
        self.row("push v1: uploaded", p1["bytes_uploaded"], None, p1["seconds"])
        p2 = self.docket("push", "--json", self.v2, location=loc)
        self.row("push v2: uploaded", p2["bytes_uploaded"], target, p2["seconds"])
        self.row("push v2: skipped (already there)", p2["bytes_skipped"], None)

        records = {r["ref"]: r for r in requests.get(f"http://127.0.0.1:{self.port}/api/v1/images",
                                                     timeout=30).json()["images"]}
        total = records[self.v1]["size"] + records[self.v2]["size"]
        stored = dir_size(self.tmp / "registry" / "blobs")
        self.row("registry: sum of v1+v2 image sizes", total, None)
        self.row("registry: blobs stored on disk", stored, int(total - records[self.v1]["size"] + 1.1 * app))

        self.remove_images()
        host2 = self.tmp / "host2"
        s1 = self.docket("pull", "--json", "--seed-time", "0", self.v1, location=host2, peer_ip=PEER_IP)
        self.row("pull v1: transferred", s1["bytes_from_peers"] + s1["bytes_from_registry"], None, s1["seconds"])
        s2 = self.docket("pull", "--json", "--seed-time", "0", self.v2, location=host2, peer_ip=PEER_IP)
        self.row("pull v2: transferred", s2["bytes_from_peers"] + s2["bytes_from_registry"], target, s2["seconds"])
        self.row("pull v2: already present", s2["bytes_present"], None)
        for ref, s in ((self.v1, s1), (self.v2, s2)):
            if self.client.images.get(ref).id != ids[ref]:
                print(f"FAIL: {ref} loaded with another id", file=sys.stderr)
                self.ok = False
        out = self.client.containers.run(self.v2, ["ls", "/app.bin"], remove=True, network_mode="none")
        self.ok &= out.strip() == b"/app.bin"

        width = max(len(r[0]) for r in self.rows)
        print(f"\nLayer benchmark: base {self.args.base_mib} MiB, app layer {self.args.app_mib} MiB")
        print(f"{'measure':<{width}}  {'bytes':>14}  {'time':>7}  verdict")
        for what, value, secs, verdict in self.rows:
            print(f"{what:<{width}}  {value:>14}  {secs:>7}  {verdict}")
        print("RESULT:", "all targets met" if self.ok else "a target was missed")
        return 0 if self.ok else 1

    def cleanup(self) -> None:
        self.remove_images()
        if self.registry is not None and self.registry.poll() is None:
            self.registry.send_signal(signal.SIGTERM)
            try:
                self.registry.wait(30)
            except subprocess.TimeoutExpired:
                self.registry.kill()
                self.registry.wait()
        self.client.close()
        if self.args.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-mib", type=int, default=200)
    p.add_argument("--app-mib", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, registry, caches)")
    bench = Bench(p.parse_args(argv))
    try:
        return bench.run()
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
