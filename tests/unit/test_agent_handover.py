"""The agent's hand-over plumbing: hook calls, timers, the journal's epochs, leftovers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from fogmig.platform.agent import handover
from fogmig.platform.agent.handover import HookCalls, handover_timing
from fogmig.platform.agent.hooks import NoHooks
from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.source import leftovers, unfinished


class Recording(NoHooks):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def running_here(self, service: str, migration_id: str) -> None:
        await asyncio.sleep(0.05)  # slower than the next one: order must still hold
        self.calls.append(f"running_here {service}")

    async def gave_up(self, service: str, migration_id: str) -> None:
        self.calls.append(f"gave_up {service}")

    async def freezing(self, service: str, destination: str, migration_id: str) -> None:
        raise RuntimeError("a broken hook")

    async def resumed_here(self, service: str, migration_id: str) -> None:
        await asyncio.sleep(60)


async def test_hooks_run_in_order_and_never_fail_the_migration(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = Recording()
    calls = HookCalls(hooks)
    await calls.running_here("s", "m1")
    await calls.gave_up("s", "m1")
    await calls.call("s", "flush", _noop)  # queued behind both
    assert hooks.calls == ["running_here s", "gave_up s"]
    with caplog.at_level(logging.ERROR):
        await calls.freezing("s", "gw2", "m1")()  # raises inside: logged, not raised
        monkeypatch.setattr(handover, "HOOK_TIMEOUT_S", 0.05)
        await calls.resumed_here("s", "m1")()  # hangs: left behind after the bound
    assert "freezing of s failed" in caplog.text
    assert "resumed_here of s took over" in caplog.text


async def _noop() -> None:
    return None


@pytest.mark.parametrize("fence_timeout_s", [1.0, 2.0, 20.0, 3600.0])
def test_the_timers_fit_every_fence_timeout(fence_timeout_s: float) -> None:
    timing = handover_timing(fence_timeout_s)
    assert timing.fence_timeout_s == fence_timeout_s
    assert timing.call_timeout_s <= 10.0
    assert timing.lazy_poll_s + timing.call_timeout_s < fence_timeout_s


def _begin(mid: str, service: str, epoch: int) -> j.Begin:
    return j.Begin(
        migration_id=mid, service=service, epoch=epoch, destination="gw2", technique="cold"
    )


def test_the_epoch_of_a_service_is_the_newest_the_journal_knows(tmp_path: Path) -> None:
    journal = j.SharedJournal(journal=j.Journal(path=tmp_path / "handover.jsonl"))
    journal.entries += [
        _begin("m1", "s", 3),
        j.HandedOver(migration_id="m1", epoch=4),
        j.Committed(migration_id="m2", service="s", epoch=7),
        _begin("m3", "t", 9),
        j.Prepared(migration_id="m4", service="v", epoch=12, source="gw2", technique="cold"),
    ]
    assert journal.epoch_of("s") == 7
    # A Begin names the epoch it proposes: the next attempt proposes above it, even after a
    # rollback, so that no two attempts of a service ever propose the same epoch.
    assert journal.epoch_of("t") == 10
    assert journal.epoch_of("v") == 12
    assert journal.epoch_of("u") == 0


async def test_the_journal_appends_in_order_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "handover.jsonl"
    journal = j.SharedJournal(journal=j.Journal(path=path))
    await asyncio.gather(*(journal.append(_begin(f"m{i}", "s", i)) for i in range(20)))
    journal.close()
    again = j.SharedJournal(journal=j.Journal(path=path))
    assert again.entries == journal.entries
    assert len(again.entries) == 20


def test_unfinished_migrations_and_leftover_directories(tmp_path: Path) -> None:
    entries: list[j.AnyEntry] = [
        _begin("done", "s", 1),
        j.Finished(migration_id="done", outcome=Outcome.COMPLETED),
        j.Published(migration_id="done"),
        _begin("open", "s", 2),
        j.Freezing(migration_id="open"),
        _begin("unpublished", "s", 3),
        j.Finished(migration_id="unpublished", outcome=Outcome.ROLLED_BACK),
        _begin("failed", "s", 4),
        j.Finished(migration_id="failed", outcome=Outcome.FAILED_AFTER_COMMIT),
        j.Published(migration_id="failed"),
        j.Prepared(migration_id="incoming", service="s", epoch=5, source="gw2", technique="cold"),
    ]
    assert sorted(unfinished(entries)) == ["open", "unpublished"]
    for name in ("done", "open", "unpublished", "failed", "incoming", "unknown"):
        (tmp_path / name).mkdir()
    # Kept: what is still under way, the evidence of a failure, anything not ours.
    assert [p.name for p in leftovers(entries, tmp_path)] == ["done"]
