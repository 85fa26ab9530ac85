#!/usr/bin/env python3
"""Measure before switching engines: N bare libtorrent peers pull one blob that docket-registry seeds (ctorrent).

Issue 13 allows a second BitTorrent engine if ctorrent's choking keeps N=16 above its target. This puts a plain
libtorrent session on each client host of swarm.py's simulated network (same namespaces, links, registry and
tracker; one layer of ``--size-mib``) and reports when each host had the whole blob, for each settings variant.
libtorrent is not a dependency of docket: ``pip install libtorrent==2.1.1`` first.

    sudo .venv/bin/python benchmarks/libtorrent_swarm.py --hosts 8 --variants untuned,fast,tuned
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("docket_bench_swarm", HERE / "swarm.py")
assert _spec and _spec.loader
swarm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = swarm
_spec.loader.exec_module(swarm)

# Settings on top of the common ones (TCP only like the shaped links, no DHT/LSD/UPnP, several peers per IP).
VARIANTS: dict[str, dict[str, object]] = {
    "untuned": {},
    # ctorrent-like slots, but re-chosen every 2 s instead of every 10-15 s
    "fast": {"unchoke_interval": 2, "optimistic_unchoke_interval": 4, "choking_algorithm": 0,
             "unchoke_slots_limit": 4, "seed_choking_algorithm": 1},
    # more slots, deeper request queues, bigger send buffers, suggest mode, quicker piece timeouts
    "tuned": {"unchoke_interval": 2, "optimistic_unchoke_interval": 4, "choking_algorithm": 0,
              "unchoke_slots_limit": 8, "seed_choking_algorithm": 0, "max_out_request_queue": 1500,
              "request_queue_time": 1, "send_buffer_watermark": 4194304, "send_buffer_low_watermark": 1048576,
              "send_buffer_watermark_factor": 150, "suggest_mode": 1, "piece_timeout": 5},
}

PEER = r"""
import json, os, sys, time
import libtorrent as lt
torrent, save, ip, ready, go, out, stop, extra = sys.argv[1:9]
settings = {"enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
            "enable_outgoing_utp": False, "enable_incoming_utp": False, "listen_interfaces": f"{ip}:6881",
            "outgoing_interfaces": ip, "allow_multiple_connections_per_ip": True, "alert_mask": 0}
settings.update(json.loads(extra))
ses = lt.session(settings)
info = lt.torrent_info(torrent)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
t0 = time.time()
h = ses.add_torrent({"ti": info, "save_path": save})
done = None
while not os.path.exists(stop):  # keep seeding for the others until the round ends
    st = h.status()
    if done is None and st.is_seeding:
        done = time.time()
        open(out, "w").write(json.dumps({"start": t0, "done": done}))
    time.sleep(0.05)
open(out, "w").write(json.dumps({"start": t0, "done": done, "up": h.status().total_payload_upload}))
"""


def one_round(bench, n: int, record: dict, rdir: Path, settings: dict) -> tuple[list[float], list[int]]:
    layer = swarm.image_layers(record)[0]
    torrent = rdir / "layer.torrent"
    bench.curl(bench.lab.reg, "-o", str(torrent), f"{bench.base}{layer['torrent_url']}")
    go, stop = rdir / "go", rdir / "stop"
    procs = []
    for i in range(n):
        (rdir / f"lt{i}").mkdir()
        procs.append(bench.spawn(bench.lab.clients[i], [
            sys.executable, "-c", PEER, str(torrent), str(rdir / f"lt{i}"), bench.lab.client_ips[i],
            str(rdir / f"ready{i}"), str(go), str(rdir / f"out{i}"), str(stop), json.dumps(settings)],
            rdir / f"lt{i}.log"))
    while not all((rdir / f"ready{i}").exists() for i in range(n)):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(swarm._tail(rdir / "lt0.log"))
        time.sleep(0.01)
    t0 = time.time()
    go.touch()
    deadline = time.time() + bench.cfg.timeout
    while time.time() < deadline and not all((rdir / f"out{i}").exists() for i in range(n)):
        time.sleep(0.1)
    stop.touch()
    bench._await(procs, time.monotonic(), "libtorrent peers")
    outs = [json.loads((rdir / f"out{i}").read_text()) for i in range(n)]
    for i in range(n):
        shutil.rmtree(rdir / f"lt{i}", ignore_errors=True)
    return sorted(o["done"] - t0 for o in outs), sorted(round(o.get("up", 0) / 1e6) for o in outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--rate-mbit", type=float, default=50.0)
    p.add_argument("--variants", default="untuned,fast,tuned", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"))
    a = p.parse_args(argv)
    try:
        import libtorrent  # noqa: F401
    except ImportError:
        print("libtorrent is not installed: pip install libtorrent==2.1.1", file=sys.stderr)
        return 2
    cfg = swarm.Config(hosts=[a.hosts], size_mib=a.size_mib, rate_mbit=a.rate_mbit, workdir=a.workdir,
                       skip_http=True, plot=False, out=Path(tempfile.mkdtemp()))
    bench = swarm.Bench(cfg)
    bench.tmp = Path(tempfile.mkdtemp(prefix=f"{bench.lab.tag}-", dir=a.workdir))
    bench.tmp.chmod(0o755)
    try:
        bench.lab.setup()
        bench.start_registry()
        for name in a.variants.split(","):
            for k in range(a.repeat):
                rdir = bench.tmp / f"{name}-{k}"
                rdir.mkdir()
                record = bench.push(a.hosts, 1)
                bound = sum(x["size"] for x in swarm.image_layers(record)) * 8 / (a.rate_mbit * 1e6)
                dones, ups = one_round(bench, a.hosts, record, rdir, VARIANTS[name])
                print(f"{name} N={a.hosts}: last {dones[-1]:.1f} s ({dones[-1] / bound:.2f}x bound), median "
                      f"{statistics.median(dones):.1f} s, first {dones[0]:.1f} s; uploaded MB per host {ups}",
                      flush=True)
    finally:
        bench.close()
        shutil.rmtree(cfg.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
