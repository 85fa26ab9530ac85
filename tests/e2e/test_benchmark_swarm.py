"""A small run of benchmarks/swarm.py: 2 hosts, 4 MiB, fast links, in real network namespaces.

Needs root and ``ip netns``: skipped without them, except under CI=true where that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI", "").lower() == "true"


def _load_swarm():
    spec = importlib.util.spec_from_file_location("docket_bench_swarm", ROOT / "benchmarks" / "swarm.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


swarm = _load_swarm()


def _require() -> None:
    ok, why = swarm.netns_supported()
    missing = [t for t in ("ctorrent", "opentracker", "curl") if shutil.which(t) is None]
    if ok and missing:
        ok, why = False, f"missing tools: {', '.join(missing)}"
    if not ok:
        if CI:
            pytest.fail(f"swarm benchmark cannot run under CI: {why}")
        pytest.skip(f"swarm benchmark: {why}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_small_swarm_run(tmp_path: Path) -> None:
    _require()
    prefix = "dkbt"
    tag = f"{prefix}{os.getpid()}"
    work = tmp_path / "work"
    work.mkdir()
    cfg = swarm.Config(hosts=[2], size_mib=4, rate_mbit=400, seed_time=10, out=tmp_path / "out", prefix=prefix,
                       timeout=120, workdir=work, plot=False)
    try:
        results = swarm.benchmark(cfg)
    finally:
        left = [ns for ns in _namespaces() if ns.startswith(tag)]
        assert not left, f"namespaces left behind: {left}"
    assert not list(work.iterdir()), "temp files left behind"

    data = json.loads((cfg.out / "results.json").read_text())
    assert len(data["rounds"]) == 1 and len(results) == 1
    r = data["rounds"][0]
    assert r["n"] == 2 and r["all_finished"] is True
    assert r["size_bytes"] >= 4 * 1024 * 1024
    assert r["docket_s"] > 0 and r["http_s"] > 0 and r["link_bound_s"] > 0
    assert r["docket_over_bound"] > 0 and r["http_over_docket"] > 0
    assert len(r["docket_hosts"]) == 2 and len(r["http_hosts"]) == 2
    for h in r["docket_hosts"] + r["http_hosts"]:
        assert h["ok"] and h["sha256_ok"], h
        assert h["bytes"] == r["size_bytes"]
        assert 0 < h["done_at"] < 120
    assert {h["host"] for h in r["docket_hosts"]} == {"198.18.0.11", "198.18.0.12"}
    for h in r["docket_hosts"]:
        # the kernel's counters of the host's link: the whole layer came in over it (wire bytes >= payload)
        assert h["link"] and h["link"][-1][1] * 1e6 >= r["size_bytes"], h["link"][-3:]
        assert [row[0] for row in h["link"]] == sorted(row[0] for row in h["link"])
        # ctorrent's status as the pull saw it (a 4 MiB download may end before its second status line)
        assert h["progress"] and 0 <= h["progress"][-1][1] <= h["progress"][-1][2] and h["progress"][-1][2] > 0
        # the pull returned once the image was verified; its background seeder stopped later, by itself
        assert h["done_at"] <= h["returned_at"] < 60
        assert h["returned_at"] <= h["seeding_stopped_at"] <= h["seeder_exited_at"] < 60
    assert r["docket_all_exited_s"] == max(h["returned_at"] for h in r["docket_hosts"])
    assert r["seeders_exited_s"] == max(h["seeder_exited_at"] for h in r["docket_hosts"])
    assert r["layers"] == 1
    assert (cfg.out / "results.csv").read_text().startswith("n,layers,")
    # issue 16: the median host against the bound, and the machine's CPU from the barrier to the last host ready
    assert r["docket_median_over_bound"] == pytest.approx(r["docket_median_s"] / r["link_bound_s"], abs=0.01)
    cpu = r["cpu"]
    assert 0 < cpu["busy_pct"] <= 100 and cpu["ncpu"] == os.cpu_count() and cpu["seconds"] >= r["docket_s"] * 0.9
    assert set(cpu["groups_pct"]) == set(swarm.CPU_GROUPS)
    assert cpu["groups_cpu_s"]["docket pull (python)"] > 0  # two pulls ran in the lab's namespaces
    assert r["cpu_series"] and all(0 <= row[1] <= 100 for row in r["cpu_series"])
    assert "cpu_busy_pct" in (cfg.out / "results.csv").read_text().splitlines()[0]


@pytest.mark.timeout(240)
def test_small_v2_direct_run(tmp_path: Path) -> None:
    """--mode v2-direct: every host pulls as dockerd would from the registry's /v2; figures and clean-up."""
    _require()
    prefix = "dkbv"
    tag = f"{prefix}{os.getpid()}"
    work = tmp_path / "work"
    work.mkdir()
    cfg = swarm.Config(hosts=[2], size_mib=4, rate_mbit=100, layers=[4], out=tmp_path / "out", prefix=prefix,
                       timeout=120, workdir=work, plot=False, modes=["v2-direct"])
    try:
        swarm.benchmark(cfg)
    finally:
        left = [ns for ns in _namespaces() if ns.startswith(tag)]
        assert not left, f"namespaces left behind: {left}"
    assert not list(work.iterdir()), "temp files left behind"
    data = json.loads((cfg.out / "results.json").read_text())
    r = data["rounds"][0]
    assert r["all_finished"] is True and r["docket_hosts"] == [] and r["http_hosts"] == [] and r["docket_s"] is None
    assert len(r["v2_direct_hosts"]) == 2
    for h in r["v2_direct_hosts"]:
        assert h["ok"] and h["sha256_ok"] and h["retries"] == 0, h
        assert h["bytes"] > r["size_bytes"]  # the layers and the config
        assert h["link"] and h["link"][-1][1] * 1e6 >= r["size_bytes"]
    # the registry's one 100 Mbit/s uplink carried both hosts' copies: the last host cannot beat 2x the bound
    assert r["v2_direct_s"] == max(h["done_at"] for h in r["v2_direct_hosts"])
    assert r["v2_direct_s"] >= 2 * r["link_bound_s"] * 0.9, r
    assert data["summary"][0]["v2_direct_s_median"] == r["v2_direct_s"]


@pytest.mark.timeout(240)
def test_small_agent_run(tmp_path: Path) -> None:
    """--mode agent: a `docket agent` per host namespace, pulled through as dockerd would; the layers come from
    peers (the agents' own accounting), and the agents are gone with the namespaces."""
    _require()
    prefix = "dkba"
    tag = f"{prefix}{os.getpid()}"
    work = tmp_path / "work"
    work.mkdir()
    cfg = swarm.Config(hosts=[2], size_mib=4, rate_mbit=200, layers=[3], out=tmp_path / "out", prefix=prefix,
                       timeout=120, workdir=work, plot=False, modes=["agent"])
    try:
        swarm.benchmark(cfg)
    finally:
        left = [ns for ns in _namespaces() if ns.startswith(tag)]
        assert not left, f"namespaces left behind: {left}"
    assert not list(work.iterdir()), "temp files left behind"
    r = json.loads((cfg.out / "results.json").read_text())["rounds"][0]
    assert r["all_finished"] is True and r["v2_direct_hosts"] == [] and r["agent_s"] > 0
    assert r["agent_start_s"] > 0
    for h in r["agent_hosts"]:
        assert h["ok"] and h["retries"] == 0, h
        layers = [b for b in h["agent"]["blobs"] if b["size"] > 1024]  # the three layers (not the config)
        assert len(layers) == 3 and all(b["via"] == "p2p" for b in layers), h["agent"]["blobs"]
        assert h["agent"]["totals"]["bytes_from_peers"] == r["size_bytes"]
        assert h["agent"]["pid"] > 0 and not Path(f"/proc/{h['agent']['pid']}").exists()  # stopped after the round
    assert r["agent_bytes_from_peers"] == 2 * r["size_bytes"]


def test_limit_check_reads_a_link_counter_against_the_limit():
    """Issue 15's figure: the mean rate while the counter moved (5 % to 95 % of its total) and first to last byte."""
    # [s, MB received, MB sent]: 1 s of nothing, then 2 MB/s for 10 s, then still
    link = [[t / 4, max(0.0, min(20.0, 2.0 * (t / 4 - 1))), 0.0] for t in range(0, 60)]
    check = swarm.limit_check(link, 1, 2_000_000, "c0 download")
    assert check["total_bytes"] == 20_000_000
    assert check["steady_ratio"] == pytest.approx(1.0, abs=0.03)
    assert check["whole_ratio"] == pytest.approx(1.0, abs=0.05)
    assert "steady_ratio" not in swarm.limit_check(link, 2, 2_000_000, "c0 upload")  # nothing sent
    with pytest.raises(SystemExit):
        swarm.parse_args(["--registry-max-upload-rate", "2000"])  # a bare number: refused, as by the programs


def test_cpu_sampler_counts_a_busy_process_outside_the_lab() -> None:
    """CpuSampler: the machine's busy share and a process's CPU seconds in its group (here: not in the lab)."""
    class NoLab:
        created: list[str] = []
        reg = br = ""

    sampler = swarm.CpuSampler(NoLab(), time.monotonic(), interval=0.1)  # type: ignore[arg-type]
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    try:
        busy.wait(10)
        time.sleep(0.15)
    finally:
        sampler.stop()
    w = sampler.window(10.0)
    assert w["busy_pct"] >= 100 / (os.cpu_count() or 1) * 0.5, w  # one core spun for the second
    assert w["groups_cpu_s"]["outside the benchmark"] >= 0.5, w  # the child (not in a lab namespace)
    assert sum(w["groups_pct"].values()) <= 100.5
    assert sampler.series() and all(len(row) == 4 for row in sampler.series())
