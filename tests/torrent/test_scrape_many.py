"""``scrape_many`` (docket/torrent/tracker.py) against a real opentracker: several info hashes in one request
(opentracker's multi-scrape, as the registry's /metrics asks), more than one batch, unknown hashes as zeros."""

from __future__ import annotations

import secrets
import urllib.parse

import pytest
import requests

from docket.errors import InvalidRequest
from docket.torrent import Opentracker
from docket.torrent.tracker import MAX_SCRAPE_BATCH, scrape, scrape_many
from tests.support.procs import wait_until


def _announce(tracker: Opentracker, info_hash: str, left: int) -> None:
    """One peer (a seed with ``left=0``), retried until the whitelist's SIGHUP reload took effect."""
    query = urllib.parse.urlencode({"info_hash": bytes.fromhex(info_hash), "peer_id": b"-DT0001-" + secrets.token_hex(6)
                                    .encode(), "port": 6881, "uploaded": 0, "downloaded": 0, "left": left,
                                    "compact": 1}, quote_via=urllib.parse.quote)

    def accepted() -> bool:
        resp = requests.get(f"{tracker.announce_url}?{query}", timeout=5)
        return resp.status_code == 200 and b"failure" not in resp.content

    wait_until(accepted, timeout=5, what=f"the tracker to accept {info_hash}")


def test_scrape_many_reads_every_hash_in_batches(opentracker: Opentracker):
    hashes = [secrets.token_hex(20) for _ in range(MAX_SCRAPE_BATCH + 6)]
    opentracker.set_whitelist(hashes)
    leeching, seeded = hashes[0], hashes[MAX_SCRAPE_BATCH + 2]  # one in each batch
    _announce(opentracker, leeching, left=100)
    _announce(opentracker, seeded, left=0)
    unknown = secrets.token_hex(20)
    counts = scrape_many(opentracker.announce_url, [*hashes, unknown.upper()], timeout=2)
    assert len(counts) == len(hashes) + 1
    assert (counts[leeching].complete, counts[leeching].incomplete) == (0, 1)
    assert (counts[seeded].complete, counts[seeded].incomplete) == (1, 0)
    assert counts[unknown].complete == counts[unknown].incomplete == 0
    assert sum(c.complete + c.incomplete for c in counts.values()) == 2
    assert counts[seeded] == scrape(opentracker.announce_url, seeded)  # the single scrape agrees


def test_scrape_many_refuses_what_is_not_an_info_hash():
    with pytest.raises(InvalidRequest):
        scrape_many("http://127.0.0.1:9/announce", ["not-a-hash"])
