"""Limits shared by the registry's two APIs and the client, so one number holds everywhere.

A limit that lives in one face only drifts: ``/api/v1`` capped an image at 1,000 layers while ``/v2`` took 20,000
descriptors in one request (7 s of work). Every path that accepts or pulls an image imports these.
"""

from __future__ import annotations

# descriptors in one manifest: layers of an image (docker itself stops at 127), or the manifests of an index
MAX_LAYERS = 1000
# JSON from the network (docket/jsonstrict.py): nesting deeper than this is refused before parsing; real manifests
# and image configs nest about 5 deep
MAX_JSON_DEPTH = 64
# integers in JSON documents: what a Go int64 (distribution, docker) and SQLite can hold
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
