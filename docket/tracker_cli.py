"""`docket-tracker`: run opentracker on a tracker host and keep its whitelist in step with a registry.

For registries started with ``--tracker HOST:PORT`` (an external tracker). The registry lists the info
hashes of every torrent it made at ``GET /api/v1/tracker/whitelist``; this command polls that list and
rewrites the whitelist (SIGHUP) when it changes, so the tracker tracks only this registry's torrents.
"""

from __future__ import annotations

import logging
import re
import signal
import tempfile
import threading
from pathlib import Path

import click
import requests

from docket.errors import DocketError
from docket.torrent import Opentracker

log = logging.getLogger("docket.tracker")
HASH_RE = re.compile(r"^[0-9a-f]{40}$")


def fetch_whitelist(session: requests.Session, registry: str, timeout: float = 10.0) -> list[str]:
    """The registry's info hashes; anything that is not 40 hex digits is refused, not passed on."""
    resp = session.get(f"{registry.rstrip('/')}/api/v1/tracker/whitelist", timeout=timeout)
    resp.raise_for_status()
    hashes = [line.strip().lower() for line in resp.text.splitlines() if line.strip()]
    bad = [h for h in hashes if not HASH_RE.match(h)]
    if bad:
        raise DocketError(f"registry sent {len(bad)} malformed info hashes, e.g. {bad[0][:60]!r}")
    return sorted(set(hashes))


@click.command(context_settings={"help_option_names": ["--help"], "show_default": True})
@click.option("--registry", "-r", required=True, envvar="DOCKET_REGISTRY_URL", show_envvar=True,
              help="Registry base URL whose whitelist to follow, e.g. http://registry:8000.")
@click.option("--bind", "-b", default="0.0.0.0", envvar="DOCKET_TRACKER_BIND", show_envvar=True,
              help="Address opentracker listens on.")
@click.option("--port", "-p", default=6969, type=click.IntRange(1, 65535), envvar="DOCKET_TRACKER_PORT",
              show_envvar=True, help="Tracker TCP port.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), envvar="DOCKET_TRACKER_DIR",
              help="Directory for the whitelist (default: a temporary directory).")
@click.option("--interval", default=5.0, type=click.FloatRange(0.5), help="Seconds between whitelist polls.")
@click.option("--log-level", default="INFO", envvar="DOCKET_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--token", envvar="DOCKET_TOKEN", show_envvar=True, default=None, metavar="TOKEN",
              help="Read (or push) token, when the registry requires tokens for reads.")
@click.option("--ca-bundle", envvar="DOCKET_CA_BUNDLE", show_envvar=True, default=None,
              type=click.Path(exists=True, dir_okay=False), help="CA certificate(s) for an https:// registry.")
def main(registry: str, bind: str, port: int, workdir: Path | None, interval: float, log_level: str,
         token: str | None, ca_bundle: str | None) -> None:
    """Run opentracker and sync its whitelist from a docket-registry."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="docket-tracker-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token.strip()}"
    if ca_bundle:
        session.verify = ca_bundle
    current: list[str] | None = None
    try:
        with Opentracker(bind, port, workdir) as tracker:
            tracker.start([])
            log.info("opentracker on %s:%d, following %s", bind, port, registry)
            while not stop.is_set():
                try:
                    hashes = fetch_whitelist(session, registry)
                    if hashes != current:
                        tracker.set_whitelist(hashes)
                        log.info("whitelist: %d info hashes", len(hashes))
                        current = hashes
                except (requests.RequestException, DocketError) as exc:
                    log.warning("cannot read the registry's whitelist (keeping the old one): %s", exc)
                if not tracker.alive():
                    log.error("opentracker exited; restarting it")
                    tracker.start(current or [])
                stop.wait(interval)
    except DocketError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
