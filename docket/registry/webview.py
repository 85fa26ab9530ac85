"""What the web page shows, read from the database: repositories (a page of them), their tags and layers, which
layers other images share, and human units for sizes and times. Pure reads; the blueprint is ``web.py``.

Large registries: the front page lists ``PAGE_SIZE`` repositories at a time (``?page=N``, ``?q=`` filters names
by substring) with at most ``TAGS_SHOWN`` tags each, newest push first; ``/repositories/<name>`` lists every tag
of one repository (at most ``MAX_TAGS``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket.registry.models import FORMAT_LAYERS, Image, ImageLayer
from docket.registry.queries import image_query, repositories
from docket.units import human_bytes

PAGE_SIZE = 20
TAGS_SHOWN = 10
MAX_TAGS = 500
MAX_SHARED_LISTED = 5


human_size = human_bytes  # the page shows sizes as the CLI does


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """"3 minutes ago"; a time in the future (a clock ahead) as the date itself."""
    if when is None:
        return "unknown"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    secs = ((now or datetime.now(UTC)) - when).total_seconds()
    if secs < -60:
        return when.strftime("%Y-%m-%d %H:%M UTC")
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60), ("second", 1)):
        if secs >= size:
            n = int(secs // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def short_digest(digest: str | None, n: int = 12) -> str:
    if not digest:
        return ""
    algorithm, sep, rest = digest.partition(":")
    return f"{algorithm}:{rest[:n]}" if sep else digest[:n]


@dataclass
class LayerView:
    digest: str
    size: int
    info_hash: str | None
    shared_with: list[str] = field(default_factory=list)  # refs of the other images using it (a few)
    shared_count: int = 0  # how many other images use it


@dataclass
class TagView:
    repository: str
    tag: str
    digest: str | None
    size: int
    created: datetime | None
    pushed_at: datetime
    format: str
    layers: list[LayerView]

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass
class RepoView:
    name: str
    tags: list[TagView]
    tag_count: int


@dataclass
class Listing:
    repos: list[RepoView]
    total: int  # repositories matching the filter
    page: int
    pages: int


def _tag_view(image: Image) -> TagView:
    if image.format == FORMAT_LAYERS:
        layers = [LayerView(layer.blob.digest, layer.blob.size, layer.blob.info_hash) for layer in image.layers]
    elif image.blob is not None:  # a whole tarball, one seeded blob
        layers = [LayerView(image.blob.digest, image.blob.size, image.blob.info_hash)]
    else:  # index, artifact: nothing docket seeds
        layers = []
    digest = image.manifest_digest or image.blob_digest
    return TagView(image.repository, image.tag, digest, image.size, image.created, image.pushed_at, image.format,
                   layers)


def _mark_shared(s: Session, tags: list[TagView]) -> None:
    """Each layer's other users, over the whole registry (not only this page)."""
    digests = {layer.digest for tag in tags for layer in tag.layers}
    if not digests:
        return
    users: dict[str, set[str]] = defaultdict(set)
    rows = s.execute(select(ImageLayer.blob_digest, Image.repository, Image.tag)
                     .join(Image, Image.id == ImageLayer.image_id).where(ImageLayer.blob_digest.in_(digests)))
    for digest, repository, tag in rows:
        users[digest].add(f"{repository}:{tag}")
    for tag in tags:
        for layer in tag.layers:
            others = sorted(users.get(layer.digest, set()) - {tag.ref})
            layer.shared_count = len(others)
            layer.shared_with = others[:MAX_SHARED_LISTED]


def _tags(s: Session, names: list[str], limit: int) -> dict[str, tuple[list[TagView], int]]:
    found: dict[str, list[Image]] = defaultdict(list)
    for image in s.scalars(image_query().where(Image.repository.in_(names))
                           .order_by(Image.repository, Image.pushed_at.desc(), Image.tag)):
        found[image.repository].append(image)
    return {name: ([_tag_view(i) for i in found[name][:limit]], len(found[name])) for name in names}


def listing(s: Session, query: str = "", page: int = 1) -> Listing:
    names = [n for n in repositories(s) if query.lower() in n.lower()]
    pages = max(1, -(-len(names) // PAGE_SIZE))
    page = min(max(1, page), pages)
    shown = names[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    tags = _tags(s, shown, TAGS_SHOWN)
    repos = [RepoView(n, *tags[n]) for n in shown]
    _mark_shared(s, [t for r in repos for t in r.tags])
    return Listing(repos, len(names), page, pages)


def repository(s: Session, name: str) -> RepoView | None:
    tags, count = _tags(s, [name], MAX_TAGS)[name]
    if not count and name not in repositories(s):
        return None
    _mark_shared(s, tags)
    return RepoView(name, tags, count)
