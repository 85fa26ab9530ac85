"""Runnable test images built offline (FROM scratch with busybox) on a real dockerd."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.tools import need


@dataclass
class ImageFactory:
    """Builds runnable images offline: FROM scratch, busybox, and a layer of random data."""

    client: object
    workdir: Path
    built: list[str] = field(default_factory=list)

    def build(self, ref: str | None = None, data_mib: float = 2, marker: str | None = None) -> tuple[str, str]:
        """Build ``ref``; returns (ref, marker). `docker run ref cat /marker` prints the marker."""
        ref = ref or f"docket-test/{uuid.uuid4().hex[:10]}:v1"
        marker = marker or uuid.uuid4().hex
        ctx = self.workdir / uuid.uuid4().hex
        ctx.mkdir(parents=True)
        shutil.copy(need("busybox"), ctx / "busybox")
        (ctx / "data.bin").write_bytes(os.urandom(int(data_mib * 1024 * 1024)))
        (ctx / "marker").write_text(marker + "\n")
        (ctx / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY data.bin /data.bin\nCOPY marker /marker\n"
            'ENTRYPOINT ["/bin/busybox"]\n'
        )
        self.client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True)
        shutil.rmtree(ctx, ignore_errors=True)
        self.built.append(ref)
        return ref, marker

    def run(self, ref: str, *cmd: str) -> str:
        out = self.client.containers.run(ref, list(cmd) or ["cat", "/marker"], remove=True, network_mode="none")
        return out.decode().strip()

    def remove(self, ref: str) -> None:
        import docker

        try:
            self.client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass

    def cleanup(self) -> None:
        for ref in self.built:
            self.remove(ref)
