"""The fence without root: its record's transitions, its file, and real watchdog processes
that kill through a fake runc (a script that logs each call and keeps containers as folders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogmig.platform.base.errors import FenceError, FenceFiredError
from fogmig.platform.runtime import fence_state, fence_store
from fogmig.platform.runtime.fence import Fence, FenceHandle
from fogmig.platform.runtime.fence_state import FenceRecord, FenceState

BOOT = "boot-a"
NODE = "gw1"

# ---- the record ------------------------------------------------------------------------------


def _rec(**kw: object) -> FenceRecord:
    args: dict[str, object] = {
        "migration_id": "svc-1",
        "node": NODE,
        "container_id": "svc",
        "runc_root": "/run/x",
        "runc": "/usr/bin/runc",
        "netns": None,
        "deadline": 110.0,
        "grace_s": 5.0,
        "now": 100.0,
        "boot_id": BOOT,
    }
    args.update(kw)
    return fence_state.new_record(**args)  # type: ignore[arg-type]


def test_a_new_fence_is_armed_and_refuses_a_past_deadline_or_odd_names() -> None:
    rec = _rec()
    assert (rec.state, rec.deadline, rec.armed_at, rec.watchdog_pid) == (
        FenceState.ARMED,
        110.0,
        100.0,
        None,
    )
    with pytest.raises(FenceFiredError):
        _rec(deadline=100.0)
    for bad in ("../x", ".hidden", "-rf", "a b", "", "x" * 129):
        with pytest.raises(FenceError, match="invalid"):
            _rec(migration_id=bad)
        with pytest.raises(FenceError, match="invalid"):
            _rec(container_id=bad)
    with pytest.raises(FenceError, match="grace"):
        _rec(grace_s=-1.0)


def test_extend_pushes_the_deadline_and_never_shrinks_it() -> None:
    rec = _rec()
    assert fence_state.extended(rec, 120.0, now=105.0, boot_id=BOOT).deadline == 120.0
    assert fence_state.extended(rec, 108.0, now=105.0, boot_id=BOOT) is rec


def test_extend_and_disarm_are_refused_once_the_lease_is_over() -> None:
    rec = _rec()
    for change in (
        lambda r, now, boot: fence_state.extended(r, 200.0, now=now, boot_id=boot),
        lambda r, now, boot: fence_state.disarmed(r, now=now, boot_id=boot),
    ):
        with pytest.raises(FenceFiredError, match="deadline has passed"):
            change(rec, 110.0, BOOT)  # at the deadline exactly: too late
        with pytest.raises(FenceFiredError, match="deadline has passed"):
            change(rec, 101.0, "boot-b")  # another boot: the monotonic time means nothing
        with pytest.raises(FenceFiredError, match="it fired"):
            change(fence_state.fired(rec, now=101.0, reason="t"), 102.0, BOOT)
    done = fence_state.disarmed(rec, now=109.9, boot_id=BOOT)
    assert done.state is FenceState.DISARMED
    assert fence_state.disarmed(done, now=500.0, boot_id=BOOT) is done  # idempotent
    with pytest.raises(FenceError, match="disarmed"):
        fence_state.extended(done, 200.0, now=105.0, boot_id=BOOT)
    with pytest.raises(FenceError, match="disarmed"):
        fence_state.fired(done, now=105.0, reason="t")


def test_firing_keeps_the_first_firing_and_starts_the_grace_period() -> None:
    rec = _rec()
    assert not rec.due(now=109.99, boot_id=BOOT)
    assert rec.due(now=110.0, boot_id=BOOT)
    assert rec.due(now=101.0, boot_id="boot-b")
    first = fence_state.fired(rec, now=110.01, reason="deadline passed")
    assert (first.state, first.fired_at, first.reason) == (
        FenceState.FIRED,
        110.01,
        "deadline passed",
    )
    assert fence_state.fired(first, now=120.0, reason="again") is first
    assert not first.due(now=200.0, boot_id=BOOT)
    assert not first.grace_over(now=115.0, boot_id=BOOT)
    assert first.grace_over(now=115.01, boot_id=BOOT)
    assert first.grace_over(now=111.0, boot_id="boot-b")
    assert not rec.grace_over(now=1e9, boot_id=BOOT)


def test_the_record_round_trips_and_damage_is_named() -> None:
    rec = dataclasses.replace(_rec(), watchdog_pid=42)
    assert fence_state.decode(fence_state.encode(rec)) == rec
    good = json.loads(fence_state.encode(rec))
    damaged = [
        fence_state.encode(rec)[:-9],
        b"\xff\xfe",
        b"[]",
        json.dumps({**good, "version": 2}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "deadline"}).encode(),
        json.dumps({**good, "state": "sleeping"}).encode(),
        json.dumps({**good, "deadline": "soon"}).encode(),
        json.dumps({**good, "container_id": "../etc"}).encode(),
    ]
    for data in damaged:
        with pytest.raises(FenceError, match="damaged"):
            fence_state.decode(data, source="fence file X")


# ---- the file --------------------------------------------------------------------------------


def test_files_are_replaced_whole_and_listed_by_name(tmp_path: Path) -> None:
    path = tmp_path / "svc-1.json"
    assert fence_store.read(path) is None
    rec = _rec()
    with fence_store.locked(tmp_path):
        fence_store.write(path, rec)
        fence_store.write(path, dataclasses.replace(rec, deadline=111.0))
    assert fence_store.read(path) == dataclasses.replace(rec, deadline=111.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc-1.json"]  # no temp file left
    (tmp_path / ".svc-2.json.tmp").write_text("{")
    assert fence_store.listing(tmp_path) == [path]
    with fence_store.locked(tmp_path):
        fence_store.remove(path)
        fence_store.remove(path)
    assert fence_store.listing(tmp_path) == []
    assert fence_store.listing(tmp_path / "none") == []


def test_only_a_live_watchdog_of_that_file_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "svc-1.json"
    assert not fence_store.is_watchdog(os.getpid(), path)  # alive, but another program
    assert not fence_store.is_watchdog(None, path)
    assert not fence_store.is_watchdog(0, path)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", fence_store.WATCH_MODULE, str(path)]
    )
    try:
        _until(lambda: fence_store.is_watchdog(proc.pid, path))  # argv shows once exec is done
        assert not fence_store.is_watchdog(proc.pid, tmp_path / "other.json")
        proc.kill()
        for _ in range(200):
            if not fence_store.is_watchdog(proc.pid, path):  # a zombie counts as gone
                break
            time.sleep(0.01)
        assert not fence_store.is_watchdog(proc.pid, path)
    finally:
        proc.kill()
        proc.wait()


# ---- watchdog processes with a fake runc ------------------------------------------------------

FAKE_RUNC = """\
#!{python}
import json, os, shutil, sys, time
args = sys.argv[1:]
i = args.index("--root")
root, cmd, rest = args[i + 1], args[i + 2], args[i + 3 :]
cid = rest[-1] if cmd in ("state", "delete") else rest[0]
with open(os.path.join(os.path.dirname(root), "runc-calls.jsonl"), "a") as f:
    f.write(json.dumps({{"cmd": cmd, "cid": cid, "t": time.monotonic()}}) + "\\n")
where = os.path.join(root, cid)
if not os.path.isdir(where):
    sys.stderr.write("container does not exist\\n")
    sys.exit(1)
if cmd == "state":
    print(json.dumps({{"id": cid, "bundle": ""}}))
elif cmd == "delete":
    shutil.rmtree(where)
"""


@dataclass
class Rig:
    """A run directory, a fake runc and its containers (folders under the runc root)."""

    tmp: Path
    runc: Path
    root: Path

    def create(self, cid: str = "svc") -> None:
        (self.root / cid).mkdir(parents=True)

    def running(self, cid: str = "svc") -> bool:
        return (self.root / cid).exists()

    def calls(self) -> list[dict[str, object]]:
        log = self.tmp / "runc-calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def kills(self) -> list[float]:
        return [float(c["t"]) for c in self.calls() if c["cmd"] == "kill"]  # type: ignore[arg-type]

    def arm(self, mid: str = "svc-1", *, in_s: float = 0.3, grace_s: float = 600.0) -> FenceHandle:
        return Fence.arm(
            node=NODE,
            container_id="svc",
            runc_root=self.root,
            migration_id=mid,
            deadline=time.monotonic() + in_s,
            grace_s=grace_s,
            runc=str(self.runc),
        )

    def fences(self) -> list[Path]:
        return fence_store.listing(fence_store.fence_dir(NODE))


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    runc = tmp_path / "fake-runc"
    runc.write_text(FAKE_RUNC.format(python=sys.executable))
    runc.chmod(0o755)
    r = Rig(tmp=tmp_path, runc=runc, root=tmp_path / "runc")
    r.root.mkdir()
    yield r
    # Whatever a test left: its watchdogs go (each confirmed by its command line first).
    for path in r.fences():
        rec = fence_store.read(path)
        if rec is not None and fence_store.is_watchdog(rec.watchdog_pid, path):
            assert rec.watchdog_pid is not None
            os.kill(rec.watchdog_pid, signal.SIGKILL)


def _until(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_fence_fires_at_its_deadline_writes_fired_first_then_kills(rig: Rig) -> None:
    rig.create()
    fence = rig.arm(in_s=1.0)
    rec = fence.record()
    pid = fence.watchdog_pid()
    assert pid is not None
    assert rec.state is FenceState.ARMED
    assert rig.running()

    killed = fence.wait_killed(timeout=5)

    assert not rig.running()
    assert killed.fired_at is not None
    assert killed.killed_at is not None
    (kill_at,) = rig.kills()
    assert rec.deadline <= killed.fired_at <= kill_at <= killed.killed_at
    # Generous here (a loaded machine); tests/system/test_fence.py holds the real bound.
    assert kill_at - rec.deadline < 1.0, f"killed {kill_at - rec.deadline:.3f} s late"
    assert killed.reason == "deadline passed"
    with pytest.raises(FenceFiredError):
        fence.disarm()
    with pytest.raises(FenceFiredError):
        fence.extend(time.monotonic() + 10)
    with pytest.raises(FenceError, match="exists"):
        rig.arm()  # a fired migration's fence cannot be armed again
    assert fence.watchdog_pid() == pid  # watching through the grace period


def test_extending_keeps_the_copy_and_disarm_leaves_nothing(rig: Rig) -> None:
    rig.create()
    fence = rig.arm(in_s=2.0)
    pid = fence.watchdog_pid()
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        fence.extend(time.monotonic() + 2.0)
        fence.extend(time.monotonic() - 5)  # a late ticket shrinks nothing
        time.sleep(0.1)
    assert fence.state() is FenceState.ARMED

    fence.disarm()

    assert rig.running()
    assert rig.kills() == []
    assert fence.state() is FenceState.DISARMED
    assert rig.fences() == []
    assert not fence_store.is_watchdog(pid, fence.path)
    fence.disarm()  # idempotent
    with pytest.raises(FenceError):
        fence.extend(time.monotonic() + 1)
    time.sleep(0.4)
    assert rig.running()


def test_disarm_after_the_deadline_is_refused(rig: Rig) -> None:
    rig.create()
    fence = rig.arm(in_s=0.15)
    time.sleep(0.2)
    with pytest.raises(FenceFiredError):
        fence.disarm()
    fence.wait_killed()
    assert not rig.running()


def test_the_fence_fires_after_the_arming_process_is_killed(rig: Rig) -> None:
    rig.create()
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from fogmig.platform.runtime.fence import Fence
        h = Fence.arm(node={NODE!r}, container_id="svc", runc_root=Path({str(rig.root)!r}),
                      migration_id="svc-1", deadline=time.monotonic() + 0.8,
                      runc={str(rig.runc)!r})
        print(h.watchdog_pid(), flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-P", "-c", code], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            pid = int(child.stdout.readline())
        finally:
            child.send_signal(signal.SIGKILL)
    fence = Fence.find(NODE, "svc-1")
    assert fence is not None
    assert fence.watchdog_pid() == pid
    assert rig.running()

    rec = fence.wait_killed(timeout=5)

    assert not rig.running()
    assert rig.kills()[0] - rec.deadline < 0.2


def test_a_container_that_appears_after_firing_is_killed_until_the_grace_ends(rig: Rig) -> None:
    fence = rig.arm(in_s=0.1, grace_s=1.5)
    rec = fence.wait_killed()
    pid = rec.watchdog_pid
    for _ in range(2):
        rig.create()  # a restore that finished after the fence fired
        _until(lambda: not rig.running(), timeout=1)
    assert len(rig.kills()) == 3
    assert fence.state() is FenceState.FIRED

    _until(lambda: rig.fences() == [], timeout=5)

    _until(lambda: not fence_store.is_watchdog(pid, fence.path), timeout=2)
    assert Fence.records(NODE) == []
    with pytest.raises(FenceError):
        fence.state()


def test_release_ends_the_grace_period_early(rig: Rig) -> None:
    fence = rig.arm(in_s=0.1)
    pid = fence.wait_killed().watchdog_pid
    with pytest.raises(FenceError, match="armed"):
        rig.arm("svc-2", in_s=30).release()
    fence.release()
    assert not fence_store.is_watchdog(pid, fence.path)
    assert fence.state() is FenceState.FIRED
    assert [p.name for p in rig.fences()] == ["svc-2.json"]
    Fence.find(NODE, "svc-2").disarm()  # type: ignore[union-attr]
    assert rig.fences() == []


def test_the_agent_can_fire_and_a_stopped_watchdog_fires(rig: Rig) -> None:
    rig.create("svc")
    fence = rig.arm("svc-1", in_s=30)
    fence.fire()
    assert fence.wait_killed().reason == "fired by the agent"
    assert not rig.running()
    fence.release()

    rig.create("svc")
    fence = rig.arm("svc-2", in_s=30)
    pid = fence.watchdog_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert fence.wait_killed().reason == "watchdog stopped"
    _until(lambda: not fence_store.is_watchdog(pid, fence.path))
    assert not rig.running()


def test_recover_restarts_a_lost_watchdog_and_lists_the_fences(rig: Rig) -> None:
    rig.create()
    fence = rig.arm("svc-1", in_s=0.6)
    other = rig.arm("svc-2", in_s=30)
    pid = fence.watchdog_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _until(lambda: fence.watchdog_pid() is None)
    # An agent that died between disarming and removing the file leaves a disarmed record.
    with fence_store.locked(other.path.parent):
        rec = other.record()
        fence_store.write(other.path, dataclasses.replace(rec, state=FenceState.DISARMED))

    handles = Fence.recover(NODE)

    assert [h.migration_id for h in handles] == ["svc-1", "svc-2"]
    assert handles[0].watchdog_pid() not in (None, pid)
    assert handles[1].state() is FenceState.DISARMED
    assert [r.migration_id for r in Fence.records(NODE)] == ["svc-1"]
    rec = handles[0].wait_killed()
    assert not rig.running()
    assert rig.kills()[0] - rec.deadline < 0.2


def test_a_damaged_fence_file_fires(rig: Rig) -> None:
    rig.create()
    fence = rig.arm(in_s=30)
    fence.path.write_text("{not json")
    _until(lambda: not rig.running())
    assert fence.record().reason is not None
    assert "unreadable" in (fence.record().reason or "")


def test_arming_refuses_a_second_fence_and_a_past_deadline(rig: Rig) -> None:
    fence = rig.arm(in_s=30)
    with pytest.raises(FenceError, match="exists"):
        rig.arm(in_s=30)
    with pytest.raises(FenceFiredError):
        rig.arm("svc-2", in_s=-1)
    assert [p.name for p in rig.fences()] == ["svc-1.json"]
    fence.disarm()
    assert rig.fences() == []
