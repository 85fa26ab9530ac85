"""50 concurrent `images` requests while 4 pushes run: no errors, every push lands (figures: benchmarks/load.py)."""

from __future__ import annotations

import sys
from pathlib import Path


from tests.support.tools import need

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import load  # noqa: E402



def test_listings_keep_answering_during_pushes(tmp_path: Path):
    need("ctorrent")
    need("opentracker")
    result = load.run(readers=50, requests_each=4, pushes=4, push_mib=8, workdir=tmp_path)
    print(result)
    assert result["errors"] == [], (tmp_path / "registry.log").read_text()[-5000:]
    assert result["requests"] == 200
    assert result["images_after"] == 4
