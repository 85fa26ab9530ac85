"""The agent's calls to its registry: /v2 reads passed through, and what its blob fetches need.

One ``requests.Session`` for the agent, a connect timeout of a few seconds and a deadline on every call, so a
registry that is down or hung gives the local client a 5xx quickly instead of a hang. HEADs (every blob and
manifest read starts with one) and the /v2/ ping carry no body: they get a shorter deadline than the GETs of
documents, so a hung registry costs a local client 10 s per request, not 30. The local client's
``Authorization`` is forwarded as it came; without one the agent's own token (``--token``) is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import requests

from docket import __version__, errors
from docket.client.api import RegistryClient
from docket.deadline import DeadlineExceeded, DeadlineSession

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # seconds: a registry that does not accept within this is down for our clients
READ_TIMEOUT = 30.0  # seconds for a whole small answer (manifest, tag list, catalog, torrent)
HEAD_TIMEOUT = 10.0  # seconds for an answer without a body (HEAD, the /v2/ ping): the registry's metadata alone
MAX_DOCUMENT = 4 * 1024 * 1024  # bytes: manifests, indexes, tag lists and catalogs larger than this are refused
MAX_TORRENT = 64 * 1024 * 1024
PASSED_HEADERS = ("Content-Type", "Docker-Content-Digest", "Link", "WWW-Authenticate", "Location", "ETag",
                  "OCI-Filters-Applied")


@dataclass
class Answer:
    """A registry answer, read whole (bounded): status, the headers a client needs, body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Upstream:
    """The registry at ``url`` as the agent sees it."""

    def __init__(self, url: str, *, token: str | None = None, ca_bundle: str | None = None,
                 read_timeout: float = READ_TIMEOUT, head_timeout: float = HEAD_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.ca_bundle = ca_bundle
        self.read_timeout = read_timeout
        self.head_timeout = head_timeout
        self.session = DeadlineSession(read_timeout)
        self.session.headers["User-Agent"] = f"docket-agent/{__version__}"
        if ca_bundle:
            self.session.verify = ca_bundle

    def close(self) -> None:
        self.session.close()

    def auth_headers(self, authorization: str | None) -> dict[str, str]:
        if authorization:
            return {"Authorization": authorization}
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def request(self, method: str, path: str, *, authorization: str | None = None,
                headers: dict[str, str] | None = None, query: str = "", limit: int = MAX_DOCUMENT,
                small: bool = False, data: bytes | None = None) -> Answer:
        """One call, its body read up to ``limit`` bytes (more: a 502-class error). Network failures and
        deadlines become ``ServiceUnavailable`` (503 to the local client). A HEAD, or a ``small`` call, has
        ``head_timeout`` seconds."""
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        hdrs = {**(headers or {}), **self.auth_headers(authorization), "Accept-Encoding": "identity"}
        deadline = self.head_timeout if method == "HEAD" or small else self.read_timeout
        try:
            with self.session.request(method, url, headers=hdrs, data=data, stream=True, allow_redirects=False,
                                      timeout=(CONNECT_TIMEOUT, deadline), verify=self.session.verify,
                                      deadline=deadline) as resp:
                body = b""
                if method != "HEAD":
                    chunks, size = [], 0
                    for chunk in resp.iter_content(64 * 1024):
                        size += len(chunk)
                        if size > limit:
                            raise errors.ServiceUnavailable(
                                f"the registry's answer to {method} {path} is larger than {limit} bytes; refused")
                        chunks.append(chunk)
                    body = b"".join(chunks)
                kept = {h: resp.headers[h] for h in PASSED_HEADERS if h in resp.headers}
                if method == "HEAD" and "Content-Length" in resp.headers:
                    kept["Content-Length"] = resp.headers["Content-Length"]
                return Answer(resp.status_code, kept, body)
        except DeadlineExceeded as exc:
            raise errors.ServiceUnavailable(f"the registry at {self.url} did not answer {method} {path} within "
                                            f"{deadline:g} s") from exc
        except requests.exceptions.RequestException as exc:
            raise errors.ServiceUnavailable(f"cannot reach the registry at {self.url}: {type(exc).__name__}",
                                            "is docket-registry running? check the agent's --host") from exc

    def torrent(self, digest: str, authorization: str | None) -> bytes | None:
        """The blob's .torrent, or None when the registry has none for it (a config, a blob pushed without one)."""
        answer = self.request("GET", f"/api/v1/blobs/{digest}/torrent", authorization=authorization,
                              limit=MAX_TORRENT)
        if answer.status == 404:
            return None
        if not answer.ok:
            raise errors.ServiceUnavailable(f"the registry answered {answer.status} for the torrent of {digest}")
        return answer.body

    def blob_client(self, authorization: str | None) -> RegistryClient:
        """A pull-engine client (HTTP fallback: ``RegistryClient.iter_blob``) carrying the local client's
        credentials (or the agent's token)."""
        client = RegistryClient(self.url, read_timeout=60.0, ca_bundle=self.ca_bundle)
        client.session.headers.update(self.auth_headers(authorization))
        client.has_token = True
        return client
