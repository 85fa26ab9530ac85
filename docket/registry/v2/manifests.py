"""V2 manifest routes: manifests by tag and digest, tags list, catalog, referrers. See docs/v2.md."""

from __future__ import annotations
