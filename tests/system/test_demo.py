"""``fogmig demo`` end to end on the real testbed: a short run (two gateways, two roaming
devices) must pass, migrate with continuity verified, write its report and leave nothing behind;
an interrupt during the set-up must clean up just as well.

The test holds the testbed's lease for the whole module and runs the demo with ``--no-lease``;
it skips when someone else's testbed is up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fogmig.platform.base import paths
from fogmig.platform.base.errors import TestbedError
from fogmig.platform.testbed.broker import restart_broker
from fogmig.platform.testbed.state import exclusive_use, state_path

LEASE_WAIT_S = 300.0
DEMO_TIMEOUT_S = 240.0
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(LEASE_WAIT_S + 2 * DEMO_TIMEOUT_S),
]

ENV = {**os.environ, "PYTHONSAFEPATH": "1"}
DEMO = [sys.executable, "-m", "fogmig.platform.cli.main", "demo", "--no-lease", "--no-live"]


@pytest.fixture(scope="module")
def lease() -> Iterator[None]:
    try:
        with exclusive_use(timeout=LEASE_WAIT_S):
            if state_path().exists():
                pytest.skip(f"a testbed is already up ({state_path()}): not ours to use")
            yield
    except TestbedError as exc:
        pytest.skip(f"the testbed stays in use elsewhere: {exc}")


def leftovers() -> list[str]:
    """What a demo could leave behind: namespaces, containers, agents, the testbed state."""
    found = []
    netns_dir = Path("/var/run/netns")
    if netns_dir.is_dir():
        found += [f"netns {p.name}" for p in netns_dir.iterdir() if p.name.startswith("fm-")]
    nodes = paths.run_dir() / "nodes"
    for root in nodes.glob("*/runc") if nodes.is_dir() else []:
        found += [f"container {root.parent.name}/{c.name}" for c in root.iterdir() if c.is_dir()]
    agents = paths.run_dir() / "agents"
    if agents.is_dir():
        found += [f"agent pid file {p.name}" for p in agents.glob("*.pid")]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fogmig.platform.cli.main" in argv and (b"agent" in argv or b"linkd" in argv):
            found.append(f"process {proc.name}: {b' '.join(argv).decode(errors='replace')}")
    if state_path().exists():
        found.append(f"testbed state {state_path()}")
    return found


async def run_demo(
    *args: str, interrupt_after: str | None = None, restart_broker_after: str | None = None
) -> tuple[int, str]:
    """Run the demo; with ``interrupt_after``, send SIGINT once that text is printed; with
    ``restart_broker_after``, restart the testbed's broker then."""
    proc = await asyncio.create_subprocess_exec(
        *DEMO, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=ENV, cwd="/",
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(DEMO_TIMEOUT_S):
            async for raw in proc.stdout:
                line = raw.decode(errors="replace")
                lines.append(line)
                if interrupt_after is not None and interrupt_after in line:
                    proc.send_signal(signal.SIGINT)
                    interrupt_after = None
                if restart_broker_after is not None and restart_broker_after in line:
                    await restart_broker()
                    lines.append("(test: broker restarted)\n")
                    restart_broker_after = None
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the demo did not end in time:\n" + "".join(lines)) from None
    return code, "".join(lines)


async def test_short_demo_passes_and_cleans_up(lease: None, tmp_path: Path) -> None:
    before = set(leftovers())  # stale remains of someone else's crash are not the demo's
    out = tmp_path / "demo"
    code, output = await run_demo(
        "--duration", "20", "--devices", "2", "--nodes", "2", "--state-mb", "4",
        "--out", str(out),
    )  # fmt: skip
    print(output)
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert summary["problems"] == []
    completed = [m for m in summary["migrations"] if m["outcome"] == "completed"]
    assert completed, "no migration completed"
    for m in completed:
        assert m["technique"] in ("cold", "precopy", "postcopy", "hybrid")
        assert m["downtime_s"] > 0
        assert m["predicted_downtime_s"] is not None
        # The service's probe (20 Hz through its device's gateway) saw the service on both
        # sides of the migration.
        assert m["probe"]["sent"] > 0
        assert m["probe"]["downtime_s"] is not None
    for service in ("s0", "s1"):
        assert (out / "probes" / f"{service}.csv").read_text().startswith("seq,")
    continuity = summary["continuity"]
    assert continuity["failed"] == 0
    assert continuity["passed"] >= 2
    assert continuity["final"] == {"d0": True, "d1": True}
    requests = summary["requests"]
    assert requests["sent"] >= 2 * 15
    assert requests["lost_readings"] == 0
    report = (out / "report.html").read_text()
    assert "Plotly.newPlot" in report
    assert completed[0]["migration_id"] in (out / "migrations.csv").read_text()
    rows = (out / "devices" / "timeline.csv").read_text().splitlines()
    assert len(rows) > requests["sent"]  # the header, the readings and the state checks
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert {d["command_id"] for d in decisions} >= {m["command_id"] for m in completed}
    assert "PASSED" in output
    assert set(leftovers()) - before == set()


async def test_interrupt_during_setup_cleans_up(lease: None, tmp_path: Path) -> None:
    before = set(leftovers())
    code, output = await run_demo(
        "--duration", "20", "--devices", "1", "--nodes", "2", "--state-mb", "4",
        "--out", str(tmp_path / "demo"), interrupt_after="agents:",
    )  # fmt: skip
    print(output)
    assert code == 130, output
    assert "cleaned up" in output
    assert set(leftovers()) - before == set()


async def test_demo_survives_a_broker_restart(lease: None, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, output = await run_demo(
        "--duration", "30", "--devices", "2", "--nodes", "2", "--state-mb", "4",
        "--out", str(out), restart_broker_after="completed in",
    )  # fmt: skip
    print(output)
    assert "(test: broker restarted)" in output
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert summary["continuity"]["failed"] == 0
    # Migrations went on after the restart: more than the one that triggered it completed.
    completed = [m for m in summary["migrations"] if m["outcome"] == "completed"]
    assert len(completed) >= 2
