#!/usr/bin/env python3
"""Pull an image from a Registry V2 / OCI ``/v2`` base URL the way dockerd does, and time it.

dockerd's order: GET the manifest (Accept: Docker v2 schema 2, OCI manifest, and both index types; an index is
resolved to linux/amd64), GET the config blob, then the layers with at most three downloads at a time
(``max-concurrent-downloads`` = 3), each retried on failure (dockerd: up to 5 attempts). Every blob is streamed
through sha256 and checked against its digest; nothing is kept unless ``--out`` is given.

Stdlib only (urllib, no proxy from the environment), so the swarm benchmark can start it as a plain Python process
inside a host's network namespace. Optional start barrier (``--ready R --go G``): it writes R once imported, waits
for G to exist, then starts its clock, so N hosts start together and Python start-up is not counted.

Prints one JSON line: ``ok``, ``started`` (wall clock), ``seconds`` (until the last layer was verified),
``manifest_s``, ``config_s``, ``bytes``, ``retries``, and per blob ``[digest, size, start_s, end_s, attempts]``.

    python benchmarks/v2pull.py http://127.0.0.1:5000 bench/swarm:tag
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])
INDEX_TYPES = {"application/vnd.docker.distribution.manifest.list.v2+json", "application/vnd.oci.image.index.v1+json"}
CHUNK = 1024 * 1024


class PullError(Exception):
    """A blob or manifest that could not be fetched or failed its digest."""


@dataclass
class BlobTiming:
    digest: str
    size: int
    start_s: float = 0.0
    end_s: float = 0.0
    attempts: int = 0
    error: str = ""


@dataclass
class PullResult:
    ok: bool = False
    started: float = 0.0  # wall clock at the start (after the barrier)
    seconds: float = 0.0  # until the last layer was verified
    manifest_s: float = 0.0
    config_s: float = 0.0
    bytes: int = 0  # blob bytes received (config and layers, all attempts)
    retries: int = 0
    error: str = ""
    blobs: list[list] = field(default_factory=list)


class V2Puller:
    """dockerd's pull sequence against one ``/v2`` base; ``headers`` go on every request (e.g. Authorization)."""

    def __init__(self, base: str, *, parallel: int = 3, attempts: int = 5, timeout: float = 60.0,
                 out: Path | None = None, headers: dict[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.parallel, self.attempts, self.timeout, self.out = parallel, attempts, timeout, out
        self.headers = dict(headers or {})
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        self._lock = threading.Lock()
        self.bytes = 0
        self.t0 = 0.0

    def _get(self, path: str, accept: str | None = None):  # noqa: ANN202 - an http.client response
        req = urllib.request.Request(self.base + path, headers=dict(self.headers))
        if accept:
            req.add_header("Accept", accept)
        return self.opener.open(req, timeout=self.timeout)

    def manifest(self, repo: str, ref: str) -> dict:
        with self._get(f"/v2/{repo}/manifests/{ref}", MANIFEST_ACCEPT) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            digest = resp.headers.get("Docker-Content-Digest")
        if digest and digest.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PullError(f"manifest {repo}:{ref} does not match its Docker-Content-Digest {digest}")
        doc = json.loads(body)
        if doc.get("mediaType", ctype) in INDEX_TYPES or "manifests" in doc:
            plat = [m for m in doc["manifests"]
                    if m.get("platform", {}).get("os") == "linux" and m["platform"].get("architecture") == "amd64"]
            return self.manifest(repo, (plat or doc["manifests"])[0]["digest"])
        return doc

    def blob(self, repo: str, digest: str, size: int) -> BlobTiming:
        """Fetch one blob, hashing as it streams; retried (from the start, as dockerd does without Range)."""
        t = BlobTiming(digest, size, start_s=round(time.monotonic() - self.t0, 3))
        algo, _, hexd = digest.partition(":")
        while t.attempts < self.attempts:
            t.attempts += 1
            try:
                h = hashlib.new(algo)
                got = 0
                sink = open(self.out / hexd, "wb") if self.out else None
                try:
                    with self._get(f"/v2/{repo}/blobs/{digest}") as resp:
                        while chunk := resp.read(CHUNK):
                            h.update(chunk)
                            got += len(chunk)
                            if sink:
                                sink.write(chunk)
                finally:
                    with self._lock:
                        self.bytes += got
                    if sink:
                        sink.close()
                if got != size or h.hexdigest() != hexd:
                    raise PullError(f"{digest}: got {got} of {size} bytes, sha256 {h.hexdigest()[:12]}")
                t.end_s = round(time.monotonic() - self.t0, 3)
                t.error = ""
                return t
            except (OSError, PullError, urllib.error.URLError) as exc:  # HTTPError, timeouts, resets
                t.error = f"{type(exc).__name__}: {exc}"[:300]
                time.sleep(min(0.5 * t.attempts, 2.0))
        raise PullError(f"{digest}: {t.attempts} attempts failed; last: {t.error}")

    def pull(self, repo: str, ref: str) -> PullResult:
        res = PullResult(started=time.time())
        self.t0 = time.monotonic()
        timings: list[BlobTiming] = []
        try:
            m = self.manifest(repo, ref)
            res.manifest_s = round(time.monotonic() - self.t0, 3)
            cfg = m["config"]
            timings.append(self.blob(repo, cfg["digest"], int(cfg["size"])))
            res.config_s = round(time.monotonic() - self.t0, 3)
            with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="layer") as pool:
                futures = [pool.submit(self.blob, repo, layer["digest"], int(layer["size"])) for layer in m["layers"]]
                for f in futures:
                    timings.append(f.result())
            res.ok = True
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line
            res.error = f"{type(exc).__name__}: {exc}"[:500]
        res.seconds = round(time.monotonic() - self.t0, 3)
        res.bytes = self.bytes
        res.retries = sum(max(0, t.attempts - 1) for t in timings)
        res.blobs = [[t.digest, t.size, t.start_s, t.end_s, t.attempts] for t in timings]
        return res


def split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@sha256:...`` (no registry host part: the base URL is the registry)."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the registry's base URL, e.g. http://127.0.0.1:5000 (its /v2 is used)")
    p.add_argument("ref", help="repo:tag or repo@digest")
    p.add_argument("--parallel", type=int, default=3, help="layers at a time (dockerd's default 3)")
    p.add_argument("--attempts", type=int, default=5, help="tries per blob (dockerd: 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per read, seconds")
    p.add_argument("--out", type=Path, default=None, help="keep the blobs in this directory (default: discard)")
    p.add_argument("--authorization", default=os.environ.get("V2PULL_AUTHORIZATION"), help="Authorization header")
    p.add_argument("--ready", type=Path, help="start barrier: create this file when imported ...")
    p.add_argument("--go", type=Path, help="... then wait until this file exists")
    a = p.parse_args(argv)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": a.authorization} if a.authorization else {}
    puller = V2Puller(a.base, parallel=a.parallel, attempts=a.attempts, timeout=a.timeout, out=a.out, headers=headers)
    if a.ready:
        a.ready.touch()
    if a.go:
        while not a.go.exists():
            time.sleep(0.002)
    res = puller.pull(*split_ref(a.ref))
    print(json.dumps(asdict(res)), flush=True)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
