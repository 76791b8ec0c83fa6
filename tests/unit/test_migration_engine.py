"""The migration engine over scripted ports: phases, metrics that add up, rollback, commit.

The fake source writes real CRIU-format page images of a fake memory, so pre-copy's page delta
and the destination's rebuild are the real code; only runc/CRIU and the network are scripted.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fogmig.platform.base.errors import TransferError
from fogmig.platform.base.vocabulary import PAGE_SIZE, Outcome, Phase
from fogmig.platform.migration import cold, hybrid, postcopy, precopy
from fogmig.platform.migration.delta.apply import apply_delta
from fogmig.platform.migration.engine import MigrationContext, TechniqueRun, run_migration
from fogmig.platform.migration.ports import DumpResult, ProgressFn, SentResult
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.runtime.pagemap import Pagemap, entries_from_pages, write_pagemap
from fogmig.policies.conditions import PrecopyStopRules

BASE = 0x7F0000000000
PAGES = 64


class FakeSource:
    """A service whose memory is PAGES random pages; ``dirty`` pages change per checkpoint."""

    def __init__(self, dirty_per_round: int) -> None:
        self.rng = np.random.default_rng(1)
        self.memory = self.rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
        self.dirty = dirty_per_round
        self.running = True
        self.restored_from: Path | None = None
        self.forgotten = False
        self.serving: set[str] = set()

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult:
        # The service ran since the last checkpoint: it dirtied some pages.
        for i in self.rng.choice(PAGES, size=self.dirty, replace=False):
            self.memory[i] = self.rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        image_dir.mkdir(parents=True)
        vaddrs = BASE + np.arange(PAGES, dtype=np.int64) * PAGE_SIZE
        entries = entries_from_pages(vaddrs, np.full(PAGES, 6, dtype=np.int64))
        write_pagemap(image_dir, Pagemap("1", 1, tuple(entries)))
        (image_dir / "pages-1.img").write_bytes(self.memory.tobytes())
        (image_dir / "core-1.img").write_bytes(b"core")
        self.running = leave_running
        return DumpResult(image_dir, 0.01, 0.005, PAGES * PAGE_SIZE)

    async def restore_here(self, image_dir: Path) -> float:
        self.restored_from = image_dir
        self.running = True
        return 0.01

    async def is_running(self) -> bool:
        return self.running

    async def forget(self) -> None:
        self.forgotten = True

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        self.serving.add(migration_id)

    def stop_serving_pages(self, migration_id: str) -> None:
        self.serving.discard(migration_id)


class FakePeer:
    """The destination: stores what is sent, rebuilds deltas with the real code."""

    def __init__(self, root: Path, *, fail_on: str | None = None) -> None:
        self.root = root
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.restored: Path | None = None
        self.aborted = False

    async def call(
        self, op: str, params: Mapping[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        self.calls.append(op)
        if op == self.fail_on:
            raise TransferError(f"link cut during {op}")
        if op == "apply_delta":
            apply_delta(
                self.root / params["base"], self.root / params["delta"], self.root / params["out"]
            )
        elif op == "restore":
            self.restored = self.root / params["images"]
        elif op == "lazy_status":
            return {
                "done": True,
                "ok": True,
                "remote_bytes": 4096 * 3,
                "remote_pages": 3,
                "local_pages": 0,
                "seconds": 0.2,
            }
        elif op == "abort":
            self.aborted = True
        return {}

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult:
        shutil.copytree(local_dir, self.root / subdir)
        size = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file())
        return SentResult(size, 0.1)


def _ctx(tmp_path: Path, technique: str, source: FakeSource, peer: FakePeer) -> MigrationContext:
    record = MigrationRecord(
        migration_id="m1",
        service="s",
        source="a",
        destination="b",
        technique=technique,  # type: ignore[arg-type]
    )
    return MigrationContext(
        record=record,
        source=source,
        peer=peer,
        workdir=tmp_path / "src",
        rules=PrecopyStopRules(max_rounds=3, min_changed_bytes=0),
        fence_timeout_s=0.1,
        service_spec={"service": "s", "args": []},
    )


TECHNIQUES: dict[str, TechniqueRun] = {
    "cold": cold.migrate,
    "precopy": precopy.migrate,
    "postcopy": postcopy.migrate,
    "hybrid": hybrid.migrate,
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
async def test_each_technique_completes_and_its_metrics_add_up(
    tmp_path: Path, technique: str
) -> None:
    source, peer = FakeSource(dirty_per_round=2), FakePeer(tmp_path / "dst")
    ctx = _ctx(tmp_path, technique, source, peer)
    record = await run_migration(ctx, TECHNIQUES[technique])
    assert record.outcome is Outcome.COMPLETED, record.error
    assert ctx.machine.phase is Phase.DONE
    assert source.forgotten
    assert peer.calls[0] == "prepare"
    assert "commit" in peer.calls
    assert record.downtime_s == pytest.approx(
        record.dump_time_s + record.dump_transfer_time_s + record.resume_time_s
    )
    parts = (
        record.pre_dump_time_s
        + record.pre_dump_transfer_time_s
        + record.dump_time_s
        + record.dump_transfer_time_s
        + record.resume_time_s
        + record.faulted_pages_transfer_time_s
    )
    assert record.total_time_s == pytest.approx(parts)
    if technique in ("precopy", "hybrid"):
        assert record.pre_dump_bytes >= PAGES * PAGE_SIZE
        assert sum(r.bytes_sent for r in record.rounds if not r.final) == record.pre_dump_bytes
    else:
        assert record.pre_dump_bytes == 0
    if technique in ("postcopy", "hybrid"):
        assert record.faulted_pages_bytes > 0
        assert "lazy_status" in peer.calls
    else:
        assert record.faulted_pages_bytes == 0


async def test_precopy_ships_only_changed_pages_and_rebuilds_the_final_image(
    tmp_path: Path,
) -> None:
    source, peer = FakeSource(dirty_per_round=3), FakePeer(tmp_path / "dst")
    record = await run_migration(_ctx(tmp_path, "precopy", source, peer), precopy.migrate)
    assert record.outcome is Outcome.COMPLETED
    # The final dump carries the few changed pages, not the state.
    assert record.dump_bytes < 10 * PAGE_SIZE + 16384
    assert peer.restored is not None
    rebuilt = (peer.restored / "pages-1.img").read_bytes()
    assert rebuilt == source.memory.tobytes()


async def test_final_dump_grows_with_the_dirty_rate(tmp_path: Path) -> None:
    low = await run_migration(
        _ctx(tmp_path / "lo", "precopy", FakeSource(1), FakePeer(tmp_path / "lo-d")),
        precopy.migrate,
    )
    high = await run_migration(
        _ctx(tmp_path / "hi", "precopy", FakeSource(30), FakePeer(tmp_path / "hi-d")),
        precopy.migrate,
    )
    assert high.dump_bytes > low.dump_bytes + 20 * PAGE_SIZE


@pytest.mark.parametrize("fail_on", ["prepare", "apply_delta", "restore"])
async def test_failure_before_commit_rolls_back_to_the_source(tmp_path: Path, fail_on: str) -> None:
    source, peer = FakeSource(2), FakePeer(tmp_path / "dst", fail_on=fail_on)
    ctx = _ctx(tmp_path, "precopy", source, peer)
    record = await run_migration(ctx, precopy.migrate)
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.failed_phase is not None
    assert "abort" in peer.calls
    assert source.running
    assert not source.forgotten
    # Frozen before the failure: restored from its own complete image.
    assert (source.restored_from is not None) == (fail_on == "restore")


async def test_lost_commit_leaves_the_service_on_the_source(tmp_path: Path) -> None:
    source, peer = FakeSource(0), FakePeer(tmp_path / "dst", fail_on="commit")
    record = await run_migration(_ctx(tmp_path, "cold", source, peer), cold.migrate)
    # The destination never acknowledged: it fences itself, the source takes its copy back.
    assert record.outcome is Outcome.ROLLED_BACK
    assert source.running
    assert source.restored_from == tmp_path / "src" / "final"


async def test_postcopy_lazy_failure_rolls_back(tmp_path: Path) -> None:
    class LazyFails(FakePeer):
        async def call(
            self, op: str, params: Mapping[str, Any], *, timeout: float | None = None
        ) -> dict[str, Any]:
            if op == "lazy_status":
                self.calls.append(op)
                return {"done": True, "ok": False, "error": "daemon died"}
            return await super().call(op, params, timeout=timeout)

    source, peer = FakeSource(0), LazyFails(tmp_path / "dst")
    record = await run_migration(_ctx(tmp_path, "postcopy", source, peer), postcopy.migrate)
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.failed_phase == "lazy_pages"
    assert source.running
    assert not source.serving
