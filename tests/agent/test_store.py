"""The agent's cache (docket/agent/store.py) on a real directory: which blobs are served (verified records), which
are evicted and in what order, and the manifests it keeps. No processes: the e2e side is tests/e2e/test_agent.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from docket.agent.store import VERIFIED, AgentStore

KIB = 1024


def _record(store: AgentStore, digest: str) -> Path:
    return store.workdir(digest) / VERIFIED


def _age(store: AgentStore, digest: str, seconds_ago: float) -> None:
    """Set the blob's last use (its record's mtime) to ``seconds_ago``."""
    t = os.stat(_record(store, digest)).st_mtime - seconds_ago
    os.utime(_record(store, digest), (t, t))


# -- verified records ------------------------------------------------------------------------------------------

def test_a_marked_blob_is_held_by_its_record_alone(store, put_blob):
    digest = put_blob(b"layer" * 1000)
    record = json.loads(_record(store, digest).read_text())
    st = store.blob_path(digest).stat()
    assert record == {"digest": digest, "size": 5000, "mtime_ns": st.st_mtime_ns}
    held = store.verified(digest, 5000, check=False)
    assert held is not None and held.size == 5000 and held.blob == store.blob_path(digest)
    assert held.torrent == store.workdir(digest) / f"{digest[7:]}.torrent"
    assert store.verified(digest, 4999) is None  # the registry says another size: not this blob


def test_a_blob_changed_behind_the_records_back_is_hashed_again_and_refused(store, put_blob):
    data = b"a" * 10_000
    digest = put_blob(data)
    blob = store.blob_path(digest)
    blob.write_bytes(b"b" * 10_000)  # same size, other bytes, a new mtime
    st = blob.stat()
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # whatever the clock's resolution
    assert store.verified(digest, check=False) is None  # the record no longer matches the file
    assert store.verified(digest) is None  # hashed: wrong bytes
    assert store.held() == []
    blob.write_bytes(data)  # the right bytes again: hashed, marked, held
    assert store.verified(digest) is not None
    assert store.verified(digest, check=False) is not None
    assert json.loads(_record(store, digest).read_text())["mtime_ns"] == blob.stat().st_mtime_ns


def test_a_pulls_blob_without_a_record_is_hashed_once_then_marked(store, put_blob):
    digest = put_blob(b"pulled" * 2000, mark=False)  # what `docket pull` of the same location leaves
    assert not _record(store, digest).exists()
    assert store.verified(digest, check=False) is None  # start-up and eviction never hash
    assert [h.digest for h in store.held()] == []
    held = store.verified(digest, 12_000)
    assert held is not None and _record(store, digest).exists()
    assert [h.digest for h in store.held()] == [digest]


def test_a_blob_whose_bytes_do_not_hash_to_its_name_is_never_served(store):
    wrong = b"not what the name says"
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    store.blob_path(digest).write_bytes(wrong)
    store.workdir(digest)
    assert store.verified(digest) is None
    assert store.verified(digest, len(wrong)) is None
    assert not _record(store, digest).exists()  # nothing was marked
    assert store.held() == []


def test_a_half_downloaded_blob_without_a_workdir_or_record_is_not_held(store):
    digest = "sha256:" + hashlib.sha256(b"whole").hexdigest()
    store.blob_path(digest).write_bytes(b"who")  # killed half-way: no record
    assert store.verified(digest) is None and store.held() == []


def test_held_lists_every_verified_blob_and_nothing_else(store, put_blob):
    a = put_blob(b"a" * 3000)
    b = put_blob(b"b" * 4000)
    put_blob(b"c" * 5000, mark=False)  # not verified yet
    (store.blobs / "not-a-digest").write_bytes(b"x")
    (store.blobs / ".tmp-partial").write_bytes(b"x")
    (store.blobs / ("d" * 64)).mkdir()  # a directory by a digest's name
    sha512 = "sha512:" + hashlib.sha512(b"e" * 100).hexdigest()
    store.blob_path(sha512).write_bytes(b"e" * 100)
    store.mark_verified(sha512)
    held = {h.digest: h.size for h in store.held()}
    assert held == {a: 3000, b: 4000, sha512: 100}


# -- eviction ----------------------------------------------------------------------------------------------------

def _three(store: AgentStore, put_blob) -> list[str]:
    """Three 100 KiB blobs used 30, 20 and 10 s ago (oldest first)."""
    digests = [put_blob(bytes([i]) * (100 * KIB)) for i in range(3)]
    for digest, ago in zip(digests, (30, 20, 10)):
        _age(store, digest, ago)
    return digests


def test_evict_removes_the_least_recently_used_until_under_the_limit(store, put_blob):
    digests = _three(store, put_blob)
    store.max_bytes = 250 * KIB
    dropped: list[list[str]] = []
    evicted = store.evict(dropped.append)
    assert evicted == [digests[0]] and dropped == [[digests[0]]]
    assert store.usage() <= store.max_bytes
    assert not store.blob_path(digests[0]).exists()
    assert {h.digest for h in store.held()} == set(digests[1:])
    assert store.evict(dropped.append) == []  # under the limit: nothing more


def test_touch_makes_a_blob_the_most_recently_used(store, put_blob):
    digests = _three(store, put_blob)
    store.touch(digests[0])  # a client read the oldest just now
    store.max_bytes = 150 * KIB
    assert store.evict(lambda d: None) == [digests[1], digests[2]]
    assert [h.digest for h in store.held()] == [digests[0]]


def test_evict_with_need_leaves_room_for_the_download_to_come(store, put_blob):
    digests = _three(store, put_blob)
    store.max_bytes = 300 * KIB
    assert store.evict(lambda d: None) == []  # exactly at the limit
    assert store.evict(lambda d: None, need=150 * KIB) == digests[:2]
    assert store.usage() <= 150 * KIB


def test_evict_skips_blobs_read_downloaded_or_locked_by_a_pull(store, put_blob):
    digests = _three(store, put_blob)
    store.max_bytes = 100 * KIB
    release = store.reading(digests[0])  # a local client reads the oldest
    lock_fd = os.open(store.workdir(digests[2]) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # a `docket pull` holds the newest (its own open file description)
    try:
        with store.busy(digests[1]):  # being downloaded
            assert store.evict(lambda d: None) == []
            assert store.in_use(digests[1])
        assert store.evict(lambda d: None) == [digests[1]]  # the download ended
        assert store.usage() > store.max_bytes  # still over: the others are in use, they stay
        release()
        release()  # a second call is harmless (the response's close and an error path may both call it)
        assert not store.in_use(digests[0])
        assert store.evict(lambda d: None) == [digests[0]]
        assert store.blob_path(digests[2]).exists()
    finally:
        os.close(lock_fd)
    assert store.evict(lambda d: None) == []  # at the limit with the newest alone
    store.max_bytes = 0
    assert store.evict(lambda d: None) == [digests[2]]


def test_evict_stops_seeding_before_deleting_and_keeps_the_lock_file(store, put_blob):
    digests = _three(store, put_blob)
    work = store.workdir(digests[0])
    (work / f"{digests[0][7:]}.torrent").write_bytes(b"d4:infode")
    (work / "ctorrent.log").write_text("log")
    (work / "state").mkdir()
    (work / "state" / "pieces").write_bytes(b"x")
    (work / "lock").touch()
    seen: list[bool] = []

    def drop(ds: list[str]) -> None:
        seen.append(all(store.blob_path(d).exists() for d in ds))  # the file is still there when seeding stops

    store.max_bytes = 200 * KIB
    assert store.evict(drop) == [digests[0]]
    assert seen == [True]
    assert sorted(os.listdir(work)) == ["lock"]  # a pull waiting on the lock must find the same file
    assert store.verified(digests[0]) is None


def test_evict_leaves_blobs_that_are_not_verified_alone(store, put_blob):
    """A half-done download (no record) counts in the usage but is not the agent's to delete: it resumes."""
    partial = put_blob(b"p" * (100 * KIB), mark=False)
    digests = _three(store, put_blob)
    store.max_bytes = 0
    assert sorted(store.evict(lambda d: None)) == sorted(digests)
    assert store.blob_path(partial).exists()


# -- manifests ---------------------------------------------------------------------------------------------------

def test_manifests_are_kept_by_digest_with_their_media_type(store):
    body = b'{"schemaVersion":2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert store.manifest(digest) is None
    store.keep_manifest(digest, body, "application/vnd.oci.image.manifest.v1+json")
    assert store.manifest(digest) == (body, "application/vnd.oci.image.manifest.v1+json")
    assert (store.manifests / "sha256" / digest[7:]).read_bytes() == body
    big = "sha512:" + hashlib.sha512(body).hexdigest()
    store.keep_manifest(big, body, "application/vnd.oci.image.index.v1+json")
    assert store.manifest(big) == (body, "application/vnd.oci.image.index.v1+json")


def test_names_that_are_not_digests_never_become_paths(store):
    for bad in ("sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32, "../x"):
        with pytest.raises(ValueError):
            store.blob_path(bad)
        with pytest.raises(ValueError):
            store.manifest(bad)
    store.touch("sha256:../../x")  # no exception: a touch of nothing is nothing


def test_two_evictions_at_once_do_not_evict_more_than_needed(store, put_blob):
    """The fetcher evicts before each download and the agent after each one, from different threads: two passes
    that overlap must together free what one would, not count the same blob twice and go on to the next."""
    digests = _three(store, put_blob)
    store.max_bytes = 250 * KIB
    evicted: list[list[str]] = []
    start = threading.Barrier(2)

    def slow_drop(ds: list[str]) -> None:
        time.sleep(0.2)  # stopping a seeder takes a moment: the other pass catches up meanwhile

    def one() -> None:
        start.wait()
        evicted.append(store.evict(slow_drop))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(sum(evicted, [])) == [digests[0]], evicted  # once, and only the oldest
    assert {h.digest for h in store.held()} == set(digests[1:])
