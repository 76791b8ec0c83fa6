"""The destination's driver without root: typed calls in, the real core, journal and fence.

The runtime is a fake (a container is a folder under the runc root, as the fake runc of the
fence's tests keeps it), the fence is the real one with real watchdog processes killing through
that fake runc, and the journal is a real file. The calls are the ones a source sends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.base.errors import ContainerNotFoundError
from fogmig.platform.migration import arrival
from fogmig.platform.migration.destination import Destination
from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.handover.messages import (
    Abort,
    Commit,
    Prepare,
    Refused,
    Reply,
    Request,
    Restore,
    SendFiles,
    Ticket,
    TicketedReply,
    TicketedRequest,
    decode_reply,
    encode_call,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.runtime import fence_store
from fogmig.platform.runtime.fence import Fence
from fogmig.platform.runtime.results import ContainerState, RestoreResult

NODE = "gw2"
SERVICE = "svc"
FAKE_RUNC = """\
#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
i = args.index("--root")
root, cmd, rest = args[i + 1], args[i + 2], args[i + 3 :]
cid = rest[-1] if cmd in ("state", "delete") else rest[0]
where = os.path.join(root, cid)
if not os.path.isdir(where):
    sys.stderr.write("container does not exist\\n")
    sys.exit(1)
if cmd == "state":
    print(json.dumps({{"id": cid, "bundle": ""}}))
elif cmd == "delete":
    shutil.rmtree(where)
"""


class FakeRuntime:
    """Containers as folders under the runc root (the fence's watchdog deletes them there)."""

    def __init__(self, root: Path, runc: Path) -> None:
        self.node = NODE
        self.netns: str | None = None
        self.runc_root = root
        self.runc = str(runc)
        self.restore_delay = 0.0

    async def state(self, cid: str) -> ContainerState:
        if not (self.runc_root / cid).is_dir():
            raise ContainerNotFoundError(f"no container {cid}")
        return ContainerState(id=cid, status="running", pid=4242)

    async def exists(self, cid: str) -> bool:
        return (self.runc_root / cid).is_dir()

    async def delete(self, cid: str, *, force: bool = False) -> None:
        if not (self.runc_root / cid).is_dir():
            raise ContainerNotFoundError(f"no container {cid}")
        shutil.rmtree(self.runc_root / cid)

    async def restore(self, cid: str, **kw: Any) -> RestoreResult:
        await asyncio.sleep(self.restore_delay)
        (self.runc_root / cid).mkdir()
        return RestoreResult(cid, 4242, 0.01, {})


class Rig:
    def __init__(self, tmp: Path, timing: Timing) -> None:
        self.tmp = tmp
        runc = tmp / "fake-runc"
        runc.write_text(FAKE_RUNC.format(python=sys.executable))
        runc.chmod(0o755)
        (tmp / "runc").mkdir()
        (tmp / "rootfs").mkdir()
        self.runtime = FakeRuntime(tmp / "runc", runc)
        self.timing = timing
        self.notes: list[str] = []
        self.calls = 0
        self.ticket: Ticket | None = None

    def journal(self) -> j.SharedJournal:
        return j.SharedJournal(journal=j.Journal(path=self.tmp / "handover.jsonl"))

    def destination(self) -> Destination:
        async def note(what: str, service: str, mid: str) -> None:
            self.notes.append(what)

        async def fetch(source: str, mid: str) -> Any:
            raise AssertionError("no lazy restore here")

        return Destination(
            node=NODE,
            runtime=self.runtime,  # type: ignore[arg-type]
            rootfs=lambda: self.tmp / "rootfs",
            bundles=self.tmp / "bundles",
            incoming=self.tmp / "incoming",
            fetch_factory=fetch,
            journal=self.journal(),
            timing=self.timing,
            running_here=lambda s, m: note("running_here", s, m),
            gave_up=lambda s, m: note("gave_up", s, m),
            owned=lambda s, m: note("owned", s, m),
        )

    async def call(self, dest: Destination, request: Request) -> Reply | Refused:
        if isinstance(request, TicketedRequest):
            request = request.model_copy(update={"ticket": self.ticket})
        op, params = encode_call(request)
        reply = decode_reply(op, await dest.handle(op, params, "gw1"))
        if isinstance(reply, TicketedReply):
            self.ticket = reply.ticket
        return reply

    async def arrive(self, dest: Destination, mid: str) -> None:
        """Prepare and ship the files of a cold migration."""
        prepare = Prepare(
            migration_id=mid,
            service=SERVICE,
            epoch=5,
            source="gw1",
            technique="cold",
            args=["sensor", "--port", "5683"],
        )
        assert (await self.call(dest, prepare)).kind == "ok"
        images = self.tmp / "incoming" / mid / "final"
        images.mkdir(parents=True)
        (images / "inventory.img").write_bytes(b"x" * 10)
        files = SendFiles(migration_id=mid, name="final", files=1, bytes=10)
        assert (await self.call(dest, files)).kind == "ok"

    def container(self) -> bool:
        return (self.runtime.runc_root / SERVICE).is_dir()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.journal().entries]


def _bundle(directory: Path, **kw: object) -> Path:
    # The real one checks the node's network namespace, which only a testbed has.
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(arrival, "make_bundle", _bundle)
    timing = Timing(fence_timeout_s=1.5, margin_s=0.2, call_timeout_s=0.5, lazy_poll_s=0.1)
    r = Rig(tmp_path, timing)
    yield r
    for path in fence_store.listing(fence_store.fence_dir(NODE)):
        rec = fence_store.read(path)
        if rec is not None and fence_store.is_watchdog(rec.watchdog_pid, path):
            assert rec.watchdog_pid is not None
            os.kill(rec.watchdog_pid, signal.SIGKILL)


def _restore(mid: str) -> Restore:
    return Restore(migration_id=mid, epoch=5, mode="full", images="final")


async def _settle(dest: Destination) -> None:
    for _ in range(200):
        if not dest._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the destination did not settle")


async def test_a_hand_over_disarms_the_fence_and_keeps_the_copy(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    restored = await rig.call(dest, _restore("m1"))
    assert restored.kind == "ok"
    assert rig.container()
    assert Fence.find(NODE, "m1") is not None  # armed before the copy ran
    assert (await rig.call(dest, Commit(migration_id="m1", epoch=5))).kind == "ok"
    # The reply was lost: the source asks again and hears the same.
    again = await rig.call(dest, Commit(migration_id="m1", epoch=5))
    assert again.kind == "ok"
    await _settle(dest)
    assert rig.container()
    assert Fence.records(NODE) == []
    assert not (rig.tmp / "incoming" / "m1").exists()
    assert (rig.tmp / "bundles" / SERVICE / "config.json").exists()
    assert rig.kinds() == ["boot", "prepared", "restoring", "committed"]
    assert rig.notes == ["running_here", "owned"]
    await dest.close()


async def test_a_silent_source_loses_the_copy_to_the_fence(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    assert (await rig.call(dest, _restore("m1"))).kind == "ok"
    started = time.monotonic()
    while rig.container():
        assert time.monotonic() - started < 5.0, "the fence never fired"
        await asyncio.sleep(0.02)
    await _settle(dest)
    refused = await rig.call(dest, Commit(migration_id="m1", epoch=5))
    assert isinstance(refused, Refused)
    assert refused.state == "fenced"
    assert "tombstoned" in rig.kinds()
    assert Fence.records(NODE) == []  # released once no restore could run
    assert not (rig.tmp / "incoming" / "m1").exists()
    assert not (rig.tmp / "bundles" / SERVICE).exists()
    assert rig.notes == ["running_here", "gave_up"]
    await dest.close()


async def test_a_restore_outlasting_the_lease_never_runs(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    rig.runtime.restore_delay = 2.0  # longer than the lease the last ticket gave
    refused = await rig.call(dest, _restore("m1"))
    assert isinstance(refused, Refused)
    assert refused.state == "fenced"
    await _settle(dest)
    assert not rig.container()
    assert Fence.records(NODE) == []
    await dest.close()


async def test_an_abort_answers_only_once_the_copy_is_dead(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    assert (await rig.call(dest, _restore("m1"))).kind == "ok"
    answer = await rig.call(dest, Abort(migration_id="m1", epoch=5))
    assert answer.kind == "ok"
    assert getattr(answer, "outcome", None) == "aborted"
    assert not rig.container()
    await _settle(dest)
    assert Fence.records(NODE) == []
    await dest.close()


async def test_a_restarted_destination_fences_what_it_had_not_committed(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    assert (await rig.call(dest, _restore("m1"))).kind == "ok"
    # The agent dies here: its tasks go, the container and the fence's watchdog stay.
    for task in list(dest._tasks):
        task.cancel()
    dest.journal.close()
    assert rig.container()
    again = rig.destination()
    await again.start()
    assert not rig.container()
    assert Fence.records(NODE) == []
    assert not (rig.tmp / "incoming" / "m1").exists()
    assert rig.kinds() == ["boot", "prepared", "restoring", "boot", "tombstoned"]
    refused = await rig.call(again, Abort(migration_id="m1", epoch=5))
    assert getattr(refused, "outcome", None) == "fenced"
    await again.close()


async def test_a_service_running_here_refuses_the_prepare(rig: Rig) -> None:
    (rig.runtime.runc_root / SERVICE).mkdir()
    dest = rig.destination()
    await dest.start()
    prepare = Prepare(
        migration_id="m1", service=SERVICE, epoch=5, source="gw1", technique="cold", args=[]
    )
    refused = await rig.call(dest, prepare)
    assert isinstance(refused, Refused)
    assert refused.state == "busy"
    assert dest.arrivals == {}
    await dest.close()


async def test_compaction_drops_a_settled_migration_and_never_one_under_way(rig: Rig) -> None:
    dest = rig.destination()
    await dest.start()
    await rig.arrive(dest, "m1")
    assert (await rig.call(dest, _restore("m1"))).kind == "ok"
    # Under way (its fence and files are the destination's): kept whatever it is asked.
    under_way = await dest.compact_journal(keep_closed=0)
    assert under_way is not None
    assert under_way.dropped == frozenset()
    assert (await rig.call(dest, Commit(migration_id="m1", epoch=5))).kind == "ok"
    await _settle(dest)
    done = await dest.compact_journal(keep_closed=0)
    assert done is not None
    assert done.dropped == {"m1"}
    assert dest.core is not None
    assert "m1" not in dest.core.records
    assert "m1" not in dest._restored
    assert rig.kinds() == ["floor", "boot"]
    assert dest.core.owners[SERVICE] == 5
    replay = Prepare(
        migration_id="m1", service=SERVICE, epoch=5, source="gw1", technique="cold", args=[]
    )
    refused = await rig.call(dest, replay)
    assert isinstance(refused, Refused)
    assert rig.container()  # the owned copy is untouched
    await dest.close()
