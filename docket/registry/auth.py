"""Bearer-token access control: push tokens for writes, optional read tokens for reads.

Tokens are compared with ``hmac.compare_digest`` against every configured token (no early exit), so the time
taken does not tell which token, or how much of one, matched. Tokens never appear in logs or error bodies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from flask import Response, jsonify, request

from docket.errors import DocketError, Forbidden, InvalidRequest, Unauthorized
from docket.registry.edges import api_error, is_v2

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/v2/token"})  # /v2/token checks credentials itself
WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})
CHALLENGE = 'Bearer realm="docket"'
# /v2 clients (docker, skopeo, oras) follow the token-auth flow: on a 401 they GET the realm (with the user name
# and password of `docker login`, whose password is the token, or anonymously) and send back the token it gives
V2_SERVICE = "docket-registry"
ANONYMOUS = "anonymous"  # the token an anonymous client gets where reads are open: it allows reads only
CLIENT_HINT = ("give the docket client a token with DOCKET_TOKEN (or DOCKET_TOKEN_FILE, or --token); "
               "it is sent as `Authorization: Bearer <token>`")


TORRENT_SECRET_NAME = "torrent-secret"


def torrent_secret(location: Path) -> bytes:
    """The registry's random torrent secret, made on first use (``<location>/torrent-secret``, mode 0600).

    Registries with read tokens put ``torrent_source(secret, digest)`` into every torrent's info dict, so an info
    hash cannot be computed from a layer's content: only token holders, who are given the torrents, learn it.
    Deleting the file and restarting gives every torrent a new info hash (the old ones stop working)."""
    path = Path(location) / TORRENT_SECRET_NAME
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return bytes.fromhex(text)
        log.warning("%s is malformed; making a new torrent secret (every info hash changes)", path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                             "check its permissions, or delete it to make a new one") from exc
    secret = secrets.token_bytes(32)
    tmp = path.with_name(f".{TORRENT_SECRET_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("made a new torrent secret in %s", path)
    return secret


def torrent_source(secret: bytes, digest: str) -> str:
    """The info dict ``source`` of the blob ``digest``: a per-blob HMAC, so knowing one torrent (a token holder
    does) tells nothing about the info hash of any other."""
    return "docket-" + hmac.new(secret, digest.encode("ascii"), hashlib.sha256).hexdigest()[:40]


def read_token_file(path: str | Path) -> list[str]:
    """One token a line; blank lines and ``#`` comments ignored. Unreadable or empty files are errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}",
                             "check the path and its permissions") from exc
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise InvalidRequest(f"token file {path} holds no token", "put one token per line (# starts a comment)")
    return tokens


def clean_tokens(tokens: Iterable[str], what: str) -> tuple[str, ...]:
    """Validate tokens (printable ASCII, no spaces: they travel in an HTTP header); keep order, drop repeats."""
    out: list[str] = []
    for i, tok in enumerate(tokens, 1):
        tok = tok.strip()
        if not tok:
            raise InvalidRequest(f"{what} #{i} is empty", "remove empty entries")
        if not all(33 <= ord(ch) < 127 for ch in tok):
            raise InvalidRequest(f"{what} #{i} contains spaces or non-ASCII characters",
                                 "use printable ASCII without spaces, e.g. the output of `openssl rand -hex 32`")
        if tok not in out:
            out.append(tok)
    return tuple(out)


def _matches(given: bytes, tokens: tuple[bytes, ...]) -> bool:
    ok = False
    for tok in tokens:  # every token is compared, whatever the outcome of the others
        ok |= hmac.compare_digest(given, tok)
    return ok


class TokenAuth:
    """Decides, per request, whether the bearer token allows it. Install with ``init_app``."""

    def __init__(self, push_tokens: Iterable[str], read_tokens: Iterable[str]) -> None:
        self._push = tuple(t.encode() for t in push_tokens)
        self._read = tuple(t.encode() for t in read_tokens)
        self._own_check: set[str] = set()  # endpoints whose views check tokens themselves (``delegate``)

    def delegate(self, *endpoints: str) -> None:
        """Leave these endpoints' token checks to their views (the web page's Basic prompt, heartbeats that a
        read token may send): they call ``may_read`` or ``decide`` themselves."""
        self._own_check.update(endpoints)

    @property
    def enabled(self) -> bool:
        return bool(self._push or self._read)

    def may_read(self) -> bool:
        """Whether the current request may see what reads show (for open paths such as /healthz): always where
        reads are open, else only with a valid read or push token."""
        if not self._read:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        raw = _token_from(scheme, value.strip())
        if raw is None:
            return False
        return _matches(raw, self._push) | _matches(raw, self._read)  # both compared, whatever the first says

    def may_push(self) -> bool:
        """Whether the current request carries push rights: always where no tokens are set, else only with a push
        token (GC: only a client that may push can be about to reference a blob it checked with HEAD)."""
        if not self.enabled:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        raw = _token_from(scheme, value.strip())
        return raw is not None and _matches(raw, self._push)

    def init_app(self, app) -> None:  # noqa: ANN001 - Flask
        app.extensions["docket_auth"] = self
        if self.enabled:
            app.before_request(self.check)

    def issue(self) -> tuple[Response, int, dict[str, str]] | Response:
        """``GET /v2/token``: the token endpoint of docker's token-auth flow. Credentials (Basic with the token
        as password, or Bearer) are checked and the same token handed back; anonymous callers get a read-only
        placeholder where reads are open, else 401."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            raw = _token_from(scheme, value.strip())
            if raw is None or not (_matches(raw, self._push) or _matches(raw, self._read)):
                log.warning("refused a token request from %s: invalid credentials", request.remote_addr)
                return self._deny(Unauthorized("invalid credentials: the password must be one of the registry's "
                                               "tokens", "docker login -u <any name> -p <token>"))
            token = raw.decode("ascii")
        elif self._read:
            return self._deny(Unauthorized("this registry requires a token to read",
                                           "docker login -u <any name> -p <token>"))
        else:
            token = ANONYMOUS
        return jsonify({"token": token, "access_token": token, "expires_in": 3600})

    def check(self) -> tuple[Response, int, dict[str, str]] | None:
        if request.path in OPEN_PATHS or request.method == "OPTIONS" or request.endpoint in self._own_check:
            return None
        return self.decide(write=request.method in WRITE_METHODS)

    def decide(self, *, write: bool) -> tuple[Response, int, dict[str, str]] | None:
        """None when the current request's token allows a read (``write`` False) or a write; else the 401/403."""
        # the V2 version check is the one read that always wants credentials when tokens exist: docker (and the
        # spec's clients) send credentials only to registries whose /v2/ answered 401 with a challenge
        version_check = request.path in ("/v2", "/v2/")
        header = request.headers.get("Authorization", "")
        if not write and not self._read and not version_check:
            return None  # reads are open unless read tokens are configured
        scheme, _, value = header.partition(" ")
        given = value.strip()
        if not header:
            what = "push or delete" if write else "read" if not version_check else "log in"
            return self._deny(Unauthorized(f"missing credentials: this registry requires a token to {what}",
                                           CLIENT_HINT))
        raw = _token_from(scheme, given)
        if raw is None:
            return self._deny(Unauthorized("invalid Authorization header: expected `Bearer <token>` or Basic "
                                           "with the token as password", CLIENT_HINT))
        if _matches(raw, self._push):
            return None
        if _matches(raw, self._read):
            if not write:
                return None
            return self._deny(Forbidden("this token may only read; pushing and deleting need a push token",
                                        "use a token from the registry's --auth-token list in DOCKET_TOKEN"))
        log.warning("refused %s %s from %s: invalid token", request.method, request.path, request.remote_addr)
        return self._deny(Unauthorized("invalid token: the registry does not accept the bearer token given",
                                       "check DOCKET_TOKEN (or DOCKET_TOKEN_FILE / --token) against the "
                                       "registry's configured tokens"))

    @staticmethod
    def _deny(exc: DocketError) -> tuple[Response, int, dict[str, str]]:
        body, _ = api_error(request.path, exc)
        if is_v2(request.path):
            challenge = f'Bearer realm="{request.host_url}v2/token",service="{V2_SERVICE}"'
        else:
            challenge = CHALLENGE
        headers = {"WWW-Authenticate": challenge}
        if exc.status == 403:
            headers = {"WWW-Authenticate": f'{challenge}, error="insufficient_scope"'}
        if is_v2(request.path):
            headers["Docker-Distribution-API-Version"] = "registry/2.0"
        return jsonify(body), exc.status, headers


def _token_from(scheme: str, value: str) -> bytes | None:
    """The token in an Authorization header: ``Bearer <token>``, or ``Basic`` with the token as the password
    (the user name is ignored: tokens carry no identity). None when the header is malformed."""
    if not value:
        return None
    if scheme.lower() == "bearer":
        token = value
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8")
        except (UnicodeError, binascii.Error, ValueError):
            return None
        user, sep, token = decoded.partition(":")
        if not sep or not token:
            return None
    else:
        return None
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        return b""
