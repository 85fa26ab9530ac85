"""Single-host push/pull throughput and peak memory of docket against plain `docker save` / `docker load`.

    sudo .venv/bin/python benchmarks/throughput.py --size-mib 1024

Needs a Docker daemon (DOCKER_HOST) and ctorrent/opentracker. Builds an image of SIZE MiB offline
(busybox + random data), starts a real docket-registry on free loopback ports, then times in one run:
`docker save > /dev/null`, `docker save -o` (into a new file: the export plus storing it once), `docket push`,
`docket pull --no-load` (the BitTorrent transfer + sha256 check),
`docker load` of the same tarball, and `docket pull` (transfer + load). Prints the ratios and the peak RSS of
the client and the registry; with --cpu-profile also the cores dockerd and the registry use during the save and
the push. Removes everything it made.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.procs import free_port, wait_until  # noqa: E402

LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, s, r = os.wait4(p.pid, 0); print(r.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))")


def timed(args: list[str], **kw) -> tuple[float, int]:
    """(seconds, peak RSS KiB of the command alone)."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *args], check=True, capture_output=True, text=True, **kw)
    return time.monotonic() - start, int(out.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that ended (0 once it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """--cpu-profile: every 0.25 s, cores busy machine-wide and used by each watched process (pids by name)."""

    def __init__(self, label: str, pids: dict[str, int]) -> None:
        self.label, self.pids, self.rows = label, pids, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    @staticmethod
    def _busy() -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rows.append((time.monotonic() - self._t0, self._busy(),
                              {k: cpu_seconds(pid) for k, pid in self.pids.items()}))
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        print(f"{self.label}: cores used per 0.5 s (machine; " + ", ".join(self.pids) + ")", file=sys.stderr)
        prev = self.rows[0]
        for row in self.rows[2::2]:
            dt = row[0] - prev[0]
            each = " ".join(f"{k} {(row[2][k] - prev[2][k]) / dt:4.2f}" for k in self.pids)
            print(f"  {row[0]:5.2f} s  busy {(row[1] - prev[1]) / dt:4.2f}  {each}", file=sys.stderr)
            prev = row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--cpu-profile", action="store_true",
                        help="print the cores used by dockerd and the registry during save and push (stderr); "
                             "dockerd's pid is read from $DOCKET_DOCKERD_PID")
    opts = parser.parse_args()
    import docker

    client = docker.from_env(timeout=1200)
    work = Path(tempfile.mkdtemp(prefix="docket-bench-"))
    ref = f"docket-bench/throughput:{opts.size_mib}m"
    registry = None
    try:
        ctx = work / "ctx"
        ctx.mkdir()
        shutil.copy("/bin/busybox", ctx / "busybox")
        with open(ctx / "data.bin", "wb") as f:
            for _ in range(opts.size_mib):
                f.write(os.urandom(1024 * 1024))
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\nCOPY data.bin /data.bin\n")
        client.images.build(path=str(ctx), tag=ref, rm=True)
        shutil.rmtree(ctx)

        port, tport = free_port(), free_port()
        log = open(work / "registry.log", "wb")
        registry = subprocess.Popen(
            [sys.executable, "-m", "docket.registry.cli", "--port", str(port), "--bind", "127.0.0.1",
             "--advertise-address", "127.0.0.1", "--tracker-port", str(tport), "--location", str(work / "reg")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        import requests

        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok, timeout=60)
        cli = [sys.executable, "-m", "docket.client.cli", "--quiet", "--port", str(port)]
        env = {**os.environ, "DOCKET_PEER_IP": "127.0.0.77"}

        tar = work / "image.tar"
        # os.sync() before each step: no step pays for writing back the dirty pages of the one before
        watch = {"registry": registry.pid}
        if os.environ.get("DOCKET_DOCKERD_PID", "").isdigit():
            watch["dockerd"] = int(os.environ["DOCKET_DOCKERD_PID"])
        os.sync()
        sampler = CpuSampler("docker save > /dev/null", watch) if opts.cpu_profile else None
        save_null_s, _ = timed(["sh", "-c", 'exec docker save "$0" > /dev/null', ref])
        if sampler:
            sampler.stop()
        os.sync()
        sampler = CpuSampler("docket push", watch) if opts.cpu_profile else None
        push_s, push_rss = timed([*cli, "--location", str(work / "c1"), "push", ref], env=env)
        if sampler:
            sampler.stop()
        os.sync()
        save_s, _ = timed(["docker", "save", "-o", str(tar), ref])  # to a file: the load baseline needs it
        os.sync()
        pull_noload_s, pull_rss = timed([*cli, "--location", str(work / "c2"), "pull", "--no-load", "--seed-time",
                                          "0", ref], env=env)
        client.images.remove(ref, force=True)
        os.sync()
        load_s, _ = timed(["docker", "load", "-i", str(tar)])
        client.images.remove(ref, force=True)
        os.sync()
        pull_s, pull_load_rss = timed([*cli, "--location", str(work / "c3"), "pull", "--seed-time", "0", ref],
                                      env=env)
        status = Path(f"/proc/{registry.pid}/status").read_text()
        registry_rss = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
        size = tar.stat().st_size
        result = {
            "image_bytes": size,
            "docker_save_to_devnull_s": round(save_null_s, 2),
            # `docker save -o` into a new file on the registry's disk: the same export, plus storing it once
            "docker_save_to_file_s": round(save_s, 2),
            "docket_push_s": round(push_s, 2),
            "push_over_save": round(push_s / save_null_s, 2),
            "push_over_save_to_file": round(push_s / save_s, 2),
            "docket_pull_no_load_s": round(pull_noload_s, 2),
            "docker_load_s": round(load_s, 2),
            "docket_pull_s": round(pull_s, 2),
            "pull_over_load_plus_transfer": round(pull_s / (load_s + pull_noload_s), 2),
            "peak_rss_mib": {"push": round(push_rss / 1024, 1), "pull_no_load": round(pull_rss / 1024, 1),
                             "pull": round(pull_load_rss / 1024, 1), "registry": round(registry_rss / 1024, 1)},
        }
        print(json.dumps(result, indent=2))
    finally:
        if registry is not None:
            registry.terminate()
            registry.wait(60)
        try:
            client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
