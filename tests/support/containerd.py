"""A private, real containerd started by a test, and `ctr` against it.

The daemon runs as root from its own config file (config version 2): root, state, sockets and the `opt` plugin's
directory all under one temp dir, so it never touches the system's containerd or dockerd (/var/lib/containerd,
/run/containerd, /opt/containerd). Only what a pull needs is loaded: the CRI plugin, the task runtimes and the
snapshotters that need kernel features or block devices are disabled; pulls unpack with the `native` snapshotter
(plain copied directories, no overlay mounts). The daemon runs in a private mount namespace (`unshare`, which execs
it: the pid is containerd's), so a transient mount it makes (the differ's bind mount under `root/tmpmounts`) can
never outlive it in the host's namespace. containerd opens no network socket: the registry requests are made by
`ctr` itself, to the addresses a test gives it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.procs import stop_process, tail, wait_until
from tests.support.tools import IN_CI, need

SNAPSHOTTER = "native"
NAMESPACE = "docket-test"
# Plugins a pull does not need, or that need what a test machine may lack (btrfs/zfs/devmapper, aufs, overlay
# mounts, runc shims and cgroups); with them off the daemon only serves content, images, snapshots and diffs.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.internal.v1.restart",
)


def write_hosts_toml(hosts_dir: Path, registry_host: str, server: str, mirror: str | None) -> Path:
    """containerd's registry host configuration (``hosts_dir/<registry_host>/hosts.toml``): pull and resolve from
    ``mirror`` first, ``server`` (the registry itself) when the mirror fails. The file a user writes under
    /etc/containerd/certs.d to put a `docket agent` in front of the registry."""
    path = hosts_dir / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'server = "{server}"\n'
    if mirror is not None:
        text += f'\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    path.write_text(text)
    return path


@dataclass
class Containerd:
    """A real containerd daemon on a temp dir; use as a context manager (starts it, stops it, removes its dirs)."""

    base: Path | None = None
    proc: subprocess.Popen | None = None
    _made_base: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        assert self.base is not None
        return str(self.base / "containerd.sock")

    @property
    def root(self) -> Path:
        assert self.base is not None
        return self.base / "root"

    @property
    def log(self) -> Path:
        assert self.base is not None
        return self.base / "containerd.log"

    def config(self) -> str:
        assert self.base is not None
        disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.base / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n  level = "debug"\n'
            '[metrics]\n  address = ""\n'
            '[plugins]\n'
            f'  [plugins."io.containerd.internal.v1.opt"]\n    path = "{self.base / "opt"}"\n'
        )

    def start(self) -> None:
        binary = need("containerd")
        need("ctr")
        if os.geteuid() != 0:
            msg = "containerd needs root to run"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
        if self.base is None:
            # short: the socket path must fit a sockaddr_un (108 bytes), which pytest's tmp_path may not
            self.base = Path(tempfile.mkdtemp(prefix="docket-ctrd-"))
            self._made_base = True
        config = self.base / "config.toml"
        config.write_text(self.config())
        args = [binary, "--config", str(config)]
        unshare = shutil.which("unshare")
        if unshare:
            args = [unshare, "--mount", "--propagation", "private", *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=30, what=f"containerd at {self.address}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"containerd exited with {self.proc.returncode}:\n{tail(self.log)}")
        return Path(self.address).is_socket() and self.ctr("version", check=False, timeout=10).returncode == 0

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ctr --address SOCK --namespace NS ARGS...`; raise with its output when ``check`` and it failed."""
        cmd = [need("ctr"), "--address", self.address, "--namespace", NAMESPACE, *args]
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def pull(self, ref: str, hosts_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ctr images pull --hosts-dir` and unpack (native snapshotter); not checked: the caller asserts. ctr logs
        "trying next host" on stderr each time a host (a mirror) fails and it moves on to the next."""
        return self.ctr("images", "pull", "--snapshotter", SNAPSHOTTER, "--hosts-dir", str(hosts_dir), *extra, ref,
                        check=False, timeout=timeout)

    def images(self) -> list[dict[str, str]]:
        """`ctr images ls` as rows: ref, type (the manifest's media type), digest (the manifest's digest)."""
        lines = self.ctr("images", "ls").stdout.splitlines()
        rows = []
        for line in lines[1:]:
            cols = line.split()
            if len(cols) >= 3:
                rows.append({"ref": cols[0], "type": cols[1], "digest": cols[2]})
        return rows

    def snapshot_dirs(self) -> list[Path]:
        """The native snapshotter's directories (each a full copy of its chain: the top one is the image's
        filesystem as a container would see it)."""
        base = self.root / f"io.containerd.snapshotter.v1.{SNAPSHOTTER}" / "snapshots"
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def stop(self) -> None:
        """Stop the daemon by its pid, unmount anything left under its dirs, remove the dirs we made."""
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None
        if self.base is None:
            return
        for mountpoint in mounts_under(self.base):
            subprocess.run(["umount", "-l", mountpoint], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if self._made_base and not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.base is not None:
            print(f"--- tail of {self.log} ---\n{tail(self.log)}")
        self.stop()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path`` in this process's mount namespace, deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 for spaces
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)
