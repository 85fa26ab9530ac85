"""V2 blob routes: GET/HEAD/DELETE blobs, uploads (monolithic, chunked, cross-repository mount). See docs/v2.md."""

from __future__ import annotations
