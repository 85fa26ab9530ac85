"""``docket-registry``: serve the registry with cheroot (one process, threaded) plus tracker and seeders.

One process on purpose: it owns the single seeder supervisor and the managed tracker. cheroot streams request
bodies to the app unbuffered, so uploads of any size use bounded memory. SIGTERM/SIGINT stop, in order, the
HTTP server, GC, every seeder and the tracker; nothing is left running.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from docket.errors import DocketError
from docket.netaddr import default_address
from docket.registry import create_app
from docket.registry.auth import clean_tokens, read_token_file
from docket.registry.gc import check_grace
from docket.registry.retention import RetentionPolicy
from docket.registry.server import Deadlines, LazyTLSAdapter, Server, run_until_signalled
from docket.registry.storage import startup_error
from docket.clicktypes import ByteRate, ByteSize
from docket.registry.config import DEFAULT_LOCATION, RegistryConfig, parse_host_port

log = logging.getLogger("docket.registry")

def _ipv4(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 address (ctorrent and opentracker are IPv4 only)")


def _tracker(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    try:
        host, port = parse_host_port(value)
    except DocketError as exc:
        raise click.BadParameter(exc.message)
    return f"{host}:{port}"


def _fail(exc: DocketError) -> None:
    click.echo(f"docket-registry: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


@click.command(context_settings={"help_option_names": ["--help"], "show_default": True})
@click.option("-t", "--tracker", envvar="DOCKET_TRACKER", show_envvar=True, callback=_tracker,
              help="External opentracker HOST:PORT. Without it the registry runs and manages opentracker itself. "
                   "Several instances on one PostgreSQL --db need it, the same for all (README: Several instances).")
@click.option("-p", "--port", envvar="DOCKET_REGISTRY_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=8000, help="HTTP port.")
@click.option("-l", "--location", envvar="DOCKET_REGISTRY_LOCATION", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_LOCATION,
              help="Directory for blobs, torrents, the SQLite database and seeder state.")
@click.option("--db", "db_url", envvar="DOCKET_REGISTRY_DB", show_envvar=True, default=None,
              help="SQLAlchemy database URL [default: sqlite:///<location>/docket.db].")
@click.option("--bind", envvar="DOCKET_BIND", show_envvar=True, default="0.0.0.0", help="HTTP bind address.")
@click.option("--advertise-address", envvar="DOCKET_ADVERTISE_ADDRESS", show_envvar=True, default=None,
              callback=lambda c, p, v: None if v is None else _ipv4(c, p, v),
              help="IPv4 address peers use to reach this host (seeders and managed tracker) [default: the address "
                   "of the default route's interface, else this host's only non-loopback address, else 127.0.0.1; "
                   "logged at start]")
@click.option("--seed-address", envvar="DOCKET_SEED_ADDRESS", show_envvar=True, default=None,
              callback=lambda c, p, v: None if v is None else _ipv4(c, p, v),
              help="IPv4 address the seeders listen on [default: the advertise address; 127.0.0.2 when that is "
                   "a loopback address, since a same-host ctorrent on 127.0.0.1 drops local peers; several "
                   "instances on one host need one each]")
@click.option("--tracker-port", envvar="DOCKET_TRACKER_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=6969, help="Port of the managed opentracker.")
@click.option("--log-level", envvar="DOCKET_LOG_LEVEL", show_envvar=True, default="info",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--max-upload-size", envvar="DOCKET_MAX_UPLOAD_SIZE", show_envvar=True, type=ByteSize(),
              default="20GiB", help="Largest accepted image tarball.")
@click.option("--threads", envvar="DOCKET_THREADS", show_envvar=True, type=click.IntRange(1, 1024), default=16,
              help="HTTP worker threads kept ready; more start when all are busy, up to --max-threads.")
@click.option("--max-threads", envvar="DOCKET_MAX_THREADS", show_envvar=True, type=click.IntRange(1, 4096),
              default=256, help="Most HTTP worker threads (a body being received holds one).")
@click.option("--header-timeout", envvar="DOCKET_HEADER_TIMEOUT", show_envvar=True,
              type=click.FloatRange(0.1, 3600), default=10.0,
              help="Seconds a client has to send a request's line and headers (and the TLS handshake); then the "
                   "connection is closed. Waiting for them holds no thread.")
@click.option("--body-timeout", envvar="DOCKET_BODY_TIMEOUT", show_envvar=True, type=click.FloatRange(0.1, 3600),
              default=20.0, help="For each this many seconds spent waiting for a client, a request body must "
                                 "bring (a response must take) --body-min-rate bytes per second, at least one "
                                 "byte; else a request is answered 408 and dropped, a response cut off.")
@click.option("--body-min-rate", envvar="DOCKET_BODY_MIN_RATE", show_envvar=True, type=ByteSize(), default="1KiB",
              help="Slowest accepted client, in bytes per second (over each --body-timeout of waiting).")
@click.option("--gc-interval", envvar="DOCKET_GC_INTERVAL", show_envvar=True, type=click.FloatRange(0),
              default=30.0, help="Seconds between garbage collection passes (0 disables GC).")
@click.option("--gc-grace", envvar="DOCKET_GC_GRACE", show_envvar=True, type=click.FloatRange(0), default=600.0,
              help="Seconds an unreferenced blob is kept before GC may delete it (at least 60; blobs of a push "
                   "in progress are kept until it ends).")
@click.option("--scrub-interval", envvar="DOCKET_SCRUB_INTERVAL", show_envvar=True, type=click.FloatRange(0),
              default=3600.0, help="Seconds between passes that re-hash every blob to catch corruption (the first "
                                   "pass runs in the background at start-up; 0 disables scrubbing).")
@click.option("--min-free-space", envvar="DOCKET_MIN_FREE_SPACE", show_envvar=True, type=ByteSize(), default="1GiB",
              help="Free space kept on the registry's volumes: below it /healthz is degraded and uploads are "
                   "refused with 507 (reads, deletes and GC go on). 0: only a full disk counts.")
@click.option("--adopt-orphans", is_flag=True, envvar="DOCKET_ADOPT_ORPHANS", show_envvar=True, default=False,
              help="Register blob files the database has no row for (after a lost or replaced database) instead of "
                   "refusing to start; they are kept until a tag that uses them is deleted.")
@click.option("--seeding/--no-seeding", envvar="DOCKET_SEEDING", show_envvar=True, default=True,
              help="Seed blobs over BitTorrent (--no-seeding: plain HTTP only, no tracker or ctorrent).")
@click.option("--auth-token", "auth_tokens", multiple=True, metavar="TOKEN",
              help="Push token (repeatable): when any is set, PUT and DELETE need `Authorization: Bearer TOKEN`. "
                   "Also DOCKET_AUTH_TOKENS (comma-separated). Prefer --auth-token-file: argv is visible in ps.")
@click.option("--auth-token-file", envvar="DOCKET_AUTH_TOKEN_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="File of push tokens, one a line (# comments).")
@click.option("--read-token", "read_tokens", multiple=True, metavar="TOKEN",
              help="Read token (repeatable): when any is set, reads need a read or push token (/healthz and "
                   "/openapi.json stay open). Also DOCKET_READ_TOKENS (comma-separated).")
@click.option("--read-token-file", envvar="DOCKET_READ_TOKEN_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="File of read tokens, one a line (# comments).")
@click.option("--tls-cert", envvar="DOCKET_TLS_CERT", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificate (chain): serve HTTPS. Needs --tls-key.")
@click.option("--tls-key", envvar="DOCKET_TLS_KEY", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="PEM private key of --tls-cert.")
@click.option("--keep-tags", envvar="DOCKET_KEEP_TAGS", show_envvar=True, type=click.IntRange(1), default=None,
              help="Retention: keep the newest N tags (by push time) of each repository; older ones are removed "
                   "every --retention-interval and their blobs freed by GC after the grace [default: no policy, "
                   "nothing removed]. POST /api/v1/admin/retention shows what would go.")
@click.option("--keep-pattern", "keep_patterns", envvar="DOCKET_KEEP_PATTERNS", show_envvar=True, multiple=True,
              metavar="GLOB", help="Retention: tags matching this shell glob (e.g. 'v1*', 'release-*'; whole tag, "
                                   "case-sensitive) are never removed and do not count toward --keep-tags "
                                   "(repeatable; the env var is space-separated).")
@click.option("--retention-interval", envvar="DOCKET_RETENTION_INTERVAL", show_envvar=True,
              type=click.FloatRange(0), default=3600.0,
              help="Seconds between retention runs, the first one interval after start (0: only on request); "
                   "only with --keep-tags.")
@click.option("--max-upload-rate", envvar="DOCKET_REGISTRY_MAX_UPLOAD_RATE", show_envvar=True, type=ByteRate(),
              default=None, metavar="RATE", help="Bytes per second for all the seeders together, with a unit: 2MB, "
                                                 "500KiB (KB/MB: 1000, KiB/MiB: 1024)  [default: unlimited]")
def main(tracker: str | None, port: int, location: Path, db_url: str | None, bind: str, advertise_address: str | None,
         seed_address: str | None, tracker_port: int, log_level: str, max_upload_size: int, threads: int,
         max_threads: int, header_timeout: float, body_timeout: float, body_min_rate: int,
         gc_interval: float, gc_grace: float, scrub_interval: float, min_free_space: int, adopt_orphans: bool,
         seeding: bool, auth_tokens: tuple[str, ...],
         auth_token_file: Path | None, read_tokens: tuple[str, ...], read_token_file: Path | None,
         tls_cert: Path | None, tls_key: Path | None, keep_tags: int | None, keep_patterns: tuple[str, ...],
         retention_interval: float, max_upload_rate: int | None) -> None:
    """Run the Docket registry: receives `docker save` tarballs, stores them by digest and seeds them over
    BitTorrent."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level.lower() != "debug":
        for noisy in ("alembic", "torf", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if advertise_address is None:
        found = default_address()
        advertise_address = found.address
        log.info("advertise address %s (%s); --advertise-address overrides", found.address, found.why)
    if ipaddress.IPv4Address(advertise_address).is_loopback:
        log.warning("advertise address %s is a loopback address: other hosts cannot reach this registry's "
                    "seeders or tracker; set --advertise-address to this host's LAN address", advertise_address)
    try:
        push, read = collect_tokens(auth_tokens, auth_token_file, read_tokens, read_token_file)
        cert, key = check_tls(tls_cert, tls_key)
        policy = RetentionPolicy(keep_tags, tuple(keep_patterns))  # a bad pattern: exit 2 before anything starts
        if keep_patterns and keep_tags is None:
            log.warning("--keep-pattern without --keep-tags: no retention runs (the patterns apply to "
                        "POST /api/v1/admin/retention with keep_tags)")
        config = RegistryConfig(location=location.absolute(), db_url=db_url, tracker=tracker,
                                advertise_address=advertise_address, seed_address=seed_address,
                                tracker_port=tracker_port, bind=bind, port=port,
                                threads=threads, max_upload_size=max_upload_size, seeding=seeding,
                                max_threads=max_threads, header_timeout=header_timeout,
                                body_timeout=body_timeout, body_min_rate=body_min_rate,
                                gc_interval=gc_interval, gc_grace=check_grace(gc_grace),
                                scrub_interval=scrub_interval, auth_tokens=push, read_tokens=read,
                                min_free_space=min_free_space, adopt_orphans=adopt_orphans,
                                tls_cert=cert, tls_key=key, keep_tags=policy.keep_tags,
                                keep_patterns=policy.keep_patterns, retention_interval=retention_interval,
                                max_upload_rate=max_upload_rate)
        if read and seeding:
            log.warning("read tokens protect the HTTP API and the tracker, not the peer wire: a seeder tells its "
                        "info hash to whoever connects (ctorrent), so keep %s (--seed-address) on a network only "
                        "your hosts reach (README: Access control and HTTPS)", config.seeder_ip)
        serve(config)
    except DocketError as exc:
        _fail(exc)
    except (OSError, SQLAlchemyError) as exc:  # the storage failing during start-up: one line, not a traceback
        log.debug("start-up failed", exc_info=True)
        _fail(startup_error(exc))


def _env_list(name: str) -> list[str]:
    return [t.strip() for t in os.environ.get(name, "").split(",") if t.strip()]


def collect_tokens(push: tuple[str, ...], push_file: Path | None, read: tuple[str, ...],
                   read_file: Path | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Options + env (comma-separated) + files -> (push tokens, read tokens). Never logs a token."""
    push_all = [*push, *_env_list("DOCKET_AUTH_TOKENS"), *(read_token_file(push_file) if push_file else [])]
    read_all = [*read, *_env_list("DOCKET_READ_TOKENS"), *(read_token_file(read_file) if read_file else [])]
    push_tokens = clean_tokens(push_all, "push token")
    read_tokens = clean_tokens(read_all, "read token")
    if read_tokens and not push_tokens:
        raise DocketError("read tokens are configured but no push token: nobody could push",
                          "add --auth-token/--auth-token-file (DOCKET_AUTH_TOKENS/DOCKET_AUTH_TOKEN_FILE)")
    short = [t for t in (*push_tokens, *read_tokens) if len(t) < 16]
    if short:
        log.warning("%d token(s) shorter than 16 characters; use long random tokens (openssl rand -hex 32)",
                    len(short))
    if push_tokens:
        log.info("access control: %d push token(s), %d read token(s)%s", len(push_tokens), len(read_tokens),
                 "" if read_tokens else "; reads are open")
    else:
        log.warning("no --auth-token configured: anyone who can reach this registry can push and delete")
    return push_tokens, read_tokens


def check_tls(cert: Path | None, key: Path | None) -> tuple[Path | None, Path | None]:
    """Both or neither; each must be a readable PEM file, and the key must match the certificate."""
    if (cert is None) != (key is None):
        raise DocketError("--tls-cert and --tls-key go together",
                          "give both (DOCKET_TLS_CERT and DOCKET_TLS_KEY) for HTTPS, or neither for HTTP")
    if cert is None or key is None:
        return None, None
    import ssl

    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise DocketError(f"cannot read {what} {path}: {exc.strerror or exc}",
                              "check the path and that this user may read it") from exc
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as exc:
        raise DocketError(f"cannot use {cert} with {key} for TLS: {exc}",
                          "both must be PEM files and the key must belong to the certificate") from exc
    return cert.absolute(), key.absolute()


def serve(config: RegistryConfig) -> None:
    """Bind, start tracker + seeders + GC, serve until SIGTERM/SIGINT, then stop everything."""
    if config.max_threads < config.threads:
        raise DocketError(f"--max-threads {config.max_threads} is below --threads {config.threads}",
                          "--threads is how many workers are kept ready, --max-threads how many may run")
    app = create_app(config)
    services = app.extensions["docket"]
    services.swarm.preflight()  # fail early, with the install hint, when a tool is missing
    deadlines = Deadlines(header_timeout=config.header_timeout, body_timeout=config.body_timeout,
                          body_min_rate=config.body_min_rate)
    tls = None if config.tls_cert is None or config.tls_key is None else (str(config.tls_cert), str(config.tls_key))
    # request_queue_size is the listen() backlog: cheroot's default of 5 drops connections when a deploy's
    # hosts arrive at once (seen: pushes answered by a bare connection close under 50 concurrent clients).
    server = Server((config.bind, config.port), app, deadlines=deadlines, min_threads=config.threads,
                    max_threads=config.max_threads, server_name="docket-registry", shutdown_timeout=10,
                    request_queue_size=1024)
    scheme = "http"
    if tls is not None:
        try:
            server.ssl_adapter = LazyTLSAdapter(*tls)
        except Exception as exc:  # noqa: BLE001 - ssl.SSLError, OSError, ValueError
            raise DocketError(f"cannot set up TLS with {config.tls_cert}: {exc}",
                              "check --tls-cert and --tls-key") from exc
        scheme = "https"

    def started() -> None:
        log.info("docket-registry serving on %s://%s:%d (location %s, tracker %s%s)", scheme, config.bind,
                 config.port, config.location, services.swarm.announce_url,
                 "" if services.swarm.tracker.managed else " external")

    def stop() -> None:
        services.stop()
        services.db.dispose()

    run_until_signalled(server, name="docket-registry", bind=config.bind, port=config.port, start=services.start,
                        stop=stop, started=started)


if __name__ == "__main__":
    main()
