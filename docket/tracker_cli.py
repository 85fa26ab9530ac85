"""`docket-tracker`: run opentracker on a tracker host and keep its whitelist in step with a registry.

For registries started with ``--tracker HOST:PORT`` (an external tracker). The registry lists the info
hashes of every torrent it made at ``GET /api/v1/tracker/whitelist``; this command polls that list and
rewrites the whitelist (SIGHUP) when it changes, so the tracker tracks only this registry's torrents.

It is a long-running service: a registry that is down (at start or later) is logged and retried while the last
whitelist stays in force; an opentracker that dies is started again with the current whitelist; SIGTERM/SIGINT
stop opentracker (our child, by pid) and exit. Configuration errors (no opentracker, a busy port, a bad URL)
are one line on stderr and a non-zero exit, before anything is started.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import click
import requests
import urllib3

from docket.deadline import DeadlineExceeded, DeadlineSession, expired
from docket.errors import DocketError, IntegrityError, InvalidRequest, NotFound, ServiceUnavailable, Unauthorized
from docket.torrent import Opentracker, find_opentracker
from docket.torrent.metainfo import ipv4_address
from docket.torrent.opentracker import PLACEHOLDER_HASH, WHITELIST_NAME
from docket.torrent.processes import record_pid, stop_orphan

log = logging.getLogger("docket.tracker")
PROG = "docket-tracker"
PID_FILE = "opentracker.pid"
# 40 hex digits + newline per hash: 64 MiB holds ~1.6 million torrents, far past any registry we know of.
MAX_WHITELIST_BYTES = 64 * 1024 * 1024
FETCH_DEADLINE = 30.0  # a whole request, however slowly the registry trickles its answer


def _hex40(value: str) -> bool:
    return len(value) == 40 and all(c in "0123456789abcdef" for c in value)


def fetch_whitelist(session: requests.Session, registry: str, timeout: float = 10.0,
                    deadline: float = FETCH_DEADLINE) -> list[str]:
    """The registry's info hashes; anything that is not 40 hex digits is refused, not passed on.

    Raises ServiceUnavailable (down, slow, 5xx), Unauthorized (401/403), NotFound (404: not a docket-registry
    URL) or IntegrityError (a malformed or oversized list): the caller keeps the whitelist it has.
    """
    url = f"{registry.rstrip('/')}/api/v1/tracker/whitelist"
    end = time.monotonic() + deadline
    # requests' timeout is per read: a DeadlineSession cuts a reply that trickles in (the loop below checks
    # only between chunks, and a chunk may wait for the rest of a slow body)
    kwargs: dict[str, float] = {"deadline": deadline} if isinstance(session, DeadlineSession) else {}
    try:
        with session.get(url, timeout=(min(timeout, 5.0), timeout), stream=True, **kwargs) as resp:
            if resp.status_code in (401, 403):
                raise Unauthorized(f"the registry refused the whitelist request (HTTP {resp.status_code})",
                                   "give a read token with --token / DOCKET_TOKEN")
            if resp.status_code == 404:
                raise NotFound(f"{url} answered 404", "is --registry the base URL of a docket-registry?")
            if resp.status_code != 200:
                raise ServiceUnavailable(f"{url} answered HTTP {resp.status_code}")
            body = bytearray()
            # read1: what has arrived (up to 64 KiB), so the deadline below is checked as bytes trickle in; read()
            # (and iter_content) would wait for a whole 64 KiB. The check below also ends a reply that keeps
            # sending; the DeadlineSession cuts one that stops (with or without a length).
            read = getattr(resp.raw, "read1", None) or resp.raw.read
            try:
                while chunk := read(64 * 1024, decode_content=True):
                    body += chunk
                    if len(body) > MAX_WHITELIST_BYTES:
                        raise IntegrityError(f"the registry's whitelist is larger than {MAX_WHITELIST_BYTES} bytes")
                    if time.monotonic() > end:
                        raise ServiceUnavailable(f"the registry did not send its whitelist within {deadline:g}s")
            except urllib3.exceptions.HTTPError as exc:  # raw reads raise urllib3's own (a cut or broken body)
                if expired(resp):
                    raise DeadlineExceeded("cut at the deadline") from exc
                raise requests.ConnectionError(exc) from exc
            if expired(resp):  # a reply without a length cut at the deadline ends like a complete one: not a list
                raise DeadlineExceeded("cut at the deadline")
    except DeadlineExceeded as exc:
        raise ServiceUnavailable(f"the registry did not send its whitelist within {deadline:g}s") from exc
    except requests.exceptions.SSLError as exc:
        raise ServiceUnavailable(f"cannot verify the registry's TLS certificate at {registry}",
                                 "give its CA with --ca-bundle / DOCKET_CA_BUNDLE") from exc
    except requests.RequestException as exc:
        raise ServiceUnavailable(f"cannot reach the registry at {registry}: {type(exc).__name__}") from exc
    hashes = [line.strip().lower() for line in body.decode("ascii", "replace").splitlines() if line.strip()]
    bad = [h for h in hashes if not _hex40(h)]
    if bad:
        raise IntegrityError(f"registry sent {len(bad)} malformed info hashes, e.g. {bad[0][:60]!r}")
    return sorted(set(hashes))


def saved_whitelist(workdir: Path) -> list[str]:
    """The whitelist a previous run left in ``workdir`` (placeholder dropped): used until the registry answers."""
    try:
        lines = (workdir / WHITELIST_NAME).read_text("ascii", "replace").split()
    except OSError:
        return []
    return sorted({h for h in (x.strip().lower() for x in lines) if _hex40(h) and h != PLACEHOLDER_HASH})


def check_listen(bind: str, port: int) -> None:
    """Fail before starting opentracker if ``bind:port`` (TCP or UDP) is taken or not an address of this host.

    opentracker sets SO_REUSEPORT, so started beside another tracker it would share the port with it; and it
    reports a bad address only in its own output. The TCP probe uses SO_REUSEADDR so that the TIME_WAIT
    connections of a tracker that just stopped do not count as "in use".
    """
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind, port))
            except OSError as exc:
                proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise InvalidRequest(f"cannot listen on {bind}: not an address of this host",
                                         "give --bind an address of one of this host's interfaces") from None
                if exc.errno == errno.EADDRINUSE:
                    raise ServiceUnavailable(f"cannot listen on {bind}:{port} ({proto}): already in use",
                                             "choose another --port or stop what is using it") from None
                raise ServiceUnavailable(f"cannot listen on {bind}:{port} ({proto}): {exc.strerror or exc}") from None


def _registry_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL, e.g. http://registry:8000")
    if parts.query or parts.fragment:
        raise click.BadParameter(f"{value!r}: give the registry's base URL, without ? or #")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}") from None
    return value.strip().rstrip("/")


def _ipv4(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return ipv4_address(value, "--bind")
    except DocketError as exc:
        raise click.BadParameter(exc.message) from None


def _fail(exc: DocketError) -> None:
    click.echo(f"{PROG}: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


class _Stopping(Exception):
    """Raised by the signal handler to cut short a request in progress (requests retries on EINTR)."""


class _Follower:
    """The polling loop: registry -> whitelist -> opentracker, restarting opentracker when it dies."""

    def __init__(self, tracker: Opentracker, session: requests.Session, registry: str, interval: float) -> None:
        self.tracker = tracker
        self.session = session
        self.registry = registry
        self.interval = interval
        self.current: list[str] | None = None  # the last list the registry sent
        self.signal: int | None = None
        self._fetching = False
        self._last_error: str | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            log.info("received %s; stopping", signal.Signals(signum).name)
        self.signal = signum
        if self._fetching:
            raise _Stopping

    def poll(self) -> list[str] | None:
        """One fetch; None (logged once per distinct error) when the registry cannot give its list."""
        try:
            self._fetching = True
            try:
                if self.signal is not None:
                    raise _Stopping
                hashes = fetch_whitelist(self.session, self.registry)
            finally:
                self._fetching = False
        except _Stopping:
            return None
        except DocketError as exc:
            text = exc.message + (f" ({exc.hint})" if exc.hint else "")
            if text != self._last_error:
                log.warning("cannot read the registry's whitelist, keeping the current one: %s", text)
            self._last_error = text
            return None
        if self._last_error is not None:
            log.info("the registry answers again")
            self._last_error = None
        return hashes

    def sync(self) -> None:
        hashes = self.poll()
        if hashes is not None and hashes != self.current:
            self.tracker.set_whitelist(hashes)
            log.info("whitelist: %d info hashes", len(hashes))
            self.current = hashes

    def revive(self) -> None:
        """opentracker died: start it again with the whitelist in force (a failure is retried next round)."""
        if self.tracker.alive() or self.signal is not None:
            return
        if self.tracker.returncode is not None:  # else the last restart failed and was logged already
            log.error("opentracker (pid %s) exited with %s; starting it again with %d info hashes: %s",
                      self.tracker.pid, self.tracker.returncode, len(self.tracker.whitelist),
                      self.tracker.tail_text(3))
        self.tracker.stop()
        try:
            self.tracker.start(self.tracker.whitelist)
            record_pid(self.tracker.workdir / PID_FILE, self.tracker.pid or 0)
        except DocketError as exc:
            log.error("cannot start opentracker (retrying in %gs): %s", self.interval, exc.message)

    def run(self) -> None:
        while self.signal is None:
            self.sync()
            self.revive()
            end = time.monotonic() + self.interval
            while self.signal is None and (left := end - time.monotonic()) > 0:
                time.sleep(min(left, 0.2))


@click.command(context_settings={"help_option_names": ["--help"], "show_default": True})
@click.option("--registry", "-r", required=True, envvar="DOCKET_REGISTRY_URL", show_envvar=True,
              callback=_registry_url, help="Registry base URL whose whitelist to follow, e.g. http://registry:8000.")
@click.option("--bind", "-b", default="0.0.0.0", envvar="DOCKET_TRACKER_BIND", show_envvar=True, callback=_ipv4,
              help="IPv4 address opentracker listens on.")
@click.option("--port", "-p", default=6969, type=click.IntRange(1, 65535), envvar="DOCKET_TRACKER_PORT",
              show_envvar=True, help="Tracker port (TCP, and UDP on the same number).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), envvar="DOCKET_TRACKER_DIR",
              help="Directory for the whitelist (default: a temporary directory, removed at exit). With one, a "
                   "restart serves the last whitelist until the registry answers.")
@click.option("--interval", default=5.0, type=click.FloatRange(0.5, 3600), help="Seconds between whitelist polls.")
@click.option("--log-level", default="INFO", envvar="DOCKET_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--token", envvar="DOCKET_TOKEN", show_envvar=True, default=None, metavar="TOKEN",
              help="Read (or push) token, when the registry requires tokens for reads.")
@click.option("--ca-bundle", envvar="DOCKET_CA_BUNDLE", show_envvar=True, default=None,
              type=click.Path(exists=True, dir_okay=False), help="CA certificate(s) for an https:// registry.")
@click.option("--guard/--no-guard", default=None, envvar="DOCKET_TRACKER_GUARD", show_envvar=True,
              help="Pass announces and single-torrent scrapes only: no full scrape or /stats listing every info "
                   "hash (as the managed tracker of a registry with read tokens)  [default: on with --token]")
def main(registry: str, bind: str, port: int, workdir: Path | None, interval: float, log_level: str,
         token: str | None, ca_bundle: str | None, guard: bool | None) -> None:
    """Run opentracker and sync its whitelist from a docket-registry."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _serve(registry, bind, port, workdir, interval, token, ca_bundle, bool(token) if guard is None else guard)
    except DocketError as exc:
        _fail(exc)


def _serve(registry: str, bind: str, port: int, workdir: Path | None, interval: float, token: str | None,
           ca_bundle: str | None, guarded: bool) -> None:
    find_opentracker()  # ToolMissing with the install hint, before anything is created
    temporary = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="docket-tracker-"))
    else:
        # a docket-tracker killed with SIGKILL leaves its opentracker (which runs as nobody, so no parent-death
        # signal survives): stop that one, ours by its pid file and workdir, before taking the port
        stop_orphan(workdir / PID_FILE, "opentracker", str(workdir.absolute()))
    try:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DocketError(f"cannot create --workdir {workdir}: {exc.strerror or exc}") from exc
        check_listen(bind, port)
        session = DeadlineSession(FETCH_DEADLINE)
        if token:
            session.headers["Authorization"] = f"Bearer {token.strip()}"
        if ca_bundle:
            session.verify = ca_bundle
        tracker = Opentracker(bind, port, workdir, guarded=guarded)
        follower = _Follower(tracker, session, registry, interval)
        previous = {s: signal.signal(s, follower.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            # the registry's list first, so a restarted tracker accepts every seeder's next announce at once
            initial = follower.poll()
            if initial is None:
                initial = saved_whitelist(workdir)
                log.warning("starting with %d info hashes (%s) until the registry answers", len(initial),
                            "the last whitelist in --workdir" if initial else "none")
            else:
                follower.current = initial
            if follower.signal is None:
                tracker.start(initial)
                record_pid(workdir / PID_FILE, tracker.pid or 0)
                log.info("opentracker pid %s on %s:%d%s (%d whitelisted), following %s every %gs", tracker.pid,
                         bind, port, " behind the guard" if guarded else "", len(initial), registry, interval)
                follower.run()
        finally:
            tracker.stop()
            with contextlib.suppress(OSError):
                (workdir / PID_FILE).unlink()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if follower.signal == signal.SIGINT:
            sys.exit(130)
        log.info("stopped")
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
