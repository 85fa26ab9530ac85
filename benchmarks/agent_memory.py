#!/usr/bin/env python3
"""Memory of a host that seeds many blobs: the total RSS (and PSS) of a process and every process under it, with
the count of processes and of listening ports (issue 14's target: the agent and every seeder it runs <= 300 MiB
while seeding 100 blobs).

Two ways to produce the seeding host (loopback only, 127.0.0.0/8):

* ``prototype`` (the engine alone, no agent needed): an opentracker, ``--blobs`` random blobs of ``--blob-mib``
  with their torrents (docket.torrent.metainfo), and one ``CtorrentEngine(tied=True).seed(...)`` per blob started
  by THIS process, as an agent would. Measured idle, then (``--serve``) after a leecher on another loopback address
  has downloaded every blob from them once (a seeder's read cache fills while it uploads: ctorrent's ``-C``, 16 MB
  by default, set here with ``--cache-mb`` through $DOCKET_CTORRENT_ARGS).
* ``agent``: a docket-registry on loopback, one image of ``--blobs`` layers pushed, a ``docket agent`` that pulls it
  (v2pull through the agent: dockerd's order), then the agent's process tree is measured; with ``--serve`` a second
  agent on another address pulls the same image (peers: the first agent and the registry) and the first is
  measured again.

    sudo python benchmarks/agent_memory.py prototype --blobs 100 --blob-mib 4 --serve
    sudo python benchmarks/agent_memory.py prototype --blobs 100 --blob-mib 4 --serve --cache-mb 1
    python benchmarks/agent_memory.py agent --blobs 100 --blob-mib 1 --serve --out benchmarks/results/issue14/memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
MIB = 1024 * 1024


@dataclass
class TreeMemory:
    """One measurement of a process tree (the root and all its descendants)."""

    label: str
    root_pid: int
    processes: int = 0
    rss_mib: float = 0.0  # sum of VmRSS (shared pages counted in every process: an upper bound)
    pss_mib: float = 0.0  # sum of Pss (shared pages split among their users: what the tree really costs)
    rss_anon_mib: float = 0.0  # sum of RssAnon: each process's private heap and stacks (what grows with load)
    rss_file_mib: float = 0.0  # sum of RssFile: mapped files, mostly the same shared libraries counted again
    root_rss_mib: float = 0.0
    child_rss_mib: dict[str, float] = field(default_factory=dict)  # by command name: sum
    max_child_rss_mib: float = 0.0
    excluded: list[str] = field(default_factory=list)  # command names left out (prototype: its opentracker)
    tcp_listen: int = 0
    udp_sockets: int = 0
    threads: int = 0
    at: float = 0.0


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _net_table(pid: int, name: str) -> list[list[str]]:
    try:
        return [line.split() for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]]
    except OSError:
        return []


def measure(root: int, label: str, exclude: tuple[str, ...] = ()) -> TreeMemory:
    """Sum over ``root`` and its descendants, except processes whose command name is in ``exclude``."""
    m = TreeMemory(label=label, root_pid=root, at=time.time(), excluded=list(exclude))
    inodes: set[str] = set()
    for pid in tree_pids(root):
        try:
            rss = _status_kb(pid, "VmRSS") / 1024
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name in exclude:
                continue
            m.threads += _status_kb(pid, "Threads")
        except OSError:
            continue  # gone meanwhile
        m.processes += 1
        m.rss_mib += rss
        m.pss_mib += _pss_kb(pid) / 1024
        m.rss_anon_mib += _status_kb(pid, "RssAnon") / 1024
        m.rss_file_mib += _status_kb(pid, "RssFile") / 1024
        if pid == root:
            m.root_rss_mib = round(rss, 1)
        else:
            m.child_rss_mib[name] = round(m.child_rss_mib.get(name, 0.0) + rss, 1)
            m.max_child_rss_mib = max(m.max_child_rss_mib, round(rss, 1))
        inodes |= _socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        m.tcp_listen += sum(1 for f in _net_table(root, table) if len(f) > 9 and f[3] == "0A" and f[9] in inodes)
    for table in ("udp", "udp6"):
        m.udp_sockets += sum(1 for f in _net_table(root, table) if len(f) > 9 and f[9] in inodes)
    m.rss_mib, m.pss_mib = round(m.rss_mib, 1), round(m.pss_mib, 1)
    m.rss_anon_mib, m.rss_file_mib = round(m.rss_anon_mib, 1), round(m.rss_file_mib, 1)
    return m


def show(m: TreeMemory) -> None:
    print(f"{m.label}: {m.processes} processes ({m.threads} threads), RSS {m.rss_mib:.1f} MiB (anon {m.rss_anon_mib:.1f}, "
          f"file {m.rss_file_mib:.1f}), PSS {m.pss_mib:.1f} MiB (root {m.root_rss_mib:.1f} MiB; children {m.child_rss_mib}; largest child {m.max_child_rss_mib} "
          f"MiB), {m.tcp_listen} TCP listening, {m.udp_sockets} UDP", flush=True)


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MIB, left))
            f.write(chunk)
            left -= len(chunk)


# -- prototype: the engine alone ----------------------------------------------------------------------------------
def prototype(a: argparse.Namespace, work: Path) -> list[TreeMemory]:
    from docket.torrent.ctorrent_engine import CtorrentEngine
    from docket.torrent.metainfo import build_torrent
    from docket.torrent.opentracker import Opentracker, _free_port

    if a.cache_mb is not None:
        os.environ["DOCKET_CTORRENT_ARGS"] = f"-C {int(a.cache_mb)}"
    results = []
    tracker = Opentracker(a.tracker_ip, _free_port(a.tracker_ip), work / "tracker", log_path=work / "tracker.log")
    blobs, torrents, hashes = [], [], []
    (work / "blobs").mkdir()
    (work / "torrents").mkdir()
    for k in range(a.blobs):
        blob, torrent = work / "blobs" / f"blob{k}", work / "torrents" / f"blob{k}.torrent"
        _random_file(blob, int(a.blob_mib * MIB))
        meta = build_torrent(blob, tracker.announce_url, out=torrent)  # the registry's default piece size
        blobs.append(blob)
        torrents.append(torrent)
        hashes.append(meta.info_hash)
    tracker.start(hashes)
    engine = CtorrentEngine(tied=True)
    seeders, leechers = [], []
    try:
        t = time.monotonic()
        for k, (blob, torrent) in enumerate(zip(blobs, torrents)):
            seeders.append(engine.seed(torrent, blob, workdir=work / "seed" / str(k), listen_ip=a.seed_ip,
                                       log_path=work / "seed" / str(k) / "ctorrent.log"))
        for s in seeders:
            s.wait_listening(30)
        print(f"{len(seeders)} seeders listening after {time.monotonic() - t:.1f} s", flush=True)
        time.sleep(a.settle)
        results.append(measure(os.getpid(), exclude=("opentracker",), label=f"prototype idle, {a.blobs} x {a.blob_mib:g} MiB, "
                                            f"-C {a.cache_mb if a.cache_mb is not None else 'default (16)'}"))
        show(results[-1])
        if a.serve:
            leech_engine = CtorrentEngine(tied=True)
            t = time.monotonic()
            for start in range(0, len(torrents), a.leech_parallel):
                batch = []
                for k in range(start, min(start + a.leech_parallel, len(torrents))):
                    batch.append(leech_engine.download(torrents[k], work / "leech" / f"blob{k}",
                                                       workdir=work / "leech" / f"w{k}", listen_ip=a.leech_ip,
                                                       seed_hours=1))
                leechers.extend(batch)
                for ld in batch:
                    if not ld.completed.wait(120):
                        raise RuntimeError(f"leecher did not complete: {ld.tail()}")
                leech_engine.stop_all(batch, 5.0)
                for k in range(start, min(start + a.leech_parallel, len(torrents))):
                    (work / "leech" / f"blob{k}").unlink(missing_ok=True)
            print(f"every blob downloaded once from the seeders in {time.monotonic() - t:.1f} s", flush=True)
            time.sleep(a.settle)
            results.append(measure(os.getpid(), exclude=("opentracker",), label=f"prototype after serving each blob once, {a.blobs} x "
                                                f"{a.blob_mib:g} MiB, -C {a.cache_mb if a.cache_mb is not None else 'default (16)'}"))
            show(results[-1])
        return results
    finally:
        engine.stop_all(seeders + leechers, 5.0)
        tracker.stop()


# -- agent: the real thing ------------------------------------------------------------------------------------------
def _http_ok(url: str, timeout: float = 5.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.returncode}: " +
                               (log.read_text(errors="replace")[-2000:] if log else ""))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)


def agent(a: argparse.Namespace, work: Path) -> list[TreeMemory]:
    from benchmarks.swarm import build_image  # noqa: PLC0415 - the swarm benchmark's synthetic docker save
    py = sys.executable
    procs: list[subprocess.Popen] = []
    results = []
    reg_ip, port = a.tracker_ip, a.registry_port
    base = f"http://{reg_ip}:{port}"
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (os.environ.get("PYTHONPATH"), root) if x))
    if a.cache_mb is not None:
        env["DOCKET_CTORRENT_ARGS"] = f"-C {int(a.cache_mb)}"

    def spawn(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, start_new_session=True)
        procs.append(p)
        return p

    try:
        (work / "registry").mkdir()
        reg = spawn([py, "-m", "docket.registry.cli", "--bind", reg_ip, "--advertise-address", reg_ip, "--port",
                     str(port), "--tracker-port", str(a.registry_port + 1), "--location", str(work / "registry"),
                     "--gc-interval", "0", "--log-level", "info"], work / "registry.log")
        _wait("registry healthy", lambda: _http_ok(f"{base}/healthz"), 60, reg, work / "registry.log")
        tar = work / "image.tar"
        ref = f"bench/memory:b{a.blobs}-{os.getpid()}"
        build_image(tar, int(a.blobs * a.blob_mib * MIB), ref, layers=a.blobs)
        repo, _, tag = ref.rpartition(":")
        r = subprocess.run(["curl", "-sS", "--noproxy", "*", "-X", "PUT", "-T", str(tar), "-H",
                            "Content-Type: application/x-tar", "-o", str(work / "push.json"), "-w", "%{http_code}",
                            f"{base}/api/v1/repositories/{repo}/tags/{tag}"], capture_output=True, text=True,
                           timeout=600)
        if r.stdout.strip() != "201":
            raise RuntimeError(f"push failed: {r.stdout} {r.stderr} {(work / 'push.json').read_text()[:500]}")
        tar.unlink()
        agents = []
        for k, ip in enumerate([a.seed_ip, a.leech_ip][: 2 if a.serve else 1]):
            cache = work / f"agent{k}"
            cache.mkdir()
            p = spawn([py, "-m", "docket.client", "--host", f"http://{reg_ip}", "--port", str(port), "agent",
                       "--listen", f"{ip}:5000", "--cache-dir", str(cache), "--peer-ip", ip, "--log-level", "info",
                       "--seed-engine", a.seed_engine],
                      work / f"agent{k}.log")
            _wait(f"agent {ip} GET /v2/", lambda ip=ip: _http_ok(f"http://{ip}:5000/v2/"), 90, p, work / f"agent{k}.log")
            t = time.monotonic()
            pull = subprocess.run([py, str(Path(__file__).resolve().parent / "v2pull.py"), f"http://{ip}:5000", ref,
                                   "--timeout", "120"], capture_output=True, text=True, timeout=1800, env=env)
            out = json.loads(pull.stdout.strip().splitlines()[-1])
            if not out["ok"]:
                raise RuntimeError(f"pull through agent {ip} failed: {out['error']}")
            print(f"agent {ip}: pulled {a.blobs} layers in {time.monotonic() - t:.1f} s", flush=True)
            agents.append((p, ip))
            time.sleep(a.settle)
            acct = _json(f"http://{agents[0][1]}:5000/_docket/agent")
            m = measure(agents[0][0].pid, f"agent {agents[0][1]} " + ("after its pull" if k == 0 else
                                                                        "after a second agent pulled from it"))
            m.label += f" (--seed-engine {a.seed_engine}; its accounting: seeding {acct.get('totals', {}).get('seeding')} blobs)"
            results.append(m)
            show(m)
        return results
    finally:
        for p in reversed(procs):
            _stop(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prototype", "agent"])
    p.add_argument("--blobs", type=int, default=100)
    p.add_argument("--blob-mib", type=float, default=4.0)
    p.add_argument("--cache-mb", type=int, default=None, help="ctorrent -C (MB) for every ctorrent (default: its own)")
    p.add_argument("--seed-engine", choices=["libtorrent", "ctorrent"], default="libtorrent",
                   help="agent mode: the agents' --seed-engine")
    p.add_argument("--serve", action="store_true", help="have every blob downloaded from the seeders once, measure again")
    p.add_argument("--leech-parallel", type=int, default=10, help="prototype --serve: leechers at a time")
    p.add_argument("--tracker-ip", default="127.0.0.71", help="tracker (prototype) / registry (agent) address")
    p.add_argument("--seed-ip", default="127.0.0.72")
    p.add_argument("--leech-ip", default="127.0.0.73")
    p.add_argument("--registry-port", type=int, default=18071, help="agent mode: the registry (tracker: +1)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each measurement")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory (e.g. /dev/shm)")
    p.add_argument("--out", type=Path, default=None, help="append the measurements to this JSON file")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dkmem-", dir=a.workdir))
    work.chmod(0o755)  # opentracker drops to nobody
    try:
        results = prototype(a, work) if a.mode == "prototype" else agent(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(a.out.read_text()) if a.out.exists() else []
        old.append({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "measurements": [asdict(m) for m in results]})
        a.out.write_text(json.dumps(old, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
