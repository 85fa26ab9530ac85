"""The design card's external tracker, for real: `docket-tracker` on its own host, the registry on another.

Issue 11: `docket-tracker` crashed at every start ("opentracker already running") and no test started it. Here
every installed program (pyproject [project.scripts]) is started by its entry point, in network namespaces
(tests/support/netns.py; 198.18.0.0/15 only): opentracker run by `docket-tracker` on host trk, `docket-registry
--tracker trk:8940` on host reg, three hosts pulling at once with default flags. Then the tracker is restarted
while the registry runs, and a new push's info hashes must reach the tracker within its poll interval.

The error paths of `docket-tracker` (missing opentracker, busy port, bad URL, registry down, SIGTERM, a killed
opentracker) run on loopback. Needs root and iproute2; under CI=true a missing tool fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from docket.client import background
from tests.support.netns import Lab, namespaces, require_netns
from tests.support.procs import free_port, stop_process, tail, wait_until
from tests.support.registry_images import build_image_tar
from tests.support.robustness_rows import record
from tests.support.tools import need, program


REG_IP, TRK_IP = "198.18.0.1", "198.18.0.2"
CLIENTS = {"c1": "198.18.0.11", "c2": "198.18.0.12", "c3": "198.18.0.13"}
REG_PORT, TRK_PORT = 8000, 8940
INTERVAL = 5.0  # docket-tracker's default --interval
REGISTRY = f"http://{REG_IP}:{REG_PORT}"


# Runs inside a namespace: poll the tracker until every info hash is accepted (opentracker's whitelist);
# prints the seconds it took, or exits 1 at the deadline.
ANNOUNCE_UNTIL_OK = textwrap.dedent("""
    import sys, time
    from docket.torrent.tracker import announce_ok
    url, deadline, hashes = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    t0 = time.monotonic()
    left = set(hashes)
    while left and time.monotonic() - t0 < deadline:
        for h in sorted(left):
            try:
                if announce_ok(url, h, 2.0):
                    left.discard(h)
            except Exception:
                pass
        time.sleep(0.1)
    print(round(time.monotonic() - t0, 2))
    sys.exit(1 if left else 0)
""")

# `docket pull` as three hosts run it, released together: the CLI's imports first, then a shared start file,
# so that no host sees layers another host already loaded into the one dockerd they share.
PULL_TOGETHER = textwrap.dedent("""
    import os, sys, time
    ready, go = sys.argv[1], sys.argv[2]
    from docket.client.cli import main
    import docket.client.pull, docket.client.transfer  # noqa: F401
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    main(sys.argv[3:])
""")


def _curl(lab: Lab, host: str, url: str) -> str:
    r = lab.run(host, ["curl", "-sS", "--noproxy", "*", "-m", "5", "-f", url], timeout=15)
    if r.returncode != 0:
        raise AssertionError(f"curl {url} from {host}: {r.stderr.strip()}")
    return r.stdout


def _whitelist(lab: Lab, host: str = "c1") -> set[str]:
    return set(_curl(lab, host, f"{REGISTRY}/api/v1/tracker/whitelist").split())


def _announce_until_ok(lab: Lab, hashes: set[str], deadline: float) -> float:
    r = lab.run("c1", [sys.executable, "-c", ANNOUNCE_UNTIL_OK, f"http://{TRK_IP}:{TRK_PORT}/announce",
                       str(deadline), *sorted(hashes)], timeout=deadline + 30)
    assert r.returncode == 0, f"tracker did not accept {len(hashes)} info hashes within {deadline}s: {r.stderr}"
    return float(r.stdout.split()[-1])


def _pull_summary(out: Path, log: Path, proc: subprocess.Popen) -> dict:
    assert proc.returncode == 0, f"docket pull exited {proc.returncode}:\n{tail(log)}"
    return json.loads(out.read_text().strip().splitlines()[-1])


def _all_through_bittorrent(summary: dict, what: str) -> int:
    """Every layer came from peers: no HTTP fallback, every layer's bytes counted as peer bytes."""
    assert summary["transport"] == "p2p", (what, summary)
    assert summary["bytes_from_http"] == 0 and summary["layers_over_http"] == 0, (what, summary)
    assert summary["fallback_reason"] is None, (what, summary)
    # the busybox layer may be in the shared dockerd already (other test images have it); the rest is fetched
    assert summary["layers_cached"] == 0, (what, summary)
    assert summary["layers_downloaded"] == summary["layers"] - summary["layers_present"] >= 2, (what, summary)
    for t in summary["layer_transfers"]:
        assert t["via"] == "p2p" and t["bytes_from_peers"] == t["size"], (what, t)
    return summary["bytes_from_peers"]


def _start_tracker(lab: Lab, log: Path) -> subprocess.Popen:
    started = log.read_text().count("opentracker pid") if log.exists() else 0  # a restart appends to the log
    proc = lab.spawn("trk", [program("docket-tracker"), "--registry", REGISTRY, "--port", str(TRK_PORT),
                             "--bind", TRK_IP], log)
    wait_until(lambda: proc.poll() is not None or log.read_text().count("opentracker pid") > started, timeout=30,
               what="docket-tracker to start opentracker")
    assert proc.poll() is None, f"docket-tracker exited {proc.returncode}:\n{tail(log)}"
    return proc


def _stop_tracker(lab: Lab, proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM by pid: docket-tracker exits 0 and takes its opentracker with it."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, tail(log)
    assert "Traceback" not in log.read_text(), tail(log)
    wait_until(lambda: not lab.pids("trk"), timeout=10, what="nothing left running on the tracker host")


@pytest.mark.timeout(300)
def test_external_tracker_design_card(tmp_path: Path, image_factory, docker_host: str) -> None:
    require_netns("external tracker e2e")
    hosts = {"reg": REG_IP, "trk": TRK_IP, **CLIENTS}
    env = {"DOCKER_HOST": docker_host}
    t_start = time.monotonic()
    lab = Lab("dktr", hosts)
    try:
        with lab:
            # 1. the tracker first: the registry is not up yet, docket-tracker logs that and keeps going
            tlog = tmp_path / "tracker.log"
            tracker = _start_tracker(lab, tlog)
            assert "cannot reach the registry" in tlog.read_text()
            rlog = tmp_path / "registry.log"
            registry = lab.spawn("reg", [
                program("docket-registry"), "--tracker", f"{TRK_IP}:{TRK_PORT}", "--advertise-address", REG_IP,
                "--bind", REG_IP, "--port", str(REG_PORT), "--location", str(tmp_path / "registry"),
            ], rlog, env=env)
            wait_until(lambda: registry.poll() is not None or _curl(lab, "c1", f"{REGISTRY}/healthz"), timeout=60,
                       what="docket-registry to answer /healthz")
            assert registry.poll() is None, tail(rlog)

            # 2. a three-layer image, pushed with `docket push` from the registry's host
            ref, marker = image_factory.build(data_mib=6)
            before = _whitelist(lab)
            t_push = time.monotonic()
            push = lab.run("reg", [program("docket"), "--host", f"http://{REG_IP}", "--port", str(REG_PORT),
                                   "--location", str(tmp_path / "pusher"), "--quiet", "push", ref, "--json"],
                           env=env, timeout=120)
            assert push.returncode == 0, push.stderr
            pushed_at = time.monotonic()
            hashes = _whitelist(lab) - before
            assert len(hashes) >= 3, hashes
            push_s = pushed_at - t_push
            # the registry's new whitelist reached the tracker within one poll interval: the push waited for it
            took = _announce_until_ok(lab, hashes, INTERVAL + 5)
            assert took < 1.0 and push_s < INTERVAL + 15, (took, push_s)
            record("tracker", "docket-tracker started for real (issue 11: crashed at every start)",
                   f"opentracker on its own host; `docket push` returned in {push_s:.1f}s, once the tracker "
                   f"(poll interval {INTERVAL:g}s) accepted all {len(hashes)} layer hashes")
            image_factory.remove(ref)  # the clients share one dockerd: each must fetch every layer itself

            # 3. three hosts pull at once, default flags: every layer byte through BitTorrent
            go = tmp_path / "go"
            pulls = []
            for name in CLIENTS:
                out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
                pulls.append((name, out, log, lab.spawn(name, [
                    sys.executable, "-c", PULL_TOGETHER, str(tmp_path / f"ready-{name}"), str(go),
                    "--host", f"http://{REG_IP}", "--port", str(REG_PORT), "--location", str(tmp_path / name),
                    "pull", ref, "--json",
                ], log, env=env, stdout=out)))
            wait_until(lambda: all((tmp_path / f"ready-{n}").exists() for n in CLIENTS)
                       or any(p.poll() is not None for *_, p in pulls), timeout=60, what="pulls to be ready")
            go.touch()
            t0 = time.monotonic()
            for _name, _out, log, proc in pulls:
                proc.wait(180)
            pull_s = time.monotonic() - t0
            summaries = [_pull_summary(out, log, proc) for _name, out, log, proc in pulls]
            peer_bytes = [_all_through_bittorrent(summary, name) for summary, (name, *_) in zip(summaries, pulls)]
            assert image_factory.run(ref) == marker
            loaded = sorted(float(summary["seconds"]) for summary in summaries)
            record("tracker", "3 hosts pull at once via the external tracker, default flags",
                   f"loaded in {loaded[0]:.1f}-{loaded[-1]:.1f}s, {peer_bytes[0]} layer bytes each via BitTorrent, "
                   f"0 over HTTP; all returned at load ({pull_s:.0f}s), seeding on in the background")

            # 4. the tracker restarts while the registry runs: a later pull still goes through BitTorrent.
            # The pulls' background seeders are stopped first: while they seed, the registry's check (does the
            # tracker still list a seeder for a hash it listed one for?) can see theirs announced again and miss
            # that the registry's own were forgotten (README, "Seeding in the background": known limit)
            for name in CLIENTS:
                background.stop(tmp_path / name)
            _stop_tracker(lab, tracker, tlog)
            tracker = _start_tracker(lab, tlog)
            restarted_at = time.monotonic()
            assert registry.poll() is None, tail(rlog)
            image_factory.remove(ref)
            out, log = tmp_path / "later.json", tmp_path / "later.log"
            later = lab.spawn("c1", [program("docket"), "--host", f"http://{REG_IP}", "--port", str(REG_PORT),
                                     "--location", str(tmp_path / "later"), "pull", ref, "--json"],
                              log, env=env, stdout=out)
            started_after = time.monotonic() - restarted_at
            later.wait(180)
            summary = _pull_summary(out, log, later)
            _all_through_bittorrent(summary, "after the tracker restart")
            assert "lost its peers" in rlog.read_text(), tail(rlog)
            record("tracker", "tracker restarted while the registry runs",
                   f"it had the whitelist at once; the registry saw it lost its peers and re-announced every seeder; "
                   f"a pull started {started_after:.1f}s after the restart loaded in {summary['seconds']:.1f}s, "
                   "all via BitTorrent")

            # 5. a new push after the restart: its hashes reach the restarted tracker within the interval
            ref2, _ = image_factory.build(data_mib=1)
            before = _whitelist(lab)
            t_push = time.monotonic()
            push = lab.run("reg", [program("docket"), "--host", f"http://{REG_IP}", "--port", str(REG_PORT),
                                   "--location", str(tmp_path / "pusher"), "--quiet", "push", ref2, "--json"],
                           env=env, timeout=120)
            assert push.returncode == 0, push.stderr
            push_s = time.monotonic() - t_push
            new = _whitelist(lab) - before
            assert new, "the second image added no info hash"
            took = _announce_until_ok(lab, new, INTERVAL + 5)
            assert took < 1.0 and push_s < INTERVAL + 15, (took, push_s)
            record("tracker", "whitelist change after a tracker restart",
                   f"the push returned in {push_s:.1f}s with its {len(new)} new hashes accepted by the restarted "
                   f"tracker (poll interval {INTERVAL:g}s)")

            _stop_tracker(lab, tracker, tlog)
            stop_process(registry, timeout=30)
            assert registry.returncode == 0, tail(rlog)
            assert "Traceback" not in tlog.read_text()
    finally:
        left = [ns for ns in namespaces() if ns.startswith(lab.tag)]
        assert not left, f"namespaces left behind: {left}"
    print(f"external tracker e2e: {time.monotonic() - t_start:.1f}s")


# -- docket-tracker's own error paths and recovery, on loopback --------------------------------------------------

def _tracker_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([program("docket-tracker"), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess, code: int, text: str) -> str:
    """Exit ``code``, ``text`` in the first stderr line (a hint may follow), never a traceback."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and text in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("Usage:", "Try "))]
    assert 1 <= len(lines) <= 2 and (len(lines) == 1 or lines[1].lstrip().startswith("hint:")), r.stderr
    return lines[0]


@pytest.mark.timeout(120)
def test_tracker_cli_errors_are_one_line(tmp_path: Path) -> None:
    need("opentracker")
    port = free_port()
    reg = "http://127.0.0.1:1"
    cases = {
        "registry URL without a scheme": (["--registry", "registry:8000"], 2, "not an http:// or https:// URL"),
        "registry URL with a query": (["--registry", "http://r:8000/?x=1"], 2, "base URL"),
        "registry port out of range": (["--registry", "http://r:99999"], 2, "out of range"),
        "--bind not IPv4": (["--registry", reg, "--bind", "::1"], 2, "not an IPv4 address"),
        "--bind not an address of this host": (["--registry", reg, "--bind", "198.18.255.254"], 2,
                                               "not an address of this host"),
    }
    for case, (args, code, text) in cases.items():
        line = _one_line_error(_tracker_cli(*args, "--port", str(port)), code, text)
        record("tracker", f"docket-tracker: {case}", f"exit {code}: {line}")

    with socket.socket() as busy:  # our own listener holds the port
        busy.bind(("127.0.0.1", port))
        busy.listen()
        line = _one_line_error(_tracker_cli("--registry", reg, "--bind", "127.0.0.1", "--port", str(port)), 8,
                               "already in use")
    record("tracker", "docket-tracker: port in use", f"exit 8, nothing started: {line}")

    # opentracker missing: hidden in a private mount namespace (/dev/null mounted over it: not executable)
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to hide opentracker")
    hide = f"mount --bind /dev/null {need('opentracker')} && exec \"$@\""
    r = subprocess.run(["unshare", "--mount", "sh", "-c", hide, "sh", program("docket-tracker"), "--registry", reg,
                        "--bind", "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=30)
    line = _one_line_error(r, 7, "opentracker is not installed")
    record("tracker", "docket-tracker: opentracker not installed", f"exit 7 with the install hint: {line}")


def _pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _opentracker_pid(workdir: Path) -> int:
    pid = int((workdir / "opentracker.pid").read_text())
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"opentracker")
    return pid


def _accepted(announce: str, info_hash: str) -> bool:
    from docket.torrent.tracker import announce_ok

    return announce_ok(announce, info_hash, 2.0)


@pytest.mark.timeout(180)
def test_tracker_follows_registry_and_survives(tmp_path: Path, registry_server) -> None:
    """Registry down, opentracker killed, docket-tracker killed: the whitelist in force survives all three."""
    port = free_port()
    workdir = tmp_path / "trk"
    announce = f"http://127.0.0.1:{port}/announce"
    log = tmp_path / "docket-tracker.log"
    args = [program("docket-tracker"), "--registry", registry_server.url, "--bind", "127.0.0.1", "--port",
            str(port), "--interval", "0.5", "--workdir", str(workdir)]

    def started() -> int:
        return log.read_text().count(", following ") if log.exists() else 0

    def start() -> subprocess.Popen:
        before = started()
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: proc.poll() is not None or started() > before, timeout=30, what="docket-tracker")
        assert proc.poll() is None, tail(log)
        return proc

    tarball = tmp_path / "image.tar"
    build_image_tar(tarball, payload=os.urandom(4096), repo_tag="trk/app:v1")
    proc = start()
    try:
        resp = requests.put(f"{registry_server.url}/api/v1/repositories/trk/app/tags/v1", data=tarball.read_bytes(),
                            headers={"Content-Type": "application/x-tar"}, timeout=60)
        assert resp.status_code == 201, resp.text
        pushed = time.monotonic()
        hashes = requests.get(f"{registry_server.url}/api/v1/tracker/whitelist", timeout=10).text.split()
        assert hashes
        wait_until(lambda: all(_accepted(announce, h) for h in hashes), timeout=5, what="the whitelist to follow")
        took = time.monotonic() - pushed
        record("tracker", "docket-tracker follows the registry's whitelist (--interval 0.5)",
               f"{len(hashes)} hashes accepted {took:.2f}s after the push")

        # opentracker killed (our grandchild, by the pid docket-tracker recorded): started again, same whitelist
        first = _opentracker_pid(workdir)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: _opentracker_pid(workdir) != first and all(_accepted(announce, h) for h in hashes),
                   timeout=10, what="opentracker to be started again")
        assert proc.poll() is None
        record("tracker", "opentracker killed under docket-tracker",
               "started again within an interval with the whitelist in force; docket-tracker kept running")

        # the registry goes down: logged once, the whitelist stays
        registry_server.stop()
        wait_until(lambda: "cannot reach the registry" in log.read_text(), timeout=10, what="the warning")
        time.sleep(2)
        assert log.read_text().count("cannot reach the registry") == 1, tail(log)
        assert all(_accepted(announce, h) for h in hashes) and proc.poll() is None
        record("tracker", "registry down while docket-tracker runs",
               "one warning line, opentracker keeps the last whitelist, docket-tracker keeps polling")

        # docket-tracker killed with SIGKILL: its opentracker is left; the next start stops it (pid file + workdir)
        orphan = _opentracker_pid(workdir)
        proc.kill()
        proc.wait(10)
        assert _pid_alive(orphan)
        proc = start()
        assert not _pid_alive(orphan), "the previous run's opentracker is still running"
        assert "stopping opentracker pid" in log.read_text(), tail(log)
        # ... and with the registry still down it serves the whitelist the previous run left in --workdir
        assert all(_accepted(announce, h) for h in hashes)
        record("tracker", "docket-tracker SIGKILLed, restarted while the registry is down",
               "the orphan opentracker is stopped by pid; the new one serves the saved whitelist at once")

        # SIGTERM: exit 0, opentracker stopped, no traceback
        last = _opentracker_pid(workdir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, tail(log)
        assert not _pid_alive(last) and not (workdir / "opentracker.pid").exists()
        assert "Traceback" not in log.read_text(), tail(log)
        record("tracker", "docket-tracker SIGTERM", "exit 0; its opentracker stopped by pid; no traceback")
    finally:
        stop_process(proc)
        for pid_file in [workdir / "opentracker.pid"]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"opentracker"):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_tracker_of_a_registry_with_read_tokens(tmp_path: Path) -> None:
    """docket-tracker --token runs opentracker behind the guard: no full scrape or /stats lists the hashes."""
    need("ctorrent")
    need("opentracker")
    from tests.support.registry_server import RegistryServer

    push_token, read_token = "push-" + os.urandom(8).hex(), "read-" + os.urandom(8).hex()
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log",
                            extra_args=["--auth-token", push_token, "--read-token", read_token])
    server.start()
    procs: list[subprocess.Popen] = []
    try:
        tarball = tmp_path / "image.tar"
        build_image_tar(tarball, payload=os.urandom(4096), repo_tag="priv/app:v1")
        resp = requests.put(f"{server.url}/api/v1/repositories/priv/app/tags/v1", data=tarball.read_bytes(),
                            headers={"Content-Type": "application/x-tar", "Authorization": f"Bearer {push_token}"},
                            timeout=60)
        assert resp.status_code == 201, resp.text
        hashes = requests.get(f"{server.url}/api/v1/tracker/whitelist", timeout=10,
                              headers={"Authorization": f"Bearer {read_token}"}).text.split()
        assert hashes

        # without the token: the registry answers 401; logged with the hint, and docket-tracker keeps running
        port0, log0 = free_port(), tmp_path / "tokenless.log"
        with open(log0, "ab") as out:
            procs.append(subprocess.Popen(
                [program("docket-tracker"), "--registry", server.url, "--bind", "127.0.0.1", "--port", str(port0),
                 "--interval", "0.5"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "DOCKET_TOKEN"}))
        wait_until(lambda: "HTTP 401" in log0.read_text(), timeout=30, what="the 401 warning")
        assert "--token" in log0.read_text() and procs[0].poll() is None, tail(log0)
        record("tracker", "docket-tracker without the read token of its registry",
               "one warning: 'the registry refused the whitelist request (HTTP 401)' with the hint --token; "
               "keeps running")

        port, log = free_port(), tmp_path / "guarded.log"
        with open(log, "ab") as out:
            procs.append(subprocess.Popen(
                [program("docket-tracker"), "--registry", server.url, "--bind", "127.0.0.1", "--port", str(port),
                 "--interval", "0.5", "--token", read_token], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT))
        announce = f"http://127.0.0.1:{port}/announce"
        wait_until(lambda: all(_accepted(announce, h) for h in hashes), timeout=30, what="the guarded tracker")
        assert "behind the guard" in log.read_text()
        for path in ("/scrape", "/stats", "/stats?mode=tpbs", "/stats?mode=everything"):
            r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert r.status_code == 404 and not any(h.encode() in r.content for h in hashes), (path, r.content)
        record("tracker", "docket-tracker --token (registry with read tokens): full scrape and /stats",
               "404 for everyone (opentracker behind the guard, as the managed tracker); announces pass")
        for p in procs:
            p.send_signal(signal.SIGTERM)
            assert p.wait(15) == 0
    finally:
        for p in procs:
            stop_process(p)
        server.stop()


def test_every_installed_program_starts() -> None:
    """The class of issue 11's crash: each [project.scripts] entry point runs (a new program is covered too);
    docket, docket-registry and docket-tracker are started for real above, in test_external_tracker_design_card."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"docket", "docket-registry", "docket-tracker"} <= set(scripts)
    for name in scripts:
        r = subprocess.run([program(name), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Usage:" in r.stdout and "Traceback" not in r.stderr, (name, r.stderr)
    record("tracker", "every [project.scripts] program starts",
           f"{', '.join(sorted(scripts))}: --help exits 0; all three run for real in the design-card test")


def test_whitelist_fetch_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that trickles its whitelist, sends too much or sends junk: refused, the caller keeps its list."""
    import http.server
    import threading

    from docket import tracker_cli
    from docket.errors import IntegrityError, ServiceUnavailable

    good = "a" * 40 + "\n"
    mode = {"kind": "trickle"}

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            if mode["kind"] == "trickle":  # one hash a second: each read is quick, the whole never ends
                for _ in range(30):
                    try:
                        self.wfile.write(good.encode())
                        self.wfile.flush()
                    except OSError:  # the client gave up: that is the point
                        return
                    time.sleep(1)
            elif mode["kind"] == "big":
                self.wfile.write(good.encode() * 3000)
            else:
                self.wfile.write(b"\x1b[2J" + good.encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from docket.deadline import DeadlineSession

        with DeadlineSession(tracker_cli.FETCH_DEADLINE) as session:
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="within 2s"):
                tracker_cli.fetch_whitelist(session, url, timeout=5, deadline=2)
            assert time.monotonic() - t0 < 5
            mode["kind"] = "big"
            monkeypatch.setattr(tracker_cli, "MAX_WHITELIST_BYTES", 64 * 1024)
            with pytest.raises(IntegrityError, match="larger than"):
                tracker_cli.fetch_whitelist(session, url)
            mode["kind"] = "junk"
            with pytest.raises(IntegrityError, match="malformed"):
                tracker_cli.fetch_whitelist(session, url)
    finally:
        server.shutdown()
        server.server_close()
    record("tracker", "docket-tracker: registry trickles, floods or garbles its whitelist",
           "whole-request deadline (30 s), 64 MiB cap, 40-hex check: refused with a warning, the whitelist in force "
           "stays")


def _announce_seeder(announce: str, info_hash: str) -> None:
    """A peer that says it has everything (left=0) and stays: what a registry seeder's announce leaves."""
    import urllib.parse

    q = urllib.parse.urlencode({"info_hash": bytes.fromhex(info_hash), "peer_id": b"-DK0001-" + os.urandom(6).hex()
                                .encode(), "port": 6881, "uploaded": 0, "downloaded": 0, "left": 0, "compact": 1},
                               quote_via=urllib.parse.quote)
    assert b"failure" not in requests.get(f"{announce}?{q}", timeout=5).content


@pytest.mark.timeout(120)
def test_registry_notices_an_external_tracker_restart(tmp_path: Path) -> None:
    """ExternalTracker against a real opentracker: settle() and needs_restart() (the registry's side)."""
    need("opentracker")
    from docket.registry.tracker import ExternalTracker
    from docket.torrent import Opentracker

    wl, other = os.urandom(20).hex(), os.urandom(20).hex()
    port = free_port()
    ot = Opentracker("127.0.0.1", port, tmp_path / "ot")
    ot.start([wl])
    try:
        ext = ExternalTracker(f"127.0.0.1:{port}")
        ext.CHECK_EVERY = 0.0
        ext.start([wl])
        # a whitelisted hash nobody seeds: returned, so the registry re-announces its seeder
        assert ext.settle([wl], timeout=2) == [wl]
        # a hash the tracker refuses: waited for once (bounded), then not again until one settles
        t0 = time.monotonic()
        assert ext.settle([other], timeout=1.0) == []
        assert 1.0 <= time.monotonic() - t0 < 5
        t0 = time.monotonic()
        assert ext.settle([other], timeout=1.0) == [] and time.monotonic() - t0 < 1.0
        # the tracker knows a seeder for wl; restarted, it knows none: needs_restart says so (once)
        _announce_seeder(ot.announce_url, wl)
        assert ext.needs_restart() is False  # picks wl as its probe
        assert ext.needs_restart() is False
        ot.stop()
        ot.start([wl])
        assert ext.needs_restart() is True and ext.restarts == 1
        assert ext.needs_restart() is False  # no probe yet: nothing to compare
        # down, then back: also a restart
        ot.stop()
        assert ext.needs_restart() is False
        ot.start([wl])
        assert ext.needs_restart() is True and ext.restarts == 2
    finally:
        ot.stop()
    ext2 = ExternalTracker(f"127.0.0.1:{free_port()}")  # nothing listens: settle does not wait at all
    t0 = time.monotonic()
    assert ext2.settle([wl], timeout=5) == [] and time.monotonic() - t0 < 2
    record("tracker", "registry with --tracker: the tracker restarts, or refuses a new hash",
           "restart noticed (answers again after being down, or a torrent it listed a seeder for has none): every "
           "seeder re-announces; a refusing tracker delays one push by the settle timeout, later ones not")
