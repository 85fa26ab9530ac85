"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a cluster made by ``initdb`` in a
temporary directory, run as a user that is not root (Debian's ``postgres`` when we are root, else ourselves).

We start the ``postgres`` binary itself (no pg_ctl daemon): its pid is ours to stop. It listens on 127.0.0.1 on a
free port and on a unix socket in its directory, trusts the ``docket`` role (a superuser), and trades durability for
speed (``fsync=off``). Tests make a database each (``create_database``) and drop it afterwards.

scripts/test.sh starts one server for the whole run with this module's command line and exports its base URL as
DOCKET_TEST_POSTGRES; the ``postgres`` fixture (tests/conftest.py) uses it, or starts its own::

    eval "$(python -m tests.support.postgres start)"   # exports DOCKET_TEST_POSTGRES{,_PID,_DIR}
    python -m tests.support.postgres stop "$DOCKET_TEST_POSTGRES_PID" "$DOCKET_TEST_POSTGRES_DIR"
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import free_port, pid_gone, tail, wait_until

ENV_URL = "DOCKET_TEST_POSTGRES"
ROLE = "docket"
BIN_ROOT = Path("/usr/lib/postgresql")
SETTINGS = {
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",  # a throw-away cluster
    "max_connections": "500",  # several registry instances per test, three xdist workers, advisory-lock connections
    "shared_buffers": "64MB", "listen_addresses": "127.0.0.1",
    "timezone": "America/St_Johns",  # not UTC (-03:30): a time the registry stores must not depend on the server's
}


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (/usr/lib/postgresql/<major>/bin), or None."""
    found = [p for p in BIN_ROOT.glob("*/bin") if (p / "postgres").exists() and p.parent.name.isdigit()]
    return max(found, key=lambda p: int(p.parent.name), default=None)


def _run_as() -> pwd.struct_passwd | None:
    """The user the server runs as: Debian's ``postgres`` when we are root (PostgreSQL refuses root), else None."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


@dataclass
class PostgresServer:
    """A PostgreSQL server reachable at ``base_url`` (no database name). ``pid``/``root`` are set when we started
    it (``start``), None when it is someone else's (``attach``): ``stop`` ends only ours."""

    base_url: str
    pid: int | None = None
    root: Path | None = None
    proc: subprocess.Popen | None = None

    @classmethod
    def attach(cls, url: str) -> PostgresServer:
        """Someone else's server at ``url`` (a database name in it is ignored: tests make their own)."""
        from sqlalchemy import URL, make_url

        u = make_url(url)
        return cls(URL.create(u.drivername, u.username, u.password, u.host, u.port)
                   .render_as_string(hide_password=False))

    @classmethod
    def start(cls, *, detach: bool = False) -> PostgresServer:
        """initdb into a fresh temporary directory and start the server; ``detach``: in its own session, to outlive
        this process (the command line)."""
        binaries = bin_dir()
        if binaries is None:
            raise FileNotFoundError(f"PostgreSQL is not installed (no {BIN_ROOT}/*/bin/postgres): run scripts/setup.sh")
        owner = _run_as()
        root = Path(tempfile.mkdtemp(prefix="docket-pg-"))
        try:
            as_owner: dict = {}
            if owner is not None:
                os.chown(root, owner.pw_uid, owner.pw_gid)
                as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [],
                            "env": {**os.environ, "HOME": str(root), "USER": owner.pw_name}}
            data = root / "data"
            subprocess.run([str(binaries / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
                            "--no-locale", "--no-sync"], cwd=root, check=True, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, **as_owner)
            port = free_port()
            args = [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root)]
            for key, value in SETTINGS.items():
                args += ["-c", f"{key}={value}"]
            log = root / "postgres.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(args, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=detach, **as_owner)
            server = cls(f"postgresql+psycopg://{ROLE}@127.0.0.1:{port}", pid=proc.pid, root=root, proc=proc)
            try:
                wait_until(lambda: server._answers(proc), timeout=60, what=f"PostgreSQL on port {port}")
            except (TimeoutError, AssertionError):
                server.stop()
                raise
            return server
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {exc.stderr or exc.stdout}") from exc
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def _answers(self, proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"postgres exited with {proc.returncode}:\n{tail(self.root / 'postgres.log')}")
        with self._admin():
            return True

    def url(self, dbname: str) -> str:
        return f"{self.base_url}/{dbname}"

    @contextlib.contextmanager
    def _admin(self):
        import psycopg

        conninfo = self.url("postgres").replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            yield conn

    def create_database(self, template: str | None = None) -> str:
        """A new database; its name. Empty, with ICU's en-US collation as on many servers (not the byte order of
        "C", which would hide ordering that differs from SQLite's); or a copy of ``template`` (one of ours, which
        nobody may be connected to)."""
        name = f"docket_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            if template is not None:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_checked(template)}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
                             "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending the sessions still connected to it (a test's leftovers must not keep it)."""
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the server we started, then its directory removed; nothing for an attached one."""
        if self.pid is not None:
            if self.proc is not None:
                _stop_child(self.proc)
            else:
                _stop_pid(self.pid, self.root)
            self.pid = self.proc = None
        if self.root is not None and self.root.name.startswith("docket-pg-"):
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _checked(name: str) -> str:
    if not re.fullmatch(r"docket_test_[a-z0-9_]+", name):
        raise ValueError(f"not a test database name: {name!r}")
    return name


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _stop_pid(pid: int, root: Path | None) -> None:
    """Stop a server started by an earlier ``start`` command: only if the pid still is that postgres (its command
    line names our directory), never a pid reused by something else."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return
    if root is None or str(root) not in cmdline:
        print(f"pid {pid} is not the PostgreSQL in {root}: not stopping it", file=sys.stderr)
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"] and len(argv) == 1:
        try:
            server = PostgresServer.start(detach=True)
        except (OSError, RuntimeError, AssertionError, TimeoutError) as exc:
            print(f"cannot start PostgreSQL for the tests: {exc}", file=sys.stderr)
            return 1
        # the server's own "postgres" database in the URL: a client connects to it to create the tests' databases
        print(f"export {ENV_URL}={server.url('postgres')} {ENV_URL}_PID={server.pid} {ENV_URL}_DIR={server.root}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 3:
        server = PostgresServer("", pid=int(argv[1]), root=Path(argv[2]))
        server.stop()
        return 0
    print("usage: python -m tests.support.postgres start | stop PID DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
