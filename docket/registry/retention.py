"""Tag retention: keep the newest N tags of each repository, and every tag matching a keep pattern.

Rules (README "Retention"):

- per repository, tags are ordered newest first by push time (``Image.pushed_at``: when the tag last moved);
  equal push times are ordered by tag name, the one that sorts last counting as newer (deterministic);
- a tag matching any keep pattern is never removed and does not count toward N: N is the newest N of the
  other tags. Patterns are shell globs matched case-sensitively against the whole tag (``fnmatchcase``: ``*``,
  ``?``, ``[...]``, ``[!...]``), e.g. ``v1*``, ``release-*``, ``latest``;
- tags of every origin go (docket pushes, whole tarballs, ``docker push`` over /v2, indexes and artifacts).
  A removed tag's manifest goes too once no other tag or index of the repository uses it, whoever pushed it, and
  with an index the children only it kept; the blobs nothing uses any more are then GC's, after the grace.

``apply`` removes one tag at a time through ``Manifests.delete_tag`` under the tag lock, and only when the tag
still points where the plan saw it (same manifest, same push time): a push racing the policy is never undone.
The timer (``--retention-interval``) first runs one interval after start, never at start: a restart with a new
or mistyped policy leaves time for a dry run (``POST /api/v1/admin/retention``) before anything goes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import select

from docket.errors import InvalidRequest, NotFound
from docket.registry.db import Database
from docket.registry.manifests import Manifests
from docket.registry.models import Image
from docket.registry.periodic import Periodic

log = logging.getLogger(__name__)

MAX_PATTERNS = 64
# a tag's characters (docket/reference.py) plus the glob's own
_PATTERN_RE = re.compile(r"\A[A-Za-z0-9_.\-*?\[\]!]{1,128}\Z")


def check_pattern(pattern: object) -> str:
    """A keep pattern, or InvalidRequest saying what a pattern may be."""
    if not isinstance(pattern, str) or not _PATTERN_RE.fullmatch(pattern):
        raise InvalidRequest(f"invalid keep pattern {pattern!r}",
                             "a keep pattern is a shell glob over tag characters (letters, digits, _ . -) "
                             "with * ? [...] [!...], 1 to 128 characters, e.g. 'v1*' or 'release-*'")
    return pattern


def check_keep_tags(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"keep_tags must be a whole number of at least 1, not {value!r}",
                             "keep_tags is how many of the newest tags of each repository are kept")
    return value


@dataclass(frozen=True)
class RetentionPolicy:
    """``keep_tags`` None: no policy (nothing is ever removed by the timer)."""

    keep_tags: int | None = None
    keep_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.keep_tags is not None:
            check_keep_tags(self.keep_tags)
        if len(self.keep_patterns) > MAX_PATTERNS:
            raise InvalidRequest(f"{len(self.keep_patterns)} keep patterns; the limit is {MAX_PATTERNS}")
        for pattern in self.keep_patterns:
            check_pattern(pattern)

    def protects(self, tag: str) -> bool:
        return any(fnmatchcase(tag, pattern) for pattern in self.keep_patterns)

    def describe(self) -> dict[str, Any]:
        return {"keep_tags": self.keep_tags, "keep_patterns": list(self.keep_patterns)}


@dataclass(frozen=True)
class Candidate:
    """A tag as the plan saw it."""

    repository: str
    tag: str
    digest: str | None  # the manifest it points at (None: a whole-tarball tag of an old docket)
    pushed_at: datetime

    def describe(self) -> dict[str, Any]:
        return {"repository": self.repository, "tag": self.tag, "digest": self.digest,
                "pushed_at": self.pushed_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}


@dataclass(frozen=True)
class Plan:
    policy: RetentionPolicy
    remove: tuple[Candidate, ...]
    kept: int


@dataclass
class RetentionStats:
    """Read by the metrics: ``runs`` counts applied passes (timer or admin, not dry runs), ``tags_removed`` the
    tags they removed, ``last_run`` the wall-clock time the last applied pass ended."""

    runs: int = 0
    tags_removed: int = 0
    last_run: float | None = None


def order_newest_first(images: list[Candidate]) -> list[Candidate]:
    return sorted(images, key=lambda c: (c.pushed_at, c.tag), reverse=True)


def choose(policy: RetentionPolicy, tags: list[Candidate]) -> tuple[list[Candidate], int]:
    """The pure rule over one repository's tags: (what goes, newest first; how many stay)."""
    assert policy.keep_tags is not None
    unprotected = [c for c in order_newest_first(tags) if not policy.protects(c.tag)]
    remove = unprotected[policy.keep_tags:]
    return remove, len(tags) - len(remove)


class Retention:
    """The registry's policy, run by its timer and by POST /api/v1/admin/retention; one pass at a time."""

    def __init__(self, db: Database, manifests: Manifests, policy: RetentionPolicy, *,
                 interval: float = 3600.0, leader: Callable[[], bool] | None = None) -> None:
        """``leader``: the timer's passes run only while it answers True (one instance applies the policy)."""
        self.db = db
        self.manifests = manifests
        self.policy = policy
        self.stats = RetentionStats()
        self._lock = threading.Lock()  # one pass at a time (timer and admin requests)
        active = interval if policy.keep_tags is not None else 0  # no policy: no timer
        self._worker = Periodic("retention", active, self.run_once, when=leader)

    @property
    def enabled(self) -> bool:
        return self._worker.interval > 0

    def start(self) -> None:
        if self.enabled:
            log.info("retention: keep the newest %d tag(s) per repository%s, every %g s (first run in %g s)",
                     self.policy.keep_tags,
                     f" and tags matching {', '.join(self.policy.keep_patterns)}" if self.policy.keep_patterns
                     else "", self._worker.interval, self._worker.interval)
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def run_once(self) -> Plan:
        return self.apply(dry_run=False)

    def plan(self, policy: RetentionPolicy | None = None) -> Plan:
        """What ``policy`` (default: the registry's) would remove now, repository by repository."""
        policy = policy or self.policy
        if policy.keep_tags is None:
            raise InvalidRequest("no retention policy: the registry runs without --keep-tags",
                                 "give keep_tags for a one-off run, or start the registry with --keep-tags N")
        by_repository: dict[str, list[Candidate]] = {}
        with self.db.session() as s:
            rows = s.execute(select(Image.repository, Image.tag, Image.manifest_digest, Image.pushed_at)
                             .order_by(Image.repository))
            for repository, tag, digest, pushed_at in rows:
                by_repository.setdefault(repository, []).append(Candidate(repository, tag, digest, pushed_at))
        remove: list[Candidate] = []
        kept = 0
        for repository in sorted(by_repository):
            going, staying = choose(policy, by_repository[repository])
            remove += going
            kept += staying
        return Plan(policy, tuple(remove), kept)

    def apply(self, dry_run: bool, policy: RetentionPolicy | None = None) -> Plan:
        """Plan, then (unless ``dry_run``) remove each tag still as planned; the answer lists what went."""
        with self._lock:
            plan = self.plan(policy)
            if dry_run:
                log.info("retention dry run (%s): %d tag(s) would go, %d kept",
                         _policy_text(plan.policy), len(plan.remove), plan.kept)
                return plan
            return self._execute(plan)

    def execute(self, plan: Plan) -> Plan:
        """Remove what ``plan`` lists, each tag only if it still is as the plan saw it."""
        with self._lock:
            return self._execute(plan)

    def _execute(self, plan: Plan) -> Plan:
        removed = [c for c in plan.remove if self._remove(c)]
        self.stats.runs += 1
        self.stats.tags_removed += len(removed)
        self.stats.last_run = time.time()
        log.info("retention (%s): removed %d tag(s), %d kept, %d pushed again or deleted meanwhile",
                 _policy_text(plan.policy), len(removed), plan.kept, len(plan.remove) - len(removed))
        return Plan(plan.policy, tuple(removed), plan.kept + len(plan.remove) - len(removed))

    def _remove(self, c: Candidate) -> bool:
        try:
            done = self.manifests.delete_tag(c.repository, c.tag, expect=(c.digest, c.pushed_at), prune=True)
        except NotFound:
            done = False  # deleted meanwhile
        if done:
            log.info("retention: removed %s:%s (digest %s, pushed %s)", c.repository, c.tag, c.digest,
                     c.pushed_at.isoformat())
        else:
            log.info("retention: kept %s:%s: pushed again or deleted since the plan", c.repository, c.tag)
        return done


def _policy_text(policy: RetentionPolicy) -> str:
    patterns = f", keep {' '.join(policy.keep_patterns)}" if policy.keep_patterns else ""
    return f"newest {policy.keep_tags}{patterns}"

