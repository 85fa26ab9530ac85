#!/usr/bin/env python3
"""Swarm benchmark: N hosts pulling one image through Docket (BitTorrent) vs. N hosts downloading it over HTTP.

Builds a simulated network in network namespaces (run as root):

    <prefix><pid>-br     a namespace holding only the Linux bridge ``br0``
    <prefix><pid>-reg    the registry host, 198.18.0.1
    <prefix><pid>-cK     client host K, 198.18.0.11 + K

Every host has one veth into the bridge; its link is shaped in both directions with ``tbf`` (upload = egress of
the host's end, download = egress of the bridge's end), ``--rate-mbit`` each way. Only 198.18.0.0/15 addresses
and loopback are used; nothing is created in the root namespace (the veths are created directly inside the
namespaces), so parallel runs with different pids never collide.

Per N (``--hosts``) and layer count (``--layers``) a fresh image of ``--size-mib`` MiB (equal layers) is pushed (a
synthetic ``docker save`` tarball over HTTP, no dockerd needed), then
  * HTTP:   N hosts run ``curl GET /api/v1/blobs/<digest>`` for every layer at once: time until the last one has
            every blob;
  * docket: N hosts run ``docket pull --no-load --json`` at once, with default flags (no address, no seed time;
            released together from a start barrier after their imports). Three times per round: until the last
            host's image is verified ("ready"), until the last ``docket pull`` returned, and until the last
            background seeder stopped seeding (it seeds on after the pull returned: docket seed).

``--mode`` (a comma list; default ``docket``, the two rounds above) adds the Registry V2 rounds of issue 14, on the
same image: every host runs ``benchmarks/v2pull.py`` (dockerd's order: manifest, config, then the layers three at a
time, each sha256-checked), released together from a start barrier, and the last host done is timed:
  * v2-direct: against the registry's own ``/v2`` (``http://198.18.0.1:8000``): its uplink carries every byte N times;
  * agent:     against a ``docket agent`` started in each host's namespace on 127.0.0.1:5000 with its own empty
               cache (``--peer-ip`` the host's address), answering ``GET /v2/`` before the round starts (not
               counted) and stopped by pid after it; each agent's ``GET /_docket/agent`` accounting is kept.

Everything it created (namespaces, hence veths and bridge; processes it started, and anything still running
inside its namespaces; temp files) is removed at the end, on failure and on Ctrl-C/SIGTERM.

    sudo python benchmarks/swarm.py --hosts 1,4,8,16 --size-mib 64 --rate-mbit 50 --out benchmarks/results
    sudo python benchmarks/swarm.py --mode v2-direct,agent --layers 3 --repeat 3 --workdir /dev/shm \
        --out benchmarks/results/issue14
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.netns import stop_pids  # noqa: E402 - the tests' namespace clean-up, shared
import click  # noqa: E402
from docket.clicktypes import ByteRate  # noqa: E402 - the same parsing as the command lines

NET = ipaddress.ip_network("198.18.0.0/15")
REGISTRY_IP = "198.18.0.1"
FIRST_CLIENT_IP = ipaddress.ip_address("198.18.0.11")
HTTP_PORT = 8000
TRACKER_PORT = 6969
MIB = 1024 * 1024
AGENT_PORT = 5000  # each host's `docket agent` listens on 127.0.0.1:AGENT_PORT inside its namespace
V2PULL = Path(__file__).resolve().parent / "v2pull.py"  # dockerd's pull sequence, run in each host namespace

# Runs inside each client namespace: import everything first, signal readiness, wait for the shared start
# barrier, note the wall-clock start, then run the real `docket` CLI (same process, so no import time counted).
PULL_WRAPPER = r"""
import os, sys, time
ready, go, started = sys.argv[1], sys.argv[2], sys.argv[3]
import docket.client.cli as cli
import docket.client.pull, docket.client.seeding, docket.torrent.ctorrent, docket.torrent.tracker, docket.torrent.metainfo  # noqa
_trace = open(sys.argv[3] + ".trace", "w", buffering=1)  # per-host progress: wall time, then ctorrent's status
_line = docket.torrent.ctorrent.CtorrentProcess._line
def _traced(self, raw, _line=_line):
    _line(self, raw)
    st = docket.torrent.ctorrent.parse_status_line(raw.decode("utf-8", "replace").strip())
    if st is not None:
        _trace.write("%.3f %d %d %d %d %d %.0f %.0f\n" % (time.time(), st.have, st.total, st.seeds, st.leechers,
                                                        st.swarm, st.down_kbps, st.up_kbps))
docket.torrent.ctorrent.CtorrentProcess._line = _traced
if sys.argv[4] != "-":  # --prestart-seeders: this host's background seeder up (attached to us) before the barrier
    import pathlib
    from docket.client.background import Handoff
    _handoff = Handoff(pathlib.Path(sys.argv[4]))
    _handoff.attach()
    _until = time.monotonic() + 120
    while not _handoff.files.running() and time.monotonic() < _until:
        time.sleep(0.05)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
with open(started, "w") as f:
    f.write(repr(time.time()))
cli.main(sys.argv[5:])
"""


@dataclass
class Config:
    hosts: list[int]
    size_mib: float = 64.0
    rate_mbit: float = 50.0
    queue_ms: float = 100.0  # tbf latency: the most queueing delay a link adds
    seed_time: float | None = None  # docket pull --seed-time; None: its default
    layers: list[int] = field(default_factory=lambda: [1])  # layer counts: a round per N and layer count
    out: Path = Path("benchmarks/results")
    prefix: str = "dkbench"
    timeout: float = 900.0
    workdir: Path | None = None  # parent of the temp directory
    keep: bool = False
    skip_http: bool = False
    plot: bool = True
    ctorrent_args: str = ""  # $DOCKET_CTORRENT_ARGS for the registry's seeders and every pull's ctorrent
    pull_args: list[str] = field(default_factory=list)  # extra `docket pull` flags (e.g. --wait); none by default
    repeat: int = 1  # rounds per N
    # What each round measures: "docket" (curl over HTTP unless skip_http, then `docket pull`: the default),
    # "v2-direct" (every host pulls as dockerd would from the registry's /v2), "agent" (the same through a
    # `docket agent` in every host's namespace). A comma list runs several on the same image each round.
    modes: list[str] = field(default_factory=lambda: ["docket"])
    # issue 15: bandwidth limits (bytes/s) on one host, checked against its link counter (``limit_check``)
    limit_host_download: int | None = None  # `docket pull --max-download-rate` on the first client only
    limit_host_upload: int | None = None  # `docket pull --max-upload-rate` on the first client only
    registry_max_upload_rate: int | None = None  # `docket-registry --max-upload-rate`
    # issue 16: start each host's background seeder (a Python process; `docket pull` starts it as its download
    # begins) before the start barrier, as the pulls' own Python start-up is: N of them at once on this machine's
    # 2 cores delay the downloads, which a real host with its own cores would not see
    prestart_seeders: bool = False
    replot: Path | None = None  # only the plots again, from this results.json


@dataclass
class HostResult:
    host: str
    ok: bool
    seconds: float  # this host's own transfer time (docket: its --json "seconds"; http: curl time_total)
    done_at: float  # seconds from the round's start until this host had the verified blob(s): "ready"
    returned_at: float = 0.0  # docket: until its `docket pull` returned
    seeding_stopped_at: float | None = None  # docket: until its background seeder stopped its last blob
    seeder_exited_at: float | None = None  # docket: until its background seeder ended
    bytes: int = 0
    sha256_ok: bool = False
    error: str = ""
    # docket only: ctorrent's status as the pull saw it, [s since the round's start, pieces had, pieces total,
    # seeds connected, leechers connected, swarm size, down KB/s, up KB/s]. ctorrent prints it about once a second
    # but not while its loop is idle, and late near the end: for exact timing use `link`.
    progress: list[list[float]] = field(default_factory=list)
    # docket only: the kernel's byte counters of this host's link, every ~0.25 s: [s since the round's start,
    # MB received, MB sent] (wire bytes, headers included): when a host's download ran at the link's rate or stalled
    link: list[list[float]] = field(default_factory=list)
    bytes_over_http: int = 0  # docket: layer bytes its pull fetched over HTTP after falling back (--fallback-after)
    fallback_reason: str = ""  # docket: why it fell back, from --json
    retries: int = 0  # v2 modes: blob downloads v2pull had to retry
    agent: dict = field(default_factory=dict)  # agent mode: the agent's GET /_docket/agent after the round


@dataclass
class RoundResult:
    n: int
    layers: int
    size_bytes: int
    rate_mbit: float
    digest: str
    link_bound_s: float  # size / link rate: the best any single host can do
    http_bound_s: float  # n * size / link rate: the registry's uplink carries every byte n times
    http_s: float | None
    docket_s: float | None  # the last host ready (image verified)
    docket_host_max_s: float | None  # slowest host's own --json seconds
    docket_over_bound: float | None
    http_over_docket: float | None
    all_finished: bool
    http_hosts: list[HostResult] = field(default_factory=list)
    docket_hosts: list[HostResult] = field(default_factory=list)
    docket_all_exited_s: float | None = None  # until every `docket pull` returned
    docket_returned_over_bound: float | None = None
    docket_median_s: float | None = None  # the median host's done_at (the max is set by stragglers)
    seeding_stopped_s: float | None = None  # until every background seeder stopped its last blob
    seeders_exited_s: float | None = None  # until every background seeder ended
    loadavg: list[float] = field(default_factory=list)  # 1-minute load average before the round, after it
    # v2 modes (--mode v2-direct / agent): the last host done (manifest, config and every layer verified)
    v2_direct_s: float | None = None
    v2_direct_median_s: float | None = None
    v2_direct_over_bound: float | None = None
    agent_s: float | None = None
    agent_median_s: float | None = None
    agent_over_bound: float | None = None
    v2_direct_over_agent: float | None = None
    agent_start_s: float | None = None  # how long the N agents took to answer GET /v2/ (not counted in agent_s)
    agent_bytes_from_peers: int | None = None  # the agents' accounting (GET /_docket/agent totals), all hosts
    agent_bytes_from_http: int | None = None  # what the registry served them over HTTP (config, fallbacks)
    v2_direct_hosts: list[HostResult] = field(default_factory=list)
    agent_hosts: list[HostResult] = field(default_factory=list)
    limits: list[dict] = field(default_factory=list)  # limit_check() of each limited host's link (issue 15)
    registry_link: list[list[float]] = field(default_factory=list)  # the registry's link, as HostResult.link
    docket_median_over_bound: float | None = None
    # every host that ended with a verified image, also those that fell back to HTTP (docket_s: None then)
    docket_last_any_s: float | None = None
    docket_fallback_hosts: int = 0  # hosts whose pull fetched layer bytes over HTTP (no swarm progress)
    # the whole LAN at its busiest (aggregate_rate of the docket hosts' links, MB/s wire) against what N links carry
    aggregate_rx_mb_s: float | None = None
    links_capacity_mb_s: float | None = None
    # issue 16: the machine's CPU from the docket round's start barrier to its last host ready (CpuSampler.window:
    # busy_pct of all cores, softirq_pct, steal_pct, groups_cpu_s and groups_pct by process group), and the whole
    # round's series [s, busy %, softirq %, steal %] every ~0.5 s (pulls, then seeding)
    cpu: dict = field(default_factory=dict)
    cpu_series: list[list[float]] = field(default_factory=list)


def limit_check(link: list[list[float]], column: int, limit: int, what: str) -> dict:
    """A host's link counter (``link`` rows [s, MB received, MB sent]; ``column`` 1 or 2) against ``limit``
    bytes/s: the mean rate while it moved (from 5 % to 95 % of its total: the ramp and the tail left out) and
    over its whole transfer (first byte to last), each as a ratio to the limit."""
    rows = [(t, mb * 1e6) for t, *v in link for mb in [v[column - 1]]]
    total = rows[-1][1] if rows else 0.0
    out: dict = {"what": what, "limit_bytes_s": limit, "total_bytes": int(total)}
    if total <= 0:
        return out

    def at(fraction: float) -> float:
        return next(t for t, b in rows if b >= fraction * total)
    t5, t95, t0, t1 = at(0.05), at(0.95), at(0.001), at(1.0)
    if t95 > t5:
        out["steady_bytes_s"] = round(0.9 * total / (t95 - t5))
        out["steady_ratio"] = round(out["steady_bytes_s"] / limit, 3)
    if t1 > t0:
        out["whole_bytes_s"] = round(total / (t1 - t0))
        out["whole_ratio"] = round(out["whole_bytes_s"] / limit, 3)
        out["seconds"] = round(t1 - t0, 2)
    return out


CPU_GROUPS = ("ctorrent", "docket pull (python)", "background seeder (python)", "registry (python)", "opentracker",
              "other in the lab", "benchmark driver", "kernel threads", "outside the benchmark")


class CpuSampler:
    """The machine's CPU use during a round, so a reader can tell this machine's limits from the protocol's.

    Every ``interval`` s: ``/proc/stat`` (all cores: busy = everything but idle and iowait; softirq and steal on
    their own) and every process's utime+stime from ``/proc/<pid>/stat``, summed by group: what runs in the lab's
    namespaces by name (ctorrent, the pulls' and the registry's Python, opentracker), this script and its ``ip``
    children, kernel threads, and everything else on the machine ("outside the benchmark": other people's tests).
    A process that ends between two samples loses at most one interval of its time; network work done in softirq
    context is in the machine's busy figure but in no process's group."""

    def __init__(self, lab: Lab, t0: float, interval: float = 0.5) -> None:
        self.t0, self.interval = t0, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self.me = os.getpid()
        self.ns_kind: dict[int, str] = {}
        for ns in lab.created:
            with contextlib.suppress(OSError):
                kind = "reg" if ns == lab.reg else "br" if ns == lab.br else "client"
                self.ns_kind[os.stat(f"/run/netns/{ns}").st_ino] = kind
        self.group_of: dict[tuple[int, int], str] = {}
        self.comm_of: dict[tuple[int, int], str] = {}
        self.base: dict[tuple[int, int], int] = {}  # ticks when first seen (0 for a process born in the round)
        self.last: dict[tuple[int, int], int] = {}
        self.samples: list[tuple[float, list[int], dict[str, float]]] = []  # (t, /proc/stat fields, group s)
        self._first = True
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _group(self, pid: int, comm: str, ppid: int) -> str:
        if pid == self.me or ppid == self.me and comm == "ip":
            return "benchmark driver"
        if ppid == 2 or pid == 2:
            return "kernel threads"
        try:
            ino = int(os.readlink(f"/proc/{pid}/ns/net").split("[", 1)[1].rstrip("]"))
        except (OSError, IndexError, ValueError):
            return "outside the benchmark"
        kind = self.ns_kind.get(ino)
        if kind is None:
            return "outside the benchmark"
        if comm == "ctorrent":
            return "ctorrent"
        if comm == "opentracker":
            return "opentracker"
        if comm.startswith("python"):
            if kind == "reg":
                return "registry (python)"
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    seeder = b"docket.client.seedd" in f.read()
            except OSError:
                seeder = False
            return "background seeder (python)" if seeder else "docket pull (python)"
        return "other in the lab"

    def _sample(self) -> None:
        t = time.monotonic() - self.t0
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        first = self._first
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            rest = raw[raw.rindex(")") + 2:].split()
            ticks, key = int(rest[11]) + int(rest[12]), (pid, int(rest[19]))
            if key not in self.group_of:
                # existing at the first sample: count from now; born later (during the round): from 0
                self.base[key] = ticks if first else 0
            if self.comm_of.get(key) != comm:  # new, or exec'd since (`ip netns exec`, a fork that became ctorrent)
                self.comm_of[key] = comm
                self.group_of[key] = self._group(pid, comm, int(rest[1]))
            self.last[key] = ticks
        self._first = False
        groups = dict.fromkeys(CPU_GROUPS, 0.0)
        for key, ticks in self.last.items():
            groups[self.group_of[key]] += (ticks - self.base[key]) / self.tick
        self.samples.append((t, cpu, groups))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a sample lost is a coarser series, never a failed round
                self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(Exception):
            self._sample()

    def series(self) -> list[list[float]]:
        """Per interval: [s since the round's start, busy % of all cores, softirq %, steal %]."""
        rows = []
        for (_, a, _g), (t, b, _h) in zip(self.samples, self.samples[1:]):
            d = [y - x for x, y in zip(a, b)]
            total = sum(d[:8]) or 1
            idle = d[3] + d[4]
            rows.append([round(t, 2), round(100 * (total - idle) / total, 1), round(100 * d[6] / total, 1),
                         round(100 * d[7] / total, 1)])
        return rows

    def window(self, until: float) -> dict:
        """From the round's start to the first sample at or after ``until``: busy % of all cores, softirq and
        steal %, and each group's CPU seconds and share of the machine (% of ncpu x window)."""
        if len(self.samples) < 2:
            return {}
        end = next((s for s in self.samples[1:] if s[0] >= until), self.samples[-1])
        (t0, a, g0), (t1, b, g1) = self.samples[0], end
        d = [y - x for x, y in zip(a, b)]
        total = sum(d[:8]) or 1
        span = max(t1 - t0, 1e-6)
        groups = {k: round(g1[k] - g0[k], 2) for k in CPU_GROUPS}
        return {"seconds": round(span, 2), "ncpu": self.ncpu,
                "busy_pct": round(100 * (total - d[3] - d[4]) / total, 1),
                "user_pct": round(100 * (d[0] + d[1]) / total, 1), "system_pct": round(100 * d[2] / total, 1),
                "softirq_pct": round(100 * (d[5] + d[6]) / total, 1), "steal_pct": round(100 * d[7] / total, 1),
                "groups_cpu_s": groups,
                "groups_pct": {k: round(100 * v / (span * self.ncpu), 1) for k, v in groups.items()}}


class LinkSampler:
    """Samples every client's link counters (the bridge ports: tx = the host's download) in a thread."""

    def __init__(self, lab: Lab, n: int, t0: float, interval: float = 0.25) -> None:
        self.lab, self.n, self.t0, self.interval = lab, n, t0, interval
        self.rows: dict[int, list[list[float]]] = {i: [] for i in range(-1, n)}  # -1: the registry
        self.base: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        t = time.monotonic() - self.t0
        try:
            out = subprocess.run(["ip", "-n", self.lab.br, "-s", "-j", "link", "show"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
            links = {d["ifname"]: d["stats64"] for d in json.loads(out) if "stats64" in d}
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            links = {}
        for i in range(-1, self.n):
            st = links.get(f"p{i + 1}")  # p0 is the registry
            if st is None:
                continue
            down, up = st["tx"]["bytes"], st["rx"]["bytes"]
            b = self.base.setdefault(i, (down, up))
            self.rows[i].append([round(t, 2), round((down - b[0]) / 1e6, 2), round((up - b[1]) / 1e6, 2)])

    def stop(self) -> dict[int, list[list[float]]]:
        """Stop sampling, after one last reading: on a busy machine one `ip` call can take longer than a short
        round, and the counters must end with the round's last byte."""
        self._stop.set()
        self._thread.join(10)
        self._sample()
        return self.rows


def aggregate_rate(links: list[list[list[float]]], window: float = 4.0, step: float = 0.5) -> float | None:
    """The best ``window``-s mean of every client's received bytes together (MB/s, wire), from the link rows: how
    much the whole simulated LAN carried at its busiest, to set against N links' capacity and the CPU."""
    import bisect

    def at(rows: list[list[float]], t: float) -> float:
        ts = [r[0] for r in rows]
        i = bisect.bisect_right(ts, t) - 1
        if i < 0:
            return 0.0
        if i + 1 >= len(rows):
            return rows[-1][1]
        a, b = rows[i], rows[i + 1]
        return a[1] + (t - a[0]) / (b[0] - a[0]) * (b[1] - a[1]) if b[0] > a[0] else a[1]

    links = [rows for rows in links if len(rows) > 1]
    if not links:
        return None
    end = max(rows[-1][0] for rows in links)
    best, t = 0.0, 0.0
    while t + window <= end:
        best = max(best, sum(at(rows, t + window) - at(rows, t) for rows in links) / window)
        t += step
    return round(best, 1)


def read_trace(path: Path, t0_wall: float) -> list[list[float]]:
    """The pull wrapper's progress trace, times made relative to the round's start."""
    rows = []
    try:
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) == 8:
                rows.append([round(float(f[0]) - t0_wall, 2), *(int(x) for x in f[1:6]), float(f[6]), float(f[7])])
    except (OSError, ValueError):
        pass
    return rows


def log(msg: str) -> None:
    print(f"[swarm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: Sequence[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check,
                          timeout=timeout)


def netns_supported() -> tuple[bool, str]:
    """Root and a working ``ip netns`` (checked by creating and deleting a throwaway namespace)."""
    if os.geteuid() != 0:
        return False, "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "needs iproute2 (ip, tc)"
    name = f"dkprobe{os.getpid()}"
    try:
        run(["ip", "netns", "add", name])
    except (subprocess.CalledProcessError, OSError) as exc:
        return False, f"ip netns add failed: {getattr(exc, 'stderr', exc)}"
    with contextlib.suppress(Exception):
        run(["ip", "netns", "del", name])
    return True, ""


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGTERM again (ctorrent needs a second one), then SIGKILL: only this pid, which we started."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout if sig != signal.SIGKILL else 5)


class Lab:
    """The namespaces, bridge, veths and shaping; ``close()`` removes all of it and whatever runs inside."""

    def __init__(self, prefix: str, clients: int, rate_mbit: float, queue_ms: float = 100.0) -> None:
        tag = f"{prefix}{os.getpid()}"
        self.tag = tag
        self.br = f"{tag}-br"
        self.reg = f"{tag}-reg"
        self.clients = [f"{tag}-c{i}" for i in range(clients)]
        self.client_ips = [str(FIRST_CLIENT_IP + i) for i in range(clients)]
        for ip in [REGISTRY_IP, *self.client_ips]:
            assert ipaddress.ip_address(ip) in NET, ip
        self.rate_mbit = rate_mbit
        self.queue_ms = queue_ms
        self.created: list[str] = []

    def namespaces(self) -> list[str]:
        return [*self.clients, self.reg, self.br]

    def _shape(self, ns: str, dev: str) -> None:
        rate_bps = self.rate_mbit * 1e6
        burst = max(32 * 1024, int(rate_bps / 8 / 100))  # >= 10 ms of traffic: tbf stays accurate at high rates
        run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
             "burst", str(burst), "latency", f"{self.queue_ms:g}ms"])

    def setup(self) -> None:
        for ns in [self.br, self.reg, *self.clients]:
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.br, "link", "set", "br0", "up"])
        for k, (ns, ip) in enumerate([(self.reg, REGISTRY_IP), *zip(self.clients, self.client_ips)]):
            port = f"p{k}"
            # Both ends are created inside their namespaces: nothing ever appears in the root namespace.
            run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.br])
            run(["ip", "-n", ns, "addr", "add", f"{ip}/{NET.prefixlen}", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", self.br, "link", "set", port, "master", "br0"])
            run(["ip", "-n", self.br, "link", "set", port, "up"])
            self._shape(ns, "eth0")       # the host's upload
            self._shape(self.br, port)    # the host's download

    def exec(self, ns: str, args: Sequence[str]) -> list[str]:
        assert ns in self.created, ns
        return ["ip", "netns", "exec", ns, *args]

    def close(self) -> None:
        """Kill what still runs in OUR namespaces (by pid), then delete them (veths and bridge go with them)."""
        for ns in reversed(self.created):
            try:
                pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]
            except Exception:  # noqa: BLE001
                pids = []
            stop_pids(pids)
        for ns in reversed(self.created):
            r = run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                log(f"could not delete namespace {ns}: {r.stderr.strip()}")
        self.created.clear()


def build_image(path: Path, size: int, repo_tag: str, layers: int = 1) -> str:
    """A ``docker save``-shaped tarball (Engine 20.10 layout) with ``layers`` layers of random bytes, ``size``
    bytes in all (equal shares).

    Random data: nothing compresses it away and every run's blobs (hence info hashes) are new.
    """
    import io

    work = path.parent
    layer_hexes = []
    for k in range(layers):
        share = size // layers + (size % layers if k == layers - 1 else 0)
        payload = work / f"payload{k}.bin"
        with open(payload, "wb") as f:
            left = share
            while left:
                chunk = os.urandom(min(MIB, left))
                f.write(chunk)
                left -= len(chunk)
        layer = work / f"layer{k}.tar"
        with tarfile.open(layer, "w", format=tarfile.GNU_FORMAT) as t:
            info = t.gettarinfo(str(payload), arcname=f"payload{k}.bin")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(payload, "rb") as f:
                t.addfile(info, f)
        payload.unlink()
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
        layer_hexes.append(h.hexdigest())
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": ["/payload0.bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{x}" for x in layer_hexes]},
    }, sort_keys=True).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    repo, _, tag = repo_tag.rpartition(":")
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [repo_tag],
                 "Layers": [f"{x}/layer.tar" for x in layer_hexes]}]

    def add(t: tarfile.TarFile, name: str, data: bytes, **kw: object) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        for k, v in kw.items():
            setattr(ti, k, v)
        t.addfile(ti, io.BytesIO(data))

    with tarfile.open(path, "w") as t:
        for k, layer_hex in enumerate(layer_hexes):
            layer = work / f"layer{k}.tar"
            add(t, f"{layer_hex}/", b"", type=tarfile.DIRTYPE, mode=0o755)
            ti = tarfile.TarInfo(f"{layer_hex}/layer.tar")
            ti.size, ti.mode, ti.mtime = layer.stat().st_size, 0o644, 0
            with open(layer, "rb") as f:
                t.addfile(ti, f)
            add(t, f"{layer_hex}/VERSION", b"1.0")
            layer.unlink()
        add(t, f"{config_hex}.json", config)
        add(t, "repositories", json.dumps({repo: {tag: layer_hexes[-1]}}).encode())
        add(t, "manifest.json", json.dumps(manifest).encode())
    return f"sha256:{config_hex}"


def image_layers(record: dict) -> list[dict]:
    """The generated image's data layers: what both HTTP and BitTorrent hosts transfer."""
    if record.get("format") == "tarball":  # a record from before layer-level distribution
        return [record]
    return [layer for layer in record["layers"] if layer["size"] > 0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lab = Lab(cfg.prefix, max(cfg.hosts), cfg.rate_mbit, cfg.queue_ms)
        self.procs: list[subprocess.Popen] = []
        self.registry: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.base = f"http://{REGISTRY_IP}:{HTTP_PORT}"
        self.last_exit = 0.0

    # -- processes -------------------------------------------------------------------------------------------
    def spawn(self, ns: str, args: Sequence[str], log_path: Path, stdout: Path | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as err, open(stdout or log_path, "ab") as out:
            env = dict(os.environ)
            if self.cfg.ctorrent_args:
                env["DOCKET_CTORRENT_ARGS"] = self.cfg.ctorrent_args
            proc = subprocess.Popen(self.lab.exec(ns, args), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, env=env)  # Ctrl-C reaches only us; we stop them in order
        self.procs.append(proc)
        return proc

    def curl(self, ns: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return run(self.lab.exec(ns, ["curl", "-sS", "--noproxy", "*", *args]), check=False, timeout=timeout)

    def start_registry(self) -> None:
        assert self.tmp
        loc = self.tmp / "registry"
        loc.mkdir(mode=0o755)
        self.registry = self.spawn(self.lab.reg, [
            sys.executable, "-m", "docket.registry.cli", "--bind", REGISTRY_IP,  # advertise address: its default
            "--port", str(HTTP_PORT), "--tracker-port", str(TRACKER_PORT), "--location", str(loc),
            "--gc-interval", "0", "--threads", "64", "--log-level", "info",
            *(["--max-upload-rate", f"{self.cfg.registry_max_upload_rate}B"] if self.cfg.registry_max_upload_rate
              else []),
        ], self.tmp / "registry.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.registry.poll() is not None:
                raise RuntimeError(f"docket-registry exited ({self.registry.returncode}); see {self.tmp}/registry.log:\n"
                                   + _tail(self.tmp / "registry.log"))
            r = self.curl(self.lab.reg, "-o", "/dev/null", "-w", "%{http_code}", f"{self.base}/healthz", timeout=10)
            if r.stdout.strip() == "200":
                return
            time.sleep(0.2)
        raise RuntimeError("docket-registry did not become healthy in 60 s:\n" + _tail(self.tmp / "registry.log"))

    def push(self, n: int, layers: int) -> dict:
        assert self.tmp
        size = int(self.cfg.size_mib * MIB)
        tar = self.tmp / f"image-n{n}.tar"
        ref = f"bench/swarm:n{n}-l{layers}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        build_image(tar, size, ref, layers)
        repo, _, tag = ref.rpartition(":")
        # From inside the registry's namespace (over its loopback path to its own address, not the shaped link).
        resp = self.tmp / "push.json"
        r = self.curl(self.lab.reg, "-X", "PUT", "-T", str(tar), "-H", "Content-Type: application/x-tar",
                      "-o", str(resp), "-w", "%{http_code}", f"{self.base}/api/v1/repositories/{repo}/tags/{tag}",
                      timeout=600)
        tar.unlink()
        if r.stdout.strip() != "201":
            raise RuntimeError(f"push failed: HTTP {r.stdout.strip()} {r.stderr.strip()} {resp.read_text()[:500]}")
        record = json.loads(resp.read_text())
        record["ref"] = ref
        return record

    def _await(self, procs: list[subprocess.Popen], t0: float, what: str) -> list[float]:
        """Wait for all; return each one's exit time (monotonic seconds since t0)."""
        ends: list[float | None] = [None] * len(procs)
        deadline = time.monotonic() + self.cfg.timeout
        while any(e is None for e in ends):
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not finished after {self.cfg.timeout} s")
            time.sleep(0.02)
        for p in procs:
            self.procs.remove(p)
        return [float(e) for e in ends]  # type: ignore[arg-type]

    # -- rounds ----------------------------------------------------------------------------------------------
    def http_round(self, n: int, record: dict, rdir: Path) -> list[HostResult]:
        layers = image_layers(record)
        procs, outs = [], []
        t0 = time.monotonic()
        for i in range(n):
            files = [rdir / f"http-c{i}-{k}.blob" for k in range(len(layers))]
            outs.append(files)
            pairs = [a for layer, out in zip(layers, files) for a in ("-o", str(out), f"{self.base}{layer['blob_url']}")]
            procs.append(self.spawn(self.lab.clients[i], [
                "curl", "-sS", "-f", "--noproxy", "*", "-w", "%{time_total} %{size_download}\n", *pairs,
            ], rdir / f"http-c{i}.log", stdout=rdir / f"http-c{i}.out"))
        ends = self._await(procs, t0, f"HTTP N={n}")
        hosts = []
        for i, (p, files, end) in enumerate(zip(procs, outs, ends)):
            res = HostResult(host=self.lab.client_ips[i], ok=p.returncode == 0, seconds=end, done_at=end)
            res.sha256_ok = True
            for layer, out in zip(layers, files):
                if out.exists():
                    res.bytes += out.stat().st_size
                    res.sha256_ok = res.sha256_ok and sha256_of(out) == layer["digest"]
                    out.unlink()
                else:
                    res.sha256_ok = False
            res.ok = res.ok and res.sha256_ok
            if not res.ok:
                res.error = f"curl exit {p.returncode}: {_tail(rdir / f'http-c{i}.log', 5)}"
            hosts.append(res)
        return hosts

    def first_host_limits(self, i: int) -> list[str]:
        """Issue 15: the first host's --max-download-rate/--max-upload-rate (its docket pull, or its agent)."""
        limit = []
        if i == 0 and self.cfg.limit_host_download:
            limit += ["--max-download-rate", f"{self.cfg.limit_host_download}B"]
        if i == 0 and self.cfg.limit_host_upload:
            limit += ["--max-upload-rate", f"{self.cfg.limit_host_upload}B"]
        return limit

    def docket_round(self, n: int, record: dict, rdir: Path) -> list[HostResult]:
        go = rdir / "go"
        procs = []
        seed = ["--seed-time", f"{self.cfg.seed_time:g}"] if self.cfg.seed_time is not None else []
        for i in range(n):
            loc = rdir / f"docket-c{i}"
            loc.mkdir(mode=0o700)
            limit = self.first_host_limits(i)
            procs.append(self.spawn(self.lab.clients[i], [
                sys.executable, "-c", PULL_WRAPPER, str(rdir / f"ready-{i}"), str(go), str(rdir / f"start-{i}"),
                str(loc) if self.cfg.prestart_seeders else "-", "--host", f"http://{REGISTRY_IP}", "--port", str(HTTP_PORT), "--location", str(loc), "--quiet",
                "pull", "--no-load", *seed, *self.cfg.pull_args, *limit, "--json", record["ref"],
            ], rdir / f"docket-c{i}.log", stdout=rdir / f"docket-c{i}.out"))
        deadline = time.monotonic() + 60 + 2 * n  # 64 Pythons importing docket at once take a while on 2 cores
        while not all((rdir / f"ready-{i}").exists() for i in range(n)):
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("docket pull did not start:\n" + _tail(rdir / "docket-c0.log"))
            time.sleep(0.01)
        t0_wall, t0 = time.time(), time.monotonic()
        self.cpu = CpuSampler(self.lab, t0)
        go.touch()
        sampler = LinkSampler(self.lab, n, t0)
        try:
            returned = self._await(procs, t0, f"docket N={n}")
            self.last_exit = max(returned)
            seeders = self._await_seeders([rdir / f"docket-c{i}" for i in range(n)], t0)
        finally:
            links = sampler.stop()
            self.cpu.stop()
        self.registry_link = links.get(-1, [])
        hosts = []
        layers = image_layers(record)
        for i, p in enumerate(procs):
            res = HostResult(host=self.lab.client_ips[i], ok=False, seconds=0.0, done_at=0.0,
                             returned_at=round(returned[i], 3), seeder_exited_at=seeders[i])
            res.seeding_stopped_at = _seeding_stopped(rdir / f"docket-c{i}" / "seeder" / "seeder.log", t0_wall)
            try:
                summary = json.loads((rdir / f"docket-c{i}.out").read_text().strip().splitlines()[-1])
                started = float((rdir / f"start-{i}").read_text())
                res.seconds = float(summary["seconds"])
                res.done_at = started - t0_wall + res.seconds
                res.progress = read_trace(rdir / f"start-{i}.trace", t0_wall)
                res.link = links.get(i, [])
                res.bytes = int(summary.get("bytes_from_peers", summary["bytes"]))  # the layers, via BitTorrent
                res.bytes_over_http = int(summary.get("bytes_from_http") or 0)
                res.fallback_reason = str(summary.get("fallback_reason") or "")
                # docket pull verified every digest before printing its summary (exit 0); check the files again
                res.sha256_ok = summary["digest"] == record["digest"] and all(
                    sha256_of(rdir / f"docket-c{i}" / "blobs" / layer["digest"].split(":", 1)[1]) == layer["digest"]
                    for layer in layers)
                res.ok = p.returncode == 0 and res.sha256_ok and res.bytes == sum(x["size"] for x in layers)
            except (OSError, ValueError, KeyError, IndexError) as exc:
                res.error = f"{exc!r}"
            if not res.ok and res.bytes_over_http:
                res.error = f"fell back to HTTP ({res.fallback_reason}), image verified: {res.sha256_ok}"
            elif not res.ok:
                res.error = (res.error + f" exit {p.returncode}: " + _tail(rdir / f"docket-c{i}.log", 8)).strip()
            hosts.append(res)
            if not self.cfg.keep:
                shutil.rmtree(rdir / f"docket-c{i}", ignore_errors=True)
        return hosts

    def v2_round(self, n: int, record: dict, rdir: Path, mode: str, bases: list[str]) -> list[HostResult]:
        """Every host runs ``benchmarks/v2pull.py`` against its base URL (dockerd's order: manifest, config, then the
        layers three at a time, each sha256-checked), released together from a start barrier."""
        go = rdir / f"{mode}-go"
        ref = record["ref"]
        procs = []
        for i in range(n):
            procs.append(self.spawn(self.lab.clients[i], [
                sys.executable, str(V2PULL), bases[i], ref, "--ready", str(rdir / f"{mode}-ready-{i}"), "--go", str(go),
                "--timeout", "120",
            ], rdir / f"{mode}-c{i}.log", stdout=rdir / f"{mode}-c{i}.out"))
        deadline = time.monotonic() + 60
        while not all((rdir / f"{mode}-ready-{i}").exists() for i in range(n)):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"v2pull ({mode}) did not start:\n" + _tail(rdir / f"{mode}-c0.log"))
            time.sleep(0.01)
        t0_wall, t0 = time.time(), time.monotonic()
        go.touch()
        sampler = LinkSampler(self.lab, n, t0)
        try:
            ends = self._await(procs, t0, f"{mode} N={n}")
        finally:
            links = sampler.stop()
        size = sum(int(x["size"]) for x in image_layers(record)) + int(record["config"]["size"])
        hosts = []
        for i, p in enumerate(procs):
            res = HostResult(host=self.lab.client_ips[i], ok=False, seconds=0.0, done_at=0.0,
                             returned_at=round(ends[i], 3), link=links.get(i, []))
            try:
                out = json.loads((rdir / f"{mode}-c{i}.out").read_text().strip().splitlines()[-1])
                res.seconds = float(out["seconds"])
                res.done_at = round(float(out["started"]) - t0_wall + res.seconds, 3)
                res.bytes, res.retries = int(out["bytes"]), int(out["retries"])
                res.sha256_ok = bool(out["ok"])  # v2pull checked every blob against its digest
                res.ok = p.returncode == 0 and res.sha256_ok and len(out["blobs"]) == len(image_layers(record)) + 1
                res.error = out.get("error", "")
                if res.bytes < size:
                    res.ok, res.error = False, f"{res.bytes} bytes of {size} {res.error}"
            except (OSError, ValueError, KeyError, IndexError) as exc:
                res.error = f"{exc!r} exit {p.returncode}: " + _tail(rdir / f"{mode}-c{i}.log", 8)
            hosts.append(res)
        return hosts

    def start_agents(self, n: int, rdir: Path) -> list[subprocess.Popen]:
        """A ``docket agent`` in each of the first n host namespaces, on 127.0.0.1:5000 there, each with its own
        empty cache; returns once every one answers GET /v2/ with 200 (or raises)."""
        agents = []
        for i in range(n):
            cache = rdir / f"agent-cache-c{i}"
            cache.mkdir(mode=0o700)
            agents.append(self.spawn(self.lab.clients[i], [
                sys.executable, "-m", "docket.client", "--host", f"http://{REGISTRY_IP}", "--port", str(HTTP_PORT),
                "agent", "--listen", f"127.0.0.1:{AGENT_PORT}", "--cache-dir", str(cache),
                "--peer-ip", self.lab.client_ips[i], "--log-level", "info", *self.first_host_limits(i),
            ], rdir / f"agent-c{i}.log"))
        pending = set(range(n))
        deadline = time.monotonic() + 90
        while pending:
            for i in sorted(pending):
                if agents[i].poll() is not None:
                    raise RuntimeError(f"docket agent on c{i} exited ({agents[i].returncode}):\n"
                                       + _tail(rdir / f"agent-c{i}.log"))
                r = self.curl(self.lab.clients[i], "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{AGENT_PORT}/v2/", timeout=10)
                if r.stdout.strip() == "200":
                    pending.discard(i)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"docket agent not answering GET /v2/ on {sorted(pending)} after 90 s:\n"
                                   + _tail(rdir / f"agent-c{min(pending)}.log"))
            time.sleep(0.1)
        return agents

    def agent_round(self, n: int, record: dict, rdir: Path) -> tuple[list[HostResult], float]:
        t = time.monotonic()
        agents = self.start_agents(n, rdir)
        started = time.monotonic() - t
        try:
            hosts = self.v2_round(n, record, rdir, "agent", [f"http://127.0.0.1:{AGENT_PORT}"] * n)
            for i, h in enumerate(hosts):
                r = self.curl(self.lab.clients[i], f"http://127.0.0.1:{AGENT_PORT}/_docket/agent", timeout=10)
                with contextlib.suppress(ValueError):
                    h.agent = json.loads(r.stdout)
        finally:
            for a in agents:
                stop_pid(a, timeout=10)
                with contextlib.suppress(ValueError):
                    self.procs.remove(a)
        if not self.cfg.keep:
            for i in range(n):
                shutil.rmtree(rdir / f"agent-cache-c{i}", ignore_errors=True)
        return hosts, started

    def _await_seeders(self, locations: list[Path], t0: float) -> list[float | None]:
        """Wait until every host's background seeder ended (``docket seed`` shows none): each one's end, seconds
        since t0 (None: it never ran)."""
        from docket.client.background import SeederFiles

        files = [SeederFiles(loc) for loc in locations]
        ends: list[float | None] = [None] * len(files)
        ran = [f.log.exists() for f in files]
        deadline = time.monotonic() + (self.cfg.seed_time or 60.0) + 60
        while True:
            for k, f in enumerate(files):
                if ends[k] is None and ran[k] and not f.running():
                    ends[k] = round(time.monotonic() - t0, 3)
            if all(e is not None or not r for e, r in zip(ends, ran)) or time.monotonic() > deadline:
                return ends
            time.sleep(0.05)

    def one(self, n: int, layers: int) -> RoundResult:
        assert self.tmp
        rdir = self.tmp / f"n{n}-l{layers}"
        k = 1
        while rdir.exists():  # --repeat: n16-l1, n16-l1-2, ...
            k += 1
            rdir = self.tmp / f"n{n}-l{layers}-{k}"
        rdir.mkdir(mode=0o755)
        load_before = os.getloadavg()[0]
        record = self.push(n, layers)
        size = sum(int(layer["size"]) for layer in image_layers(record))
        bound = size * 8 / (self.cfg.rate_mbit * 1e6)
        log(f"N={n}: pushed {record['ref']} ({size / MIB:.1f} MiB in {layers} layer(s), piece "
            f"{record.get('piece_length')}), link bound {bound:.1f} s")
        http_hosts: list[HostResult] = []
        docket_hosts: list[HostResult] = []
        v2_hosts: list[HostResult] = []
        agent_hosts: list[HostResult] = []
        agent_start = None
        self.last_exit = 0.0
        self.registry_link: list[list[float]] = []
        self.cpu: CpuSampler | None = None
        if "docket" in self.cfg.modes:
            if not self.cfg.skip_http:
                http_hosts = self.http_round(n, record, rdir)
                log(f"N={n}: HTTP {max(h.done_at for h in http_hosts):.1f} s")
            docket_hosts = self.docket_round(n, record, rdir)
        if "v2-direct" in self.cfg.modes:
            v2_hosts = self.v2_round(n, record, rdir, "v2-direct", [self.base] * n)
            log(f"N={n}: v2-direct {_last(v2_hosts)} s")
        if "agent" in self.cfg.modes:
            agent_hosts, agent_start = self.agent_round(n, record, rdir)
            log(f"N={n}: agent {_last(agent_hosts)} s (agents answered after {agent_start:.1f} s)")
        limits = self.limit_checks(docket_hosts or agent_hosts)
        for c in limits:
            log(f"N={n}: {c['what']}: limit {c['limit_bytes_s']} B/s, link {c.get('steady_bytes_s')} B/s while "
                f"moving (ratio {c.get('steady_ratio')}), {c.get('whole_bytes_s')} B/s first to last byte "
                f"(ratio {c.get('whole_ratio')}, {c.get('seconds')} s, {c['total_bytes']} bytes)")
        cpu = {}
        fell_back = [h for h in docket_hosts if h.bytes_over_http > 0]
        if fell_back:
            log(f"N={n}: {len(fell_back)} host(s) fell back to HTTP ({fell_back[0].fallback_reason}), their images "
                f"ready {min(h.done_at for h in fell_back):.1f}-{max(h.done_at for h in fell_back):.1f} s")
        if self.cpu is not None and docket_hosts:  # from the start barrier to the last host ready
            cpu = self.cpu.window(max(h.done_at for h in docket_hosts))
            top = sorted(cpu.get("groups_pct", {}).items(), key=lambda kv: -kv[1])[:4]
            log(f"N={n}: CPU until the last host was ready ({cpu.get('seconds')} s): {cpu.get('busy_pct')} % busy of "
                f"{cpu.get('ncpu')} cores (softirq {cpu.get('softirq_pct')} %, steal {cpu.get('steal_pct')} %); "
                + ", ".join(f"{k} {v} %" for k, v in top))
        everyone = [*http_hosts, *docket_hosts, *v2_hosts, *agent_hosts]
        ok = all(h.ok for h in everyone)
        http_s = max(h.done_at for h in http_hosts) if http_hosts else None
        docket_s = _last(docket_hosts)
        v2_s, agent_s = _last(v2_hosts), _last(agent_hosts)
        stops = [h.seeding_stopped_at for h in docket_hosts if h.seeding_stopped_at is not None]
        exits = [h.seeder_exited_at for h in docket_hosts if h.seeder_exited_at is not None]
        parts = []
        if docket_hosts:
            parts.append(f"docket ready {docket_s} s, returned {self.last_exit:.1f} s, seeding stopped "
                         f"{max(stops, default=0):.1f} s")
        if v2_hosts:
            parts.append(f"v2-direct {v2_s} s")
        if agent_hosts:
            parts.append(f"agent {agent_s} s")
        log(f"N={n} layers={layers}: " + "; ".join(parts) + ("" if ok else " - FAILURES: " +
            "; ".join(f"{h.host}: {h.error}" for h in everyone if not h.ok)))
        return RoundResult(
            v2_direct_s=_r(v2_s), v2_direct_median_s=_r(_median(v2_hosts)),
            v2_direct_over_bound=_r(v2_s / bound if v2_s else None),
            agent_s=_r(agent_s), agent_median_s=_r(_median(agent_hosts)),
            agent_over_bound=_r(agent_s / bound if agent_s else None),
            v2_direct_over_agent=_r(v2_s / agent_s if v2_s and agent_s else None),
            agent_start_s=_r(agent_start), v2_direct_hosts=v2_hosts, agent_hosts=agent_hosts,
            agent_bytes_from_peers=_agent_total(agent_hosts, "bytes_from_peers"),
            agent_bytes_from_http=_agent_total(agent_hosts, "bytes_from_http"),
            n=n, layers=layers, size_bytes=size, rate_mbit=self.cfg.rate_mbit, digest=record["digest"], link_bound_s=round(bound, 3),
            http_bound_s=round(n * bound, 3), http_s=_r(http_s), docket_s=_r(docket_s),
            docket_host_max_s=_r(max((h.seconds for h in docket_hosts), default=None)),
            docket_over_bound=_r(docket_s / bound if docket_s else None),
            http_over_docket=_r(http_s / docket_s if http_s and docket_s else None),
            all_finished=ok, http_hosts=http_hosts, docket_hosts=docket_hosts,
            docket_all_exited_s=_r(self.last_exit or None),
            docket_returned_over_bound=_r(self.last_exit / bound if self.last_exit else None),
            seeding_stopped_s=_r(max(stops, default=None)), seeders_exited_s=_r(max(exits, default=None)),
            # every host, also one that fell back to HTTP, as long as each ended with a verified image
            docket_median_s=_r(statistics.median(h.done_at for h in docket_hosts) if docket_hosts and all(
                h.sha256_ok for h in docket_hosts) else None),
            docket_median_over_bound=_r(statistics.median(h.done_at for h in docket_hosts) / bound
                                        if docket_hosts and all(h.sha256_ok for h in docket_hosts) else None),
            cpu=cpu, cpu_series=self.cpu.series() if self.cpu else [],
            docket_last_any_s=_r(max((h.done_at for h in docket_hosts if h.sha256_ok), default=None)),
            docket_fallback_hosts=sum(1 for h in docket_hosts if h.bytes_over_http > 0),
            aggregate_rx_mb_s=aggregate_rate([h.link for h in docket_hosts]) if docket_hosts else None,
            links_capacity_mb_s=round(n * self.cfg.rate_mbit / 8, 1),
            loadavg=[round(load_before, 2), round(os.getloadavg()[0], 2)],
            limits=limits, registry_link=self.registry_link,
        )

    def limit_checks(self, docket_hosts: list[HostResult]) -> list[dict]:
        """Issue 15: each limited host's link counter against its limit (sampled during the docket round, or the
        agent round without one: the first host's agent has the limits then)."""
        checks = []
        if docket_hosts and self.cfg.limit_host_download:
            checks.append(limit_check(docket_hosts[0].link, 1, self.cfg.limit_host_download,
                                      f"{docket_hosts[0].host} download (--max-download-rate)"))
        if docket_hosts and self.cfg.limit_host_upload:
            checks.append(limit_check(docket_hosts[0].link, 2, self.cfg.limit_host_upload,
                                      f"{docket_hosts[0].host} upload (--max-upload-rate)"))
        if self.registry_link and self.cfg.registry_max_upload_rate:
            checks.append(limit_check(self.registry_link, 2, self.cfg.registry_max_upload_rate,
                                      f"registry {REGISTRY_IP} upload (docket-registry --max-upload-rate)"))
        return checks

    def main(self) -> list[RoundResult]:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.lab.tag}-", dir=self.cfg.workdir))
        self.tmp.chmod(0o755)  # opentracker drops to nobody
        log(f"namespaces {self.lab.tag}-*, temp {self.tmp}")
        self.lab.setup()
        self.start_registry()
        results = []
        for n in self.cfg.hosts:
            for layers in self.cfg.layers:
                for _ in range(self.cfg.repeat):
                    results.append(self.one(n, layers))
                    write_results(self.cfg, results)
        return results

    def close(self) -> None:
        for p in list(self.procs):
            if p is not self.registry:
                stop_pid(p, timeout=5)
        if self.registry is not None:
            stop_pid(self.registry, timeout=30)  # stops its seeders and tracker itself
        if self.tmp and self.registry is not None and not self.cfg.keep:
            with contextlib.suppress(OSError):
                shutil.copy(self.tmp / "registry.log", self.cfg.out / "registry.log")
        self.lab.close()
        if self.tmp and not self.cfg.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _last(hosts: list[HostResult]) -> float | None:
    """The last host done, if every host finished verified (None: a failure, or no such round)."""
    return max(h.done_at for h in hosts) if hosts and all(h.ok for h in hosts) else None


def _agent_total(hosts: list[HostResult], key: str) -> int | None:
    vals = [h.agent.get("totals", {}).get(key) for h in hosts]
    return sum(vals) if hosts and all(isinstance(v, int) for v in vals) else None


def _median(hosts: list[HostResult]) -> float | None:
    return statistics.median(h.done_at for h in hosts) if hosts and all(h.ok for h in hosts) else None


def summary(results: list[RoundResult]) -> list[dict]:
    """Per N and layer count, the median over rounds of each measure (issue 14's targets use the N=16 median)."""
    out = []
    for key in sorted({(r.n, r.layers) for r in results}):
        rs = [r for r in results if (r.n, r.layers) == key]
        row: dict = {"n": key[0], "layers": key[1], "rounds": len(rs), "link_bound_s": rs[0].link_bound_s,
                     "http_bound_s": rs[0].http_bound_s}
        for m in ("http_s", "docket_s", "v2_direct_s", "agent_s"):
            vals = [getattr(r, m) for r in rs if getattr(r, m) is not None]
            row[m] = vals
            row[f"{m}_median"] = _r(statistics.median(vals)) if vals and len(vals) == len(rs) else None
        b = rs[0].link_bound_s
        row["agent_over_bound_median"] = _r(row["agent_s_median"] / b if row["agent_s_median"] else None)
        row["v2_direct_over_bound_median"] = _r(row["v2_direct_s_median"] / b if row["v2_direct_s_median"] else None)
        row["v2_direct_over_agent_median"] = _r(row["v2_direct_s_median"] / row["agent_s_median"]
                                                if row["v2_direct_s_median"] and row["agent_s_median"] else None)
        out.append(row)
    return out


def summary_table(rows: list[dict]) -> str:
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [f"{'N':>3} {'layers':>6} {'rounds':>6} {'bound s':>8} {'v2-direct s (median)':>21} {'agent s (median)':>17} "
             f"{'agent/bound':>11} {'direct/bound':>12} {'direct/agent':>12}"]
    for r in rows:
        lines.append(f"{r['n']:>3} {r['layers']:>6} {r['rounds']:>6} {f(r['link_bound_s']):>8} "
                     f"{f(r['v2_direct_s_median']):>21} {f(r['agent_s_median']):>17} "
                     f"{f(r['agent_over_bound_median'], 2):>11} {f(r['v2_direct_over_bound_median'], 2):>12} "
                     f"{f(r['v2_direct_over_agent_median'], 2):>12}")
    return "\n".join(lines)


def _seeding_stopped(seeder_log: Path, t0_wall: float) -> float | None:
    """When the background seeder's last "stopped seeding" line was logged, seconds since t0_wall."""
    last = None
    try:
        for line in seeder_log.read_text(errors="replace").splitlines():
            if "stopped seeding" in line:
                stamp, _, ms = line[:23].partition(",")
                last = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
    except (OSError, ValueError):
        return None
    return None if last is None else round(last - t0_wall, 3)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def write_results(cfg: Config, results: list[RoundResult]) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(_compact_rows(json.dumps({
        "config": {"hosts": cfg.hosts, "size_mib": cfg.size_mib, "rate_mbit": cfg.rate_mbit,
                   "queue_ms": cfg.queue_ms, "seed_time": cfg.seed_time, "ctorrent_args": cfg.ctorrent_args,
                   "layers": cfg.layers, "pull_args": cfg.pull_args, "repeat": cfg.repeat, "modes": cfg.modes,
                   "limit_host_download": cfg.limit_host_download, "limit_host_upload": cfg.limit_host_upload,
                   "registry_max_upload_rate": cfg.registry_max_upload_rate,
                   "prestart_seeders": cfg.prestart_seeders, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "command": " ".join(shlex.quote(a) for a in sys.argv)},
        "summary": summary(results),
        "rounds": [asdict(r) for r in results],
    }, indent=2)))
    cols = ["n", "layers", "size_bytes", "rate_mbit", "http_s", "docket_s", "link_bound_s", "docket_over_bound",
            "http_over_docket", "http_bound_s", "docket_host_max_s", "docket_all_exited_s",
            "docket_returned_over_bound", "seeding_stopped_s", "seeders_exited_s", "docket_median_s",
            "v2_direct_s", "agent_s", "v2_direct_over_bound", "agent_over_bound", "v2_direct_over_agent",
            "agent_start_s", "agent_bytes_from_peers", "agent_bytes_from_http", "loadavg", "all_finished",
            "docket_median_over_bound", "docket_last_any_s", "docket_fallback_hosts", "aggregate_rx_mb_s",
            "links_capacity_mb_s"]
    cpu_cols = ["cpu_window_s", "cpu_busy_pct", "cpu_softirq_pct", "cpu_steal_pct",
                *(f"cpu_{_slug(g)}_pct" for g in CPU_GROUPS)]
    with open(cfg.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + cpu_cols)
        for r in results:
            c = r.cpu
            w.writerow([getattr(r, k) for k in cols] + [c.get("seconds"), c.get("busy_pct"), c.get("softirq_pct"),
                       c.get("steal_pct"), *(c.get("groups_pct", {}).get(g) for g in CPU_GROUPS)])


def _compact_rows(text: str) -> str:
    """Indented JSON with each list of numbers on one line (the per-host series: 64 hosts' link rows every 0.25 s
    are megabytes with one number a line)."""
    import re
    text = re.sub(r"\[\s+([-0-9.eE,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text)
    return re.sub(r"\[\s+(\[[-0-9.eE, ]*\](?:,\s+\[[-0-9.eE, ]*\])*)\s+\]",
                  lambda m: "[" + re.sub(r",\s+\[", ", [", m.group(1)) + "]", text)


def _slug(group: str) -> str:
    return group.split(" (")[0].replace(" ", "_")


def table(results: list[RoundResult]) -> str:
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [f"{'N':>3} {'layers':>6} {'HTTP s':>7} {'ready s':>8} {'median s':>8} {'returned s':>10} {'bound s':>8} "
             f"{'ready/bound':>11} {'median/bound':>12} {'returned/bound':>14} {'seeding stopped s':>17} {'LAN MB/s of max':>15} "
             f"{'CPU busy %':>10} {'ctorrent %':>10} {'pulls %':>7} {'registry %':>10} {'others %':>8} {'load':>9} ok"]
    for r in results:
        load = "/".join(f"{x:.1f}" for x in r.loadavg)
        g = r.cpu.get("groups_pct", {})
        reg = g.get("registry (python)", 0) + g.get("opentracker", 0) if g else None
        lines.append(f"{r.n:>3} {r.layers:>6} {f(r.http_s):>7} {f(r.docket_s):>8} {f(r.docket_median_s):>8} "
                     f"{f(r.docket_all_exited_s):>10} {f(r.link_bound_s):>8} {f(r.docket_over_bound, 2):>11} "
                     f"{f(r.docket_median_over_bound, 2):>12} {f(r.docket_returned_over_bound, 2):>14} "
                     f"{f(r.seeding_stopped_s):>17} {f(r.aggregate_rx_mb_s):>8}/{f(r.links_capacity_mb_s):<6} {f(r.cpu.get('busy_pct')):>10} {f(g.get('ctorrent')):>10} "
                     f"{f(g.get('docket pull (python)', 0) + g.get('background seeder (python)', 0) if g else None):>7} {f(reg):>10} {f(g.get('outside the benchmark')):>8} "
                     f"{load:>9} {'yes' if r.all_finished else 'NO (' + str(r.docket_fallback_hosts) + ' via HTTP, last ' + f(r.docket_last_any_s) + ' s)'}")
    lines.append("LAN MB/s: every host's download together at its busiest 4 s (wire), of what N links carry. "
                 "CPU columns: % of all cores' time from the start barrier to the last host ready (/proc); registry % "
                 "includes opentracker; pulls % = docket pull + its background seeder (Python); others % = processes outside the benchmark's namespaces (other work)")
    return "\n".join(lines)


def v2_table(results: list[RoundResult]) -> str:
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [f"{'N':>3} {'layers':>6} {'v2-direct s':>11} {'agent s':>8} {'bound s':>8} {'agent/bound':>11} "
             f"{'direct/agent':>12} {'agents up s':>11} {'load':>9} ok"]
    for r in results:
        load = "/".join(f"{x:.1f}" for x in r.loadavg)
        lines.append(f"{r.n:>3} {r.layers:>6} {f(r.v2_direct_s):>11} {f(r.agent_s):>8} {f(r.link_bound_s):>8} "
                     f"{f(r.agent_over_bound, 2):>11} {f(r.v2_direct_over_agent, 2):>12} {f(r.agent_start_s):>11} "
                     f"{load:>9} {'yes' if r.all_finished else 'NO'}")
    return "\n".join(lines)


def plot(cfg: Config, results: list[RoundResult]) -> Path | None:
    """Left: seconds until the last and the median host had the image, every round (lines through the medians
    over rounds), against the link bound; right: the machine's CPU during those seconds, by process group."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install 'docket[bench]' or matplotlib): no plot")
        return None
    results = [r for r in results if r.layers == cfg.layers[0]]  # one line per measure: the first layer count
    ns = sorted({r.n for r in results})

    def med(attr: str) -> list[float | None]:
        out = []
        for n in ns:
            vals = [getattr(r, attr) for r in results if r.n == n and getattr(r, attr) is not None]
            out.append(statistics.median(vals) if vals else None)
        return out

    def dots(ax: object, attr: str, style: str, color: str) -> None:
        pts = [(r.n, getattr(r, attr)) for r in results if getattr(r, attr) is not None]
        if pts:
            ax.plot(*zip(*pts), style, color=color, alpha=0.45, linestyle="none")  # type: ignore[attr-defined]

    with_cpu = any(r.cpu for r in results)
    fig, axes = plt.subplots(1, 2 if with_cpu else 1, figsize=(14 if with_cpu else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    bounds = med("link_bound_s")
    if any(r.http_s for r in results):
        ax.plot(ns, med("http_s"), "o-", label="central HTTP (measured)")
        ax.plot(ns, med("http_bound_s"), ":", color="C0", label="HTTP bound N·S/B")
    rounds = max(sum(1 for r in results if r.n == n) for n in ns)
    each = f" (median of {rounds} rounds; dots: each round)" if rounds > 1 else ""
    ax.plot(ns, med("docket_s"), "s-", color="C1", label="docket pull: last host ready" + each)
    dots(ax, "docket_s", "s", "C1")
    fb = [(r.n, r.docket_last_any_s) for r in results if r.docket_s is None and r.docket_last_any_s]
    if fb:
        ax.plot(*zip(*fb), "x", color="C3", markersize=9, linestyle="none",
                label="round where hosts fell back to HTTP: last host ready")
    ax.plot(ns, med("docket_median_s"), "D-", color="C4", label="docket pull: median host ready")
    dots(ax, "docket_median_s", "D", "C4")
    ax.plot(ns, med("docket_all_exited_s"), "^-", color="C3", alpha=0.6, label="docket pull: last returned")
    ax.plot(ns, bounds, "--", color="C2", label="link bound S/B")
    ax.plot(ns, [1.5 * b if b else None for b in bounds], ":", color="C2", label="1.5 x link bound")
    ax.set_xlabel("hosts pulling at once (N)")
    ax.set_ylabel("seconds")
    ax.set_title(f"{cfg.size_mib:g} MiB image of {cfg.layers[0]} layer(s), {cfg.rate_mbit:g} Mbit/s links")
    ax.set_xticks(ns)
    tops = [r.docket_last_any_s or r.docket_s or 0 for r in results] + [r.http_s or 0 for r in results]
    if max(tops) > 8 * max(bounds):  # hosts that fell back to HTTP (or the HTTP rounds) next to swarm seconds
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if with_cpu:
        ax = axes[0][1]
        groups = [("ctorrent", "ctorrent"), ("docket pull (python)", "docket pull (Python)"),
                  ("background seeder (python)", "background seeder (Python)"), ("registry (python)", "registry (Python)"), ("opentracker", "opentracker"),
                  ("other in the lab", "other in the lab"), ("benchmark driver", "benchmark driver"),
                  ("kernel threads", "kernel threads"), ("outside the benchmark", "outside the benchmark")]
        x = list(range(len(ns)))
        bottom = [0.0] * len(ns)
        for k, (g, label) in enumerate(groups):
            vals = []
            for n in ns:
                rs = [r for r in results if r.n == n and r.cpu]
                vals.append(statistics.mean(r.cpu["groups_pct"].get(g, 0.0) for r in rs) if rs else 0.0)
            ax.bar(x, vals, bottom=bottom, label=label, color=f"C{k}", width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
        busy = [statistics.mean(r.cpu["busy_pct"] for r in results if r.n == n and r.cpu) if any(
            r.cpu for r in results if r.n == n) else None for n in ns]
        ax.plot(x, busy, "k_", markersize=40, markeredgewidth=2, linestyle="none",
                label="machine busy (/proc/stat, incl. softirq)")
        ax.set_xticks(x, [f"N={n}" for n in ns])
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"% of {results[0].cpu.get('ncpu', '?')} cores, start to last host ready")
        ax.set_title("CPU during the docket rounds (mean over rounds)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = cfg.out / "swarm.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if with_cpu:
        plot_timeline(cfg, results, plt)
    return path


def plot_timeline(cfg: Config, results: list[RoundResult], plt: object) -> Path:
    """Per round, over the seconds since the start barrier: how many hosts had their first piece and their image
    (from the pulls' ctorrent status and --json), against the machine's CPU busy %: which part of a round the
    machine, not the protocol, held up."""
    ns = sorted({r.n for r in results})
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4.5), squeeze=False)  # type: ignore[attr-defined]
    for ax, n in zip(axes[0], ns):
        rs = [r for r in results if r.n == n]
        horizon = 0.0
        for k, r in enumerate(rs):
            done = sorted(h.done_at for h in r.docket_hosts if h.ok)
            first = sorted(t for h in r.docket_hosts for t in [next((row[0] for row in h.progress if row[1] > 0),
                                                                    None)] if t is not None)
            ls = ["-", "--", ":", "-."][k % 4]
            if done:
                ax.step(done, range(1, len(done) + 1), where="post", color="C1", linestyle=ls,
                        label=f"round {k + 1}: hosts with the image" + ("" if len(done) == n else f" ({len(done)})"))
                horizon = max(horizon, done[-1])
            if first:
                ax.step(first, range(1, len(first) + 1), where="post", color="C0", linestyle=ls, alpha=0.7,
                        label=f"round {k + 1}: hosts with a first piece")
        ax.axvline(rs[0].link_bound_s, color="C2", linestyle="--", label="link bound")
        ax.axvline(1.5 * rs[0].link_bound_s, color="C2", linestyle=":", label="1.5 x bound")
        ax.set_xlim(0, max(horizon, 1.5 * rs[0].link_bound_s) * 1.1)
        ax.set_ylim(0, n * 1.05)
        ax.set_xlabel("seconds since the start barrier")
        ax.set_ylabel("hosts")
        ax.set_title(f"N={n}: {cfg.size_mib:g} MiB, {cfg.rate_mbit:g} Mbit/s")
        ax.grid(True, alpha=0.3)
        cpu = ax.twinx()
        for k, r in enumerate(rs):
            if r.cpu_series:
                cpu.plot([row[0] for row in r.cpu_series], [row[1] for row in r.cpu_series], color="k",
                         linestyle=["-", "--", ":", "-."][k % 4], alpha=0.35, label=f"round {k + 1}: CPU busy %")
        cpu.set_ylim(0, 105)
        cpu.set_ylabel("machine CPU busy % (all cores)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = cpu.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="lower right")
    fig.tight_layout()  # type: ignore[attr-defined]
    path = cfg.out / "timeline.png"
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def benchmark(cfg: Config) -> list[RoundResult]:
    """Run the whole benchmark; always removes what it created. Returns the rounds (also written to cfg.out)."""
    ok, why = netns_supported()
    if not ok:
        raise RuntimeError(f"cannot build the simulated network: {why}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(cfg)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for s in old:
            signal.signal(s, _raise)
    try:
        results = bench.main()
    finally:
        # Cleanup must finish even if Ctrl-C is pressed again.
        if in_main:
            prev_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            for s in old:
                signal.signal(s, signal.SIG_IGN)
        try:
            bench.close()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, prev_int)
                for s, h in old.items():
                    signal.signal(s, h)
    write_results(cfg, results)
    if cfg.plot and "docket" in cfg.modes:
        plot(cfg, results)
    return results


def load_results(path: Path) -> tuple[dict, list[RoundResult]]:
    """A results.json back into rounds (``--replot``: the plots again from a run's figures, no root needed)."""
    data = json.loads(path.read_text())
    rounds = []
    for raw in data["rounds"]:
        r = dict(raw)
        hosts = {k: [HostResult(**h) for h in r.pop(k, [])] for k in
                 ("http_hosts", "docket_hosts", "v2_direct_hosts", "agent_hosts")}
        known = {f for f in RoundResult.__dataclass_fields__}
        rounds.append(RoundResult(**{k: v for k, v in r.items() if k in known}, **hosts))
    return data, rounds


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", default="1,4,8,16", help="comma-separated N values (default 1,4,8,16)")
    p.add_argument("--size-mib", type=float, default=64.0, help="image size in MiB (default 64)")
    p.add_argument("--rate-mbit", type=float, default=50.0, help="every host's link, each direction (default 50)")
    p.add_argument("--queue-ms", type=float, default=100.0, help="tbf queue (latency) per link (default 100 ms)")
    p.add_argument("--seed-time", type=float, default=None, help="docket pull --seed-time (default: not given)")
    p.add_argument("--layers", default="1,3", help="comma-separated layer counts of the image (default 1,3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results.json/.csv, swarm.png")
    p.add_argument("--prefix", default="dkbench", help="namespace name prefix; the pid is appended")
    p.add_argument("--timeout", type=float, default=900.0, help="per transfer phase, seconds")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs) for debugging")
    p.add_argument("--skip-http", action="store_true", help="docket only")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--ctorrent-args", default="",
                   help="extra ctorrent flags for the registry's seeders and every pull (e.g. '-z 64 -C 32'), "
                        "passed as $DOCKET_CTORRENT_ARGS")
    p.add_argument("--pull-args", default="", help="extra `docket pull` flags, e.g. '--wait' (default: none)")
    p.add_argument("--repeat", type=int, default=1, help="rounds per N (timings on a shared machine are noisy)")
    p.add_argument("--limit-host-download", default=None, metavar="RATE",
                   help="issue 15: `--max-download-rate RATE` (e.g. 2MB) on the first host only (its `docket pull`, "
                        "or its `docket agent` in agent mode); its link counter is reported against it")
    p.add_argument("--limit-host-upload", default=None, metavar="RATE",
                   help="issue 15: `--max-upload-rate RATE` on the first host only (pull or agent), reported likewise")
    p.add_argument("--registry-max-upload-rate", default=None, metavar="RATE",
                   help="issue 15: `docket-registry --max-upload-rate RATE`; the registry's link is reported")
    p.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only draw swarm.png and timeline.png again from a results.json, next to it")
    p.add_argument("--prestart-seeders", action="store_true",
                   help="issue 16: start each host's background seeder before the start barrier (its Python start-up "
                        "then competes with no download for this machine's cores, as on real hosts with their own)")
    p.add_argument("--mode", default="docket",
                   help="comma list of: docket (curl + `docket pull`, the default), v2-direct (every host pulls as "
                        "dockerd would from the registry's /v2), agent (the same from a `docket agent` per host)")
    a = p.parse_args(argv)
    hosts = [int(x) for x in a.hosts.split(",") if x.strip()]
    if not hosts or min(hosts) < 1 or max(hosts) > 200:
        p.error("--hosts: values 1..200")
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    if not layers or min(layers) < 1 or max(layers) > 64:
        p.error("--layers: values 1..64")
    modes = [m.strip() for m in a.mode.split(",") if m.strip()]
    if not modes or set(modes) - {"docket", "v2-direct", "agent"}:
        p.error("--mode: a comma list of docket, v2-direct, agent")
    rates = {}
    for name in ("limit_host_download", "limit_host_upload", "registry_max_upload_rate"):
        text = getattr(a, name)
        try:
            rates[name] = ByteRate().convert(text, None, None) if text else None
        except click.BadParameter as exc:
            p.error(f"--{name.replace('_', '-')}: {exc.message}")
    return Config(**rates, modes=modes, hosts=hosts, size_mib=a.size_mib, rate_mbit=a.rate_mbit, queue_ms=a.queue_ms, seed_time=a.seed_time, out=a.out,
                  prefix=a.prefix, timeout=a.timeout, workdir=a.workdir, keep=a.keep, skip_http=a.skip_http,
                  plot=not a.no_plot, ctorrent_args=a.ctorrent_args, repeat=max(1, a.repeat), layers=layers,
                  pull_args=shlex.split(a.pull_args), prestart_seeders=a.prestart_seeders, replot=a.replot)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.replot:
        data, results = load_results(cfg.replot)
        c = data["config"]
        cfg.out, cfg.size_mib, cfg.rate_mbit, cfg.layers = cfg.replot.parent, c["size_mib"], c["rate_mbit"], c["layers"]
        print(table(results))
        print(f"plot: {plot(cfg, results)}")
        return 0
    try:
        results = benchmark(cfg)
    except KeyboardInterrupt:
        log("interrupted; everything it created was removed")
        return 130
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        log(f"failed: {exc} {detail}".strip())
        return 1
    if "docket" in cfg.modes:
        print(table(results))
    if set(cfg.modes) & {"v2-direct", "agent"}:
        print(v2_table(results))
        print(summary_table(summary(results)))
    print(f"results: {cfg.out / 'results.json'}, {cfg.out / 'results.csv'}, {cfg.out / 'swarm.png'}")
    return 0 if all(r.all_finished for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
