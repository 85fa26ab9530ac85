"""Image references (``repository[:tag]``), validated with Docker's own grammar.

Names from users or the network become database keys and log lines, never paths: blobs are stored by
digest only. Validation still rejects anything Docker itself would not accept, so nothing surprising
(``..``, shell metacharacters, uppercase, over-long names) is ever stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docket.errors import InvalidReference

# Patterns are anchored with \A and \Z (never ^ and $: "$" also matches before a trailing newline, so "v1\n"
# passed as a tag and broke headers later); callers use fullmatch all the same.
# distribution/reference grammar: path components of lowercase alphanumerics joined by separators
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# an optional registry host (with port) as the first component, as Docker allows
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)"
REPOSITORY_RE = re.compile(rf"\A{_HOST}?{_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
DIGEST_RE = re.compile(r"\Asha256:[a-f0-9]{64}\Z")
# what the registry stores: the OCI distribution spec's registered algorithms (the V2 API accepts both)
ANY_DIGEST_RE = re.compile(r"\A(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")
DIGEST_ALGORITHMS = ("sha256", "sha512")
MAX_REPOSITORY = 255
DEFAULT_TAG = "latest"


@dataclass(frozen=True, order=True)
class Reference:
    repository: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}"


def validate_repository(repository: str) -> str:
    if not repository:
        raise InvalidReference("empty repository name", "use a name such as myapp or team/myapp")
    if len(repository) > MAX_REPOSITORY:
        raise InvalidReference(
            f"repository name is {len(repository)} characters long; the limit is {MAX_REPOSITORY}"
        )
    if not REPOSITORY_RE.fullmatch(repository):
        raise InvalidReference(
            f"invalid repository name {repository!r}",
            "use lowercase letters, digits and single separators (. _ -), components joined by /",
        )
    return repository


def validate_tag(tag: str) -> str:
    if not tag:
        raise InvalidReference("empty tag", "leave the tag out for :latest, or give one after the colon")
    if not TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}",
            "a tag is 1-128 of A-Z a-z 0-9 _ . - and does not start with . or -",
        )
    return tag


def parse_reference(text: str) -> Reference:
    """Parse ``repo[:tag]``; a missing tag means ``latest``. Digests are refused with a hint."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("empty image reference", "give an image as repository[:tag]")
    if "@" in text:
        raise InvalidReference(
            f"digest references are not supported here: {text!r}", "refer to the image by repository:tag"
        )
    repository, tag = text, DEFAULT_TAG
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:  # a colon after the last slash separates the tag (not a host:port)
        repository, tag = text[:colon], text[colon + 1 :]
        if DIGEST_RE.fullmatch(text):
            raise InvalidReference(f"{text!r} is a digest, not an image reference")
    return Reference(validate_repository(repository), validate_tag(tag))
