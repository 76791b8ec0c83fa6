"""An arrival's release closes what its lazy restore opened, the base round's files included."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from fogmig.platform.migration.arrival import Arrival
from fogmig.platform.migration.lazy.sources import LocalImagePages


class _Pages:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_release_closes_the_hybrid_base_pages(tmp_path: Path) -> None:
    arrival = Arrival(
        migration_id="m1",
        service="s1",
        source="gw1",
        args=[],
        directory=tmp_path / "m1",
        bundle=tmp_path / "bundle",
    )
    pages = _Pages()
    arrival.local_pages = cast(LocalImagePages, pages)
    asyncio.run(arrival.release())
    asyncio.run(arrival.release())  # idempotent
    assert pages.closed == 1
    assert arrival.local_pages is None
