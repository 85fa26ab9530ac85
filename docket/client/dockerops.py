"""The local Docker daemon through docker-py's images API: find, export (streamed), load (streamed), verify."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from docket import errors
from docket.client.layers import chain_ids
from docket.reference import Reference

log = logging.getLogger(__name__)

DOCKER_TIMEOUT = 600  # the 60 s default breaks big loads
CHUNK = 1024 * 1024
_DAEMON_HINT = "is dockerd running? check DOCKER_HOST and that you may use its socket (docker info)"


@dataclass(frozen=True)
class LocalImage:
    ref: Reference
    id: str
    repo_tags: list[str]
    created: str
    size: int
    attrs: dict[str, Any] = field(repr=False, default_factory=dict)


def _daemon_error(exc: BaseException, what: str) -> errors.DocketError:
    if isinstance(exc, docker.errors.ImageNotFound):
        return errors.NotFound(f"{what}: no such image in the local Docker daemon",
                               "docker images lists local images; docker pull it first")
    if isinstance(exc, (requests.exceptions.ConnectionError, ConnectionError)):
        return errors.ServiceUnavailable(f"{what}: cannot reach the Docker daemon", _DAEMON_HINT)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return errors.ServiceUnavailable(f"{what}: the Docker daemon did not answer in time",
                                         "the daemon may be overloaded; retry")
    if isinstance(exc, docker.errors.APIError):
        return errors.DocketError(f"{what}: the Docker daemon said: {exc.explanation or exc}")
    if isinstance(exc, docker.errors.DockerException):
        return errors.ServiceUnavailable(f"{what}: cannot reach the Docker daemon ({exc})", _DAEMON_HINT)
    return errors.DocketError(f"{what}: {exc}")


class DockerOps:
    """A lazily connected docker-py client (``docker.from_env``, so DOCKER_HOST selects the daemon)."""

    def __init__(self, client: docker.DockerClient | None = None, timeout: int = DOCKER_TIMEOUT) -> None:
        self._client = client
        self.timeout = timeout

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=self.timeout)
            except docker.errors.DockerException as exc:
                where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
                raise errors.ServiceUnavailable(f"cannot connect to the Docker daemon at {where}",
                                                _DAEMON_HINT) from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def ping(self) -> None:
        """Fail early (before a long download) when the daemon is unreachable."""
        client = self.client
        try:
            client.ping()
        except errors.DocketError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise _daemon_error(exc, "checking the Docker daemon") from exc

    def find_image(self, ref: Reference) -> LocalImage:
        what = f"looking for {ref}"
        client = self.client
        try:
            image = client.images.get(str(ref))
        except Exception as exc:  # noqa: BLE001 - translated
            err = _daemon_error(exc, what)
            if isinstance(err, errors.NotFound):
                err = errors.NotFound(f"image {ref} not found in the local Docker daemon",
                                      "docker images lists local images; docker pull it (or docker tag it) first")
            raise err from exc
        attrs = image.attrs or {}
        return LocalImage(ref=ref, id=image.id, repo_tags=list(image.tags), created=str(attrs.get("Created", "")),
                          size=int(attrs.get("Size") or 0), attrs=attrs)

    def export(self, ref: Reference, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """``docker save ref`` streamed in chunks, the tarball naming ``ref`` (so a load tags it)."""
        what = f"exporting {ref}"
        client = self.client
        try:
            image = client.images.get(str(ref))
            stream = image.save(chunk_size=chunk_size, named=str(ref))
            yield from stream
        except errors.DocketError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise _daemon_error(exc, what) from exc

    def local_chain_ids(self) -> set[str]:
        """Chain ids of every layer stack the daemon has (all images, intermediate ones too)."""
        client = self.client
        out: set[str] = set()
        try:
            for summary in client.api.images(all=True):
                try:
                    attrs = client.api.inspect_image(summary["Id"])
                except docker.errors.ImageNotFound:
                    continue  # removed meanwhile
                out.update(chain_ids(list((attrs.get("RootFS") or {}).get("Layers") or [])))
        except Exception as exc:  # noqa: BLE001 - translated
            raise _daemon_error(exc, "listing local images") from exc
        return out

    def load_stream(self, chunks: Iterator[bytes], ref: Reference, expected_id: str,
                    on_message: Callable[[str], None] | None = None) -> str:
        """``docker load`` from a generated tarball (sent chunked: dockerd accepts that), then check the id."""
        return self._load(chunks, f"loading {ref} into Docker", ref, expected_id, on_message)

    def load(self, path: Path, ref: Reference, expected_id: str,
             on_message: Callable[[str], None] | None = None) -> str:
        """``docker load`` from an open file (streamed), then check ``ref`` now names ``expected_id``."""
        what = f"loading {path.name} into Docker"
        try:
            with open(path, "rb") as f:
                return self._load(f, what, ref, expected_id, on_message)
        except OSError as exc:
            if isinstance(exc, (requests.exceptions.RequestException,)):
                raise _daemon_error(exc, what) from exc
            raise errors.DocketError(f"{what}: cannot read {path}: {exc}") from exc

    def _load(self, data: Any, what: str, ref: Reference, expected_id: str,
              on_message: Callable[[str], None] | None) -> str:
        loaded: list[str] = []
        try:
            for msg in self.client.api.load_image(data, quiet=False):
                if not isinstance(msg, dict):
                    continue
                if msg.get("error") or msg.get("errorDetail"):
                    detail = msg.get("error") or (msg.get("errorDetail") or {}).get("message")
                    raise errors.InvalidImage(f"{what}: docker load failed: {detail}",
                                              "the tarball is not loadable by this daemon")
                stream = str(msg.get("stream") or "").strip()
                if stream:
                    if on_message:
                        on_message(stream)
                    if stream.startswith("Loaded image"):
                        loaded.append(stream.split(":", 1)[1].strip())
        except errors.DocketError:
            raise
        except OSError as exc:
            if isinstance(exc, (requests.exceptions.RequestException,)):
                raise _daemon_error(exc, what) from exc
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise _daemon_error(exc, what) from exc
        try:
            image = self.client.images.get(str(ref))
        except docker.errors.ImageNotFound as exc:
            raise errors.InvalidImage(f"{what}: after the load, {ref} is not in Docker (loaded: {loaded or 'nothing'})",
                                      "the tarball in the registry does not carry this tag; re-push it") from exc
        except Exception as exc:  # noqa: BLE001 - translated
            raise _daemon_error(exc, what) from exc
        if image.id != expected_id:
            raise errors.IntegrityError(
                f"{what}: loaded image id {image.id} differs from the registry's {expected_id}",
                "the registry's metadata and blob disagree; re-push the image")
        return image.id
