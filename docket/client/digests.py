"""Blob digests as the client checks them: the accepted forms, the size limit, hashing a file in chunks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from docket import errors
from docket.reference import ANY_DIGEST_RE, DIGEST_ALGORITHMS

# Layer digests: sha256 (docker save, our pushes) or sha512; file names use the hex of whichever it is.
BLOB_DIGEST_RE = ANY_DIGEST_RE
READ_CHUNK = 1024 * 1024
MAX_BLOB_SIZE = 1 << 50  # 1 PiB: a size beyond it is not an image or a layer, whatever a registry says


def digest_algorithm(digest: str) -> str:
    """``"sha512"`` for ``"sha512:<hex>"``; refuses algorithms we cannot verify."""
    algo = digest.split(":", 1)[0]
    if algo not in DIGEST_ALGORITHMS or not BLOB_DIGEST_RE.match(digest):
        raise errors.IntegrityError(f"unsupported or malformed digest {digest!r}",
                                    "digests must be sha256:<64 hex> or sha512:<128 hex>")
    return algo


def digest_file(path: Path, algorithm: str = "sha256", progress: Callable[[int], None] | None = None) -> str:
    """``"<algorithm>:<hex>"`` of the file, read in chunks (never whole in memory)."""
    h = hashlib.new(algorithm)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
    return f"{algorithm}:{h.hexdigest()}"


def empty_digest(algorithm: str) -> str:
    """The digest of no bytes (an empty layer's)."""
    return f"{algorithm}:{hashlib.new(algorithm).hexdigest()}"
