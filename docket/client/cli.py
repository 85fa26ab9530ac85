"""``docket``: push images to a Docket registry, pull them through BitTorrent, list what it holds.

The click edge: options and environment, one context object, output, and the single place where
``DocketError``s become "Error: ..." plus their ``exit_code`` (Ctrl-C: 130).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from docket import __version__, errors
from docket.clicktypes import ByteRate, ByteSize
from docket.reference import Reference, parse_reference

# Start-up time: the modules behind the subcommands (requests, docker, rich.progress, the pull engine) are
# imported inside the functions that use them, so `docket --help` and a bad reference answer without loading
# them. These lazy imports are the only ones in docket/client and docket/torrent.

EXIT_INTERRUPTED = 130
EXIT_UNEXPECTED = 1


def default_location() -> Path:
    """$XDG_CACHE_HOME/docket, else ~/.cache/docket; always absolute (a relative path broke the original's pull)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "docket").absolute()


@dataclass
class Config:
    host: str
    port: int
    location: Path
    quiet: bool = False
    traceback: bool = False
    timeout: float = 60.0
    verbose: int = 0
    token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None


@dataclass
class AppContext:
    """Everything a subcommand needs (httpie's Environment): config, terminals, lazily built clients."""

    config: Config
    stdout_isatty: bool = False
    stderr_isatty: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _registry: Any = None
    _docker: Any = None

    @property
    def registry(self):  # -> RegistryClient
        if self._registry is None:
            from docket.client.api import RegistryClient

            self._registry = RegistryClient(self.config.host, self.config.port, read_timeout=self.config.timeout,
                                            token=self.config.token, ca_bundle=self.config.ca_bundle)
        return self._registry

    @property
    def docker(self):  # -> DockerOps
        if self._docker is None:
            from docket.client.dockerops import DockerOps

            self._docker = DockerOps()
        return self._docker

    def reporter(self):
        from docket.client.progress import choose_reporter

        return choose_reporter(self.config.quiet, self.stderr_isatty, self.console)

    def out(self, text: str = "") -> None:
        """Results: stdout (control characters escaped: results quote remote text, e.g. a fallback reason)."""
        click.echo(terminal_safe(text))

    def info(self, text: str) -> None:
        """Narrative for humans: stderr, silenced by --quiet."""
        if not self.config.quiet:
            click.echo(terminal_safe(text), err=True)

    def close(self) -> None:
        for c in (self._registry, self._docker):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass


class DocketGroup(click.Group):
    """Runs the subcommand and maps failures to messages and exit codes, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except errors.DocketError as exc:
            if _wants_traceback(ctx):
                raise
            err = click.ClickException(terminal_safe(str(exc)))
            err.exit_code = exc.exit_code or 1
            raise err from exc
        except PermissionError as exc:  # a file or directory of ours we may not write (not a bug of docket's)
            if _wants_traceback(ctx):
                raise
            err = click.ClickException(terminal_safe(
                f"permission denied: {exc.filename or exc}\n  hint: check the permissions of --location "
                "(DOCKET_LOCATION) and of -o/--output, or choose other paths"))
            err.exit_code = EXIT_UNEXPECTED
            raise err from exc
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _wants_traceback(ctx):
                raise
            err = click.ClickException(terminal_safe(
                f"unexpected {type(exc).__name__}: {exc}\n  hint: rerun with --traceback and report it"))
            err.exit_code = EXIT_UNEXPECTED
            raise err from exc
        finally:
            obj = ctx.obj
            if isinstance(obj, AppContext):
                obj.close()


class SafeFormatter(logging.Formatter):
    """Log lines quote remote text (ctorrent's output, a tracker's or registry's words): escaped like any other
    line that reaches the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def terminal_safe(text: str) -> str:
    """Our own message lines kept, every other control character escaped: the last guard before the terminal
    for remote text that reached a message unescaped (progress.printable escapes it where it comes in)."""
    from docket.client.progress import printable_lines

    return printable_lines(text)


def raise_open_files_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one (as Go programs do at start): a pull of many layers holds a
    lock file per layer and pipes to its ctorrents."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))
    except (ValueError, OSError):
        pass


def _wants_traceback(ctx: click.Context) -> bool:
    return bool(ctx.params.get("traceback")) or (isinstance(ctx.obj, AppContext) and ctx.obj.config.traceback)


def _ref(text: str) -> Reference:
    """Parse before anything touches the network: a bad reference fails fast with exit code 2."""
    return parse_reference(text)


def _app(ctx: click.Context) -> AppContext:
    return ctx.find_object(AppContext)  # type: ignore[return-value]


@click.group(cls=DocketGroup, context_settings=dict(help_option_names=["--help"], max_content_width=100))
@click.option("-h", "--host", envvar="DOCKET_HOST", default="http://127.0.0.1", show_default=True,
              show_envvar=True, help="Registry host, with scheme (a :PORT here wins over --port).")
@click.option("-p", "--port", envvar="DOCKET_PORT", type=click.IntRange(1, 65535), default=8000,
              show_default=True, show_envvar=True, help="Registry port.")
@click.option("-l", "--location", envvar="DOCKET_LOCATION", type=click.Path(file_okay=False, path_type=Path),
              default=None, show_envvar=True,
              help="Work directory for downloads  [default: $XDG_CACHE_HOME/docket or ~/.cache/docket]")
@click.option("--timeout", envvar="DOCKET_TIMEOUT", type=click.FloatRange(min=1), default=60.0,
              show_default=True, show_envvar=True, help="Seconds to wait for a registry answer (connect: 5 s).")
@click.option("--token", envvar="DOCKET_TOKEN", show_envvar=True, default=None, metavar="TOKEN",
              help="Registry token, sent as `Authorization: Bearer TOKEN` (prefer the env var: argv shows in ps).")
@click.option("--token-file", envvar="DOCKET_TOKEN_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="File holding the token (first non-# line).")
@click.option("--ca-bundle", envvar="DOCKET_CA_BUNDLE", show_envvar=True, default=None,
              type=click.Path(exists=True, path_type=Path),
              help="CA certificate(s) (PEM) to verify an https:// registry with  [default: the system CAs]")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no narrative; only results and errors.")
@click.option("-v", "--verbose", count=True, help="Log what happens (repeat for debug logs) on stderr.")
@click.option("--traceback", is_flag=True, envvar="DOCKET_TRACEBACK", help="Show the Python traceback of a failure.")
@click.version_option(__version__, "--version", prog_name="docket")
@click.pass_context
def cli(ctx: click.Context, host: str, port: int, location: Path | None, timeout: float, token: str | None,
        token_file: Path | None, ca_bundle: Path | None, quiet: bool, verbose: int, traceback: bool) -> None:
    """Push Docker images to a Docket registry, pull them through BitTorrent, list them.

    \b
      docket push myapp:v1
      docket pull myapp:v1
      docket images
      docket agent       (on every host: docker pull 127.0.0.1:5000/myapp:v1)
    """
    loc = (location.expanduser() if location else default_location()).absolute()
    if not token and token_file is not None:
        token = read_token_file(token_file)
    config = Config(host=host, port=port, location=loc, quiet=quiet, traceback=traceback, timeout=timeout,
                    verbose=verbose, token=token or None, ca_bundle=str(ca_bundle) if ca_bundle else None)
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, handlers=[handler])
    else:  # library warnings (e.g. a slow ctorrent stop) are noise for a user; failures arrive as errors
        handler.setFormatter(SafeFormatter("docket: %(levelname)s: %(message)s"))
        logging.basicConfig(level=logging.ERROR, handlers=[handler])
    ctx.obj = AppContext(config=config, stdout_isatty=sys.stdout.isatty(), stderr_isatty=sys.stderr.isatty())


def read_token_file(path: Path) -> str:
    """The first line that is neither blank nor a # comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                                 param_hint="--token-file / DOCKET_TOKEN_FILE")
    for line in lines:
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise click.BadParameter(f"{path} holds no token", param_hint="--token-file / DOCKET_TOKEN_FILE")


# -- push ------------------------------------------------------------------------------------------------------

@cli.command()
@click.argument("reference", metavar="REPOSITORY[:TAG]")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def push(ctx: click.Context, reference: str, as_json: bool) -> None:
    """Upload a local Docker image to the registry, layer by layer (streamed; no temporary copy).

    Only the layers the registry does not have yet are uploaded. A reference without a tag means :latest.
    """
    push_image(_app(ctx), _ref(reference), as_json=as_json)


def push_image(app: AppContext, ref: Reference, as_json: bool = False) -> None:
    from docket.client.progress import human_bytes
    from docket.client.push import LayerPusher

    image = app.docker.find_image(ref)
    if not app.config.quiet and not as_json:
        for line in (f"Found image: {ref}", f"  ID:       {image.id}", f"  RepoTags: {', '.join(image.repo_tags)}",
                     f"  Created:  {readable_time(image.created)}",
                     f"  Size:     {human_bytes(image.size)} ({image.size} bytes)"):
            app.out(line)
    registry = app.registry
    diff_ids = list((image.attrs.get("RootFS") or {}).get("Layers") or [])
    pusher = LayerPusher(registry, app.reporter())
    # The export is a bit larger than the image's Size: the bar is capped, the final count is exact.
    result = pusher.push(ref, image.id, diff_ids, lambda: app.docker.export(ref), image.size)
    if as_json:
        app.out(json.dumps(result.summary()))
        return
    if app.config.quiet:
        app.out(result.digest)
        return
    app.out(f"Uploaded {result.layers_uploaded} of {result.layers} layers ({human_bytes(result.bytes_uploaded)}); "
            f"{result.layers - result.layers_uploaded} already in the registry")
    app.out(f"Digest: {result.digest}")
    app.out(f"Successfully pushed {ref} to the Docket registry at {registry.url}")


# -- pull ------------------------------------------------------------------------------------------------------

@cli.command()
@click.argument("reference", metavar="REPOSITORY[:TAG]")
@click.option("--peer-ip", envvar="DOCKET_PEER_IP", show_envvar=True, default=None,
              help="Address our ctorrent listens on and connects from  [default: a fresh 127.X.Y.Z when the "
                   "tracker is on this host, else this host's address towards the tracker]")
@click.option("--peer-port", envvar="DOCKET_PEER_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=None, help="Port our ctorrent listens on  [default: ctorrent's (2706, lower if busy)]")
@click.option("--seed-time", type=click.FloatRange(min=0), default=60.0, show_default=True,
              envvar="DOCKET_SEED_TIME", show_envvar=True,
              help="Seconds to keep seeding after the download, in the background (stops early when no peer is "
                   "still downloading); 0 stops at once.")
@click.option("--wait", is_flag=True, envvar="DOCKET_WAIT", show_envvar=True,
              help="Seed in the foreground: return only when seeding ended (by default the pull returns once the "
                   "image is loaded, and a background seeder goes on: `docket seed`).")
@click.option("--stall-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              envvar="DOCKET_STALL_TIMEOUT", show_envvar=True,
              help="Fail when the download makes no progress for this many seconds.")
@click.option("--max-download-rate", type=ByteRate(), default=None, metavar="RATE",
              envvar="DOCKET_MAX_DOWNLOAD_RATE", show_envvar=True,
              help="Bytes per second for all of this pull's downloads together (BitTorrent and HTTP), with a "
                   "unit: 2MB, 500KiB (KB/MB: 1000, KiB/MiB: 1024)  [default: unlimited]")
@click.option("--max-upload-rate", type=ByteRate(), default=None, metavar="RATE",
              envvar="DOCKET_MAX_UPLOAD_RATE", show_envvar=True,
              help="Bytes per second for all of this pull's uploads together, and for the background seeder it "
                   "starts (one already running keeps the limit it was started with)  [default: unlimited]")
@click.option("--transport", type=click.Choice(["auto", "p2p", "http"], case_sensitive=False), default="auto",
              show_default=True, envvar="DOCKET_TRANSPORT", show_envvar=True,
              help="auto: BitTorrent, each layer continuing over HTTP from the registry when the swarm gives no "
                   "progress for --fallback-after seconds (at once if the tracker is unreachable); p2p: BitTorrent "
                   "only; http: the registry over HTTP only (no ctorrent).")
@click.option("--fallback-after", type=click.FloatRange(min=0), default=20.0, show_default=True, metavar="SECONDS",
              envvar="DOCKET_FALLBACK_AFTER", show_envvar=True,
              help="With --transport auto: seconds without BitTorrent progress on a layer before it continues over "
                   "HTTP (ctorrent retries a failed tracker every ~15 s).")
@click.option("--load/--no-load", default=True, show_default=True,
              help="Load the image into Docker after download and verification.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the verified `docker load`-able tarball to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def pull(ctx: click.Context, reference: str, peer_ip: str | None, peer_port: int | None, seed_time: float,
         wait: bool, stall_timeout: float, max_download_rate: int | None, max_upload_rate: int | None,
         transport: str, fallback_after: float, load: bool, output: Path | None, as_json: bool) -> None:
    """Download an image through BitTorrent, verify it, load it into Docker; seed it for a while.

    A reference without a tag means :latest. An interrupted pull resumes where it stopped. When the swarm gives
    nothing (tracker down, no reachable peer), layers continue over HTTP from the registry (--transport auto).
    The pull returns once the image is loaded; what it downloaded goes on seeding in a background seeder (one per
    --location, see `docket seed`) for up to --seed-time, or until no peer still needs it.
    """
    from docket.client.background import Handoff
    from docket.client.peer import validate_peer_ip
    from docket.client.pull import PullOptions, Puller

    app = _app(ctx)
    ref = _ref(reference)
    if peer_ip:
        peer_ip = validate_peer_ip(peer_ip)
    opts = PullOptions(location=app.config.location, peer_ip=peer_ip, peer_port=peer_port, seed_time=seed_time,
                       stall_timeout=stall_timeout, load=load, output=output, max_download_rate=max_download_rate,
                       max_upload_rate=max_upload_rate, transport=transport.lower(), fallback_after=fallback_after)
    puller = Puller(app.registry, app.docker if load else None, opts, app.reporter(),
                    handoff=None if wait else Handoff(app.config.location, max_upload_rate))
    result = puller.pull(ref)
    if as_json:
        app.out(json.dumps(result.summary()))
    elif not app.config.quiet:
        from docket.client.progress import human_bytes

        what = "Pulled and loaded" if result.loaded else "Downloaded and verified"
        x = result.extra
        app.out(f"Downloaded {x['layers_downloaded']} of {x['layers']} layers "
                f"({human_bytes(x['bytes_from_peers'])} through BitTorrent, "
                f"{human_bytes(x['bytes_from_registry'])} over HTTP); "
                f"{x['layers_present']} already in Docker ({human_bytes(x['bytes_present'])})"
                + (f", {x['layers_cached']} already downloaded" if x["layers_cached"] else ""))
        if x.get("layers_over_http") and x.get("transport_requested") == "auto":
            app.out(f"{x['layers_over_http']} layer(s) came over HTTP from the registry instead of BitTorrent: "
                    f"{x['fallback_reason']}")
        app.out(f"{what} {result.ref} ({result.image_id}) in {result.seconds:.1f} s")
        if result.output:
            app.out(f"Tarball: {result.output}")


# -- seed ------------------------------------------------------------------------------------------------------

@cli.command()
@click.option("--list", "show", is_flag=True, help="List what the background seeder seeds (the default).")
@click.option("--stop", is_flag=True, help="Stop the background seeder and everything it seeds.")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.pass_context
def seed(ctx: click.Context, show: bool, stop: bool, as_json: bool) -> None:
    """The background seeder of --location: what it seeds for other hosts, or stop it.

    `docket pull` hands the layers it downloaded to it and returns; it seeds each for up to the pull's
    --seed-time, stops a layer earlier once no peer still downloads it, and ends when it seeds nothing.
    """
    from docket.client import background

    app = _app(ctx)
    location = app.config.location
    if show and stop:
        raise click.UsageError("give --list or --stop, not both")
    if stop:
        pid = background.stop(location)
        if as_json:
            app.out(json.dumps({"stopped": pid is not None, "pid": pid, "location": str(location)}))
        elif pid is None:
            app.info(f"No background seeder runs for {location}.")
        else:
            app.out(f"Stopped the background seeder (pid {pid}) of {location}")
        return
    state = background.SeederFiles(location).read_state()
    if as_json:
        app.out(json.dumps(state))
        return
    if not state["running"]:
        app.info(f"No background seeder runs for {location}.")
        return
    blobs = state["blobs"]
    who = "docket agent" if state.get("agent") else "Background seeder"
    app.info(f"{who} pid {state.get('pid')} of {location}: {len(blobs)} layer(s)")
    if blobs:
        from docket.client.progress import human_bytes, printable

        rows = [(printable(str(b.get("ref", "")), 200), _short_digest(b.get("digest")),
                 human_bytes(b["size"]) if isinstance(b.get("size"), int) else "?", str(b.get("peer", "")),
                 "while held" if b.get("seconds_left") is None else f"{b['seconds_left']:.0f} s",
                 f"{b.get('uploaded_mb', 0)} MB") for b in blobs]
        for line in plain_table(("IMAGE", "LAYER", "SIZE", "PEER", "LEFT", "UPLOADED"), rows):
            app.out(line)


# -- agent ----------------------------------------------------------------------------------------------------

def _listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:5000)")
    return host.strip("[]"), int(port)


@cli.command()
@click.option("--listen", envvar="DOCKET_AGENT_LISTEN", show_envvar=True, default="127.0.0.1:5000",
              show_default=True, callback=_listen, help="Address and port of the /v2 API for local clients.")
@click.option("--cache-dir", envvar="DOCKET_AGENT_CACHE_DIR", show_envvar=True, default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where blobs are kept  [default: --location, the cache docket pull uses]")
@click.option("--cache-size", envvar="DOCKET_AGENT_CACHE_SIZE", show_envvar=True, type=ByteSize(), default="20GiB",
              show_default=True, help="Most bytes of blobs kept; the least recently used go first.")
@click.option("--peer-ip", envvar="DOCKET_PEER_IP", show_envvar=True, default=None,
              help="Address the agent's ctorrents listen on and announce  [default: chosen towards the tracker]")
@click.option("--fallback-after", envvar="DOCKET_FALLBACK_AFTER", show_envvar=True, type=click.FloatRange(min=0),
              default=20.0, show_default=True, help="Seconds without swarm progress before a blob goes over HTTP.")
@click.option("--max-download-rate", envvar="DOCKET_MAX_DOWNLOAD_RATE", show_envvar=True, type=ByteRate(),
              default=None, metavar="RATE", help="Bytes per second for all the agent's downloads together "
                                                 "(BitTorrent and HTTP), with a unit: 2MB, 500KiB  [default: none]")
@click.option("--max-upload-rate", envvar="DOCKET_MAX_UPLOAD_RATE", show_envvar=True, type=ByteRate(),
              default=None, metavar="RATE", help="Bytes per second for all the agent's uploads together (its "
                                                 "seeders and downloads)  [default: none]")
@click.option("--seed-engine", envvar="DOCKET_AGENT_SEED_ENGINE", show_envvar=True, default="libtorrent",
              show_default=True, type=click.Choice(["libtorrent", "ctorrent"]),
              help="What seeds the held blobs: one libtorrent session in the agent, or a ctorrent process each.")
@click.option("--heartbeat-interval", envvar="DOCKET_AGENT_HEARTBEAT_INTERVAL", show_envvar=True,
              type=click.FloatRange(min=0, max=3600), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between reports to the registry (docket hosts, its web page); 0: none.")
@click.option("--host-id", envvar="DOCKET_AGENT_HOST_ID", show_envvar=True, default=None,
              help="This host's name in the registry's host list  [default: the host name]")
@click.option("--log-level", envvar="DOCKET_LOG_LEVEL", show_envvar=True, default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.pass_context
def agent(ctx: click.Context, listen: tuple[str, int], cache_dir: Path | None, cache_size: int,
          peer_ip: str | None, fallback_after: float, max_download_rate: int | None, max_upload_rate: int | None,
          seed_engine: str, heartbeat_interval: float, host_id: str | None, log_level: str) -> None:
    """Serve `docker pull` for this host through the swarm (runs until stopped).

    \b
    Serves the read side of the Registry V2 API on --listen to the local dockerd,
    containerd or kubelet; blobs come through BitTorrent from the other hosts and
    the registry's seeders (HTTP when the swarm gives nothing), and everything the
    agent holds it seeds. With the default --listen:
      docker pull 127.0.0.1:5000/myapp:v42
    """
    from docket.agent.heartbeat import validate_host_id
    from docket.agent.service import AgentConfig, serve

    if 0 < heartbeat_interval < 0.1:
        raise click.BadParameter("give at least 0.1 seconds, or 0 for no heartbeat", param_hint="--heartbeat-interval")
    from docket.client.api import base_url
    from docket.client.peer import validate_peer_ip

    app = _app(ctx)
    root = logging.getLogger()
    root.setLevel(getattr(logging, log_level.upper()))
    for handler in root.handlers:
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    config = AgentConfig(registry=base_url(app.config.host, app.config.port),
                         cache_dir=(cache_dir.expanduser() if cache_dir else app.config.location).absolute(),
                         cache_size=cache_size, listen_host=listen[0], listen_port=listen[1], token=app.config.token,
                         ca_bundle=app.config.ca_bundle, peer_ip=validate_peer_ip(peer_ip) if peer_ip else None,
                         fallback_after=fallback_after, max_download_rate=max_download_rate,
                         max_upload_rate=max_upload_rate,
                         seed_engine=seed_engine, heartbeat_interval=heartbeat_interval,
                         host_id=validate_host_id(host_id) if host_id is not None else None)
    serve(config)


# -- images ----------------------------------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
@click.pass_context
def images(ctx: click.Context, as_json: bool) -> None:
    """List the images in the registry."""
    app = _app(ctx)
    records = app.registry.list_images()
    if as_json:
        app.out(json.dumps(records, indent=2 if app.stdout_isatty else None))
        return
    if not records:
        click.echo(f"No images in the registry at {app.registry.url}.", err=True)
        return
    if app.config.quiet:
        from docket.client.progress import printable

        for r in records:
            app.out(printable(str(r.get("ref") or f"{r.get('repository')}:{r.get('tag')}"), 300))
        return
    rows = [image_row(r) for r in records]
    headers = ("REPOSITORY:TAG", "IMAGE ID", "SIZE", "CREATED", "DIGEST")
    if app.stdout_isatty:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for h in headers:
            table.add_column(h, no_wrap=True)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: no rich markup ([link=...] would emit OSC 8)
        Console().print(table)
    else:
        for line in plain_table(headers, rows):
            app.out(line)


# -- rm and retention ------------------------------------------------------------------------------------------

def _explicit_ref(text: str) -> Reference:
    """``rm`` takes no implicit :latest: deleting what a missing tag defaults to would surprise."""
    ref = _ref(text)
    if not text.endswith(f":{ref.tag}"):
        raise errors.InvalidReference(f"{text!r} names no tag", f"give the tag to delete, e.g. {ref.repository}:latest")
    return ref


@cli.command()
@click.argument("references", metavar="REPOSITORY:TAG...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the deleted tags as a JSON list.")
@click.pass_context
def rm(ctx: click.Context, references: tuple[str, ...], as_json: bool) -> None:
    """Delete tags from the registry (needs a push token: --token / DOCKET_TOKEN).

    Every reference is checked first: a malformed one (exit 2) or a tag the registry does not have (exit 4)
    deletes nothing. The blobs no other tag uses are freed by the registry's GC after its grace period.
    Local Docker images are not touched (that is `docker rmi`).
    """
    app = _app(ctx)
    refs = list(dict.fromkeys(_explicit_ref(text) for text in references))
    digests = {ref: app.registry.get_image(ref).get("digest") for ref in refs}  # all there, or nothing goes
    for ref in refs:
        app.registry.delete_tag(ref)
        if not as_json:
            app.out(str(ref) if app.config.quiet else f"Deleted {ref} ({_short_digest(digests[ref])})")
    if as_json:
        app.out(json.dumps([{"ref": str(ref), "digest": digests[ref]} for ref in refs]))


@cli.command()
@click.option("--keep-tags", type=click.IntRange(1), default=None,
              help="Keep the newest N tags of each repository, for this run  [default: the registry's --keep-tags]")
@click.option("--keep-pattern", "keep_patterns", multiple=True, metavar="GLOB",
              help="Never remove tags matching this shell glob, for this run (repeatable)  [default: the "
                   "registry's --keep-pattern]")
@click.option("--apply", "apply_", is_flag=True, help="Remove the tags (without it: a dry run that lists them).")
@click.option("--json", "as_json", is_flag=True, help="Print the registry's answer as JSON.")
@click.pass_context
def retention(ctx: click.Context, keep_tags: int | None, keep_patterns: tuple[str, ...], apply_: bool,
              as_json: bool) -> None:
    """List the tags the registry's retention policy would remove now; --apply removes them (push token).

    Per repository the newest N tags by push time stay, and every tag matching a keep pattern (not counted
    in N). GC frees their blobs after its grace period.
    """
    app = _app(ctx)
    reply = app.registry.retention(dry_run=not apply_, keep_tags=keep_tags, keep_patterns=keep_patterns)
    if as_json:
        app.out(json.dumps(reply))
        return
    from docket.client.progress import printable

    gone = [r for r in reply["removed"] if isinstance(r, dict)]
    for r in gone:
        line = f"{r.get('repository')}:{r.get('tag')}"
        app.out(printable(line, 300) if app.config.quiet else
                f"{'Removed' if apply_ else 'Would remove'} {printable(line, 300)} ({_short_digest(r.get('digest'))}, "
                f"pushed {readable_time(r.get('pushed_at'))})")
    if not app.config.quiet:
        verb = "removed" if apply_ else "would be removed"
        click.echo(f"{len(gone)} tag(s) {verb}, {reply.get('kept')} kept"
                   + ("" if apply_ or not gone else "; run with --apply to remove them"), err=True)


# -- hosts ------------------------------------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the host records as a JSON list.")
@click.pass_context
def hosts(ctx: click.Context, as_json: bool) -> None:
    """List the hosts whose `docket agent` reported to the registry."""
    from docket.client.progress import human_bytes, printable

    app = _app(ctx)
    records = app.registry.list_hosts()
    if as_json:
        app.out(json.dumps(records, indent=2 if app.stdout_isatty else None))
        return
    if not records:
        click.echo(f"No agent has reported to the registry at {app.registry.url}.", err=True)
        return
    headers = ("HOST", "ADDRESS", "LAST SEEN", "BLOBS", "BYTES", "STATE")
    rows = []
    for r in records:
        blobs = r.get("blobs") if isinstance(r.get("blobs"), dict) else {}
        count, size = blobs.get("count"), blobs.get("bytes")
        rows.append((printable(str(r.get("id", "?")), 128),
                     printable(str(r.get("peer_address") or r.get("remote_address") or "?"), 64),
                     printable(_ago(r.get("last_seen")), 100), str(count) if isinstance(count, int) else "?",
                     human_bytes(size) if isinstance(size, int) else "?", printable(str(r.get("state", "?")), 16)))
    for line in plain_table(headers, rows):
        app.out(line)


def _short(value: Any, n: int = 12) -> str:
    text = str(value or "")
    return text.split(":", 1)[1][:n] if text.startswith(("sha256:", "sha512:")) else text[:n]


def _parse_time(created: Any) -> datetime | None:
    """RFC 3339 (a bare time counts as UTC), else None."""
    try:
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _ago(created: Any, now: datetime | None = None) -> str:
    when = _parse_time(created)
    if when is None:
        return str(created or "")
    secs = ((now or datetime.now(timezone.utc)) - when).total_seconds()
    if secs < 0:
        return when.strftime("%Y-%m-%d %H:%M")
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = int(secs // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def readable_time(created: Any) -> str:
    """RFC 3339 -> "2026-11-27 21:09:04 UTC (3 minutes ago)"; anything else as given."""
    when = _parse_time(created)
    if when is None:
        return str(created or "")
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({_ago(when.isoformat())})"


def image_row(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    from docket.client.progress import human_bytes, printable

    ref = printable(str(r.get("ref") or f"{r.get('repository')}:{r.get('tag')}"), 300)
    size = r.get("size")
    return (ref, printable(_short(r.get("image_id"))), human_bytes(size) if isinstance(size, int) else "?",
            printable(_ago(r.get("created")), 100), printable(_short_digest(r.get("digest"))))


def _short_digest(digest: Any) -> str:
    """``sha256:0123456789ab`` (the algorithm kept: a sha512 digest stays recognisable)."""
    text = str(digest or "")
    algorithm, sep, _ = text.partition(":")
    return f"{algorithm}:{_short(text)}" if sep else text[:12]


def plain_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*row).rstrip() for row in rows]


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C does, so ``finally`` blocks stop our ctorrent instead of orphaning it."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)  # a closed terminal: unwind and stop our ctorrents, as SIGTERM does
    raise_open_files_limit()
    try:
        cli.main(args=argv, prog_name="docket")
    except KeyboardInterrupt:  # outside a subcommand (e.g. while parsing)
        click.echo("\nInterrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    main()
