"""``fogmig soak`` end to end on the real testbed: six migrations by random techniques under
three roaming devices, with a broker restart and an agent killed and restarted during them,
lose and double no reading, every ledger matches its service, and nothing is left behind.

The test holds the testbed's lease and runs the soak with ``--no-lease``; it skips when
someone else's testbed is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fogmig.platform.base import paths
from fogmig.platform.base.errors import TestbedError
from fogmig.platform.testbed.state import exclusive_use, state_path

LEASE_WAIT_S = 300.0
SOAK_TIMEOUT_S = 300.0
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(LEASE_WAIT_S + SOAK_TIMEOUT_S + 60),
]


@pytest.fixture(scope="module")
def lease() -> Iterator[None]:
    try:
        with exclusive_use(timeout=LEASE_WAIT_S):
            if state_path().exists():
                pytest.skip(f"a testbed is already up ({state_path()}): not ours to use")
            yield
    except TestbedError as exc:
        pytest.skip(f"the testbed stays in use elsewhere: {exc}")


def test_a_short_soak_with_restarts_loses_nothing(lease: None, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [
        sys.executable, "-P", "-m", "fogmig.platform.cli.main", "soak", "--no-lease", "--json",
        "--migrations", "6", "--devices", "3", "--broker-restarts", "1", "--agent-restarts", "1",
        "--seed", "3", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S, cwd="/", check=False
    )
    print(done.stderr)
    assert done.returncode in (0, 1), done.stderr
    assert done.stdout.strip(), f"no summary; the soak said:\n{done.stderr}"
    summary = json.loads(done.stdout)
    m, r, c = summary["migrations"], summary["requests"], summary["continuity"]
    assert m["asked"] == 6
    assert m["completed"] + m["rolled_back"] + m["failed"] == 6
    assert m["completed"] >= 4, summary
    assert m["failed"] == 0, summary["errors"]
    assert summary["restarts"] == {"broker": 1, "agent": 1}
    assert r["sent"] > 0
    assert r["acknowledged"] > 0
    assert r["lost"] == 0
    assert r["doubled"] == 0
    assert c["mismatched"] == 0, c["failures"]
    assert c["final_unverified"] == []
    assert c["passed"] >= 3  # every device's final check at least
    assert summary["ok"] is True, summary["problems"]
    assert done.returncode == 0
    processes = summary["processes"]
    assert set(processes) == {"controller", "agent@gw1", "agent@gw2"}
    for p in processes.values():
        for when in ("start", "end"):
            assert p[when]["rss_bytes"] > 0
            assert p[when]["open_fds"] > 0
    samples = summary["samples"]
    assert set(samples) == set(processes)
    assert summary["sample_every"] == 1
    assert all(len(taken) >= 2 for taken in samples.values())
    # The killed agent is followed under its new PID; the controller is never restarted.
    assert sum(s["restarted"] for name in samples for s in samples[name]) == 1
    # Six migrations are all warm-up: too few samples to call the memory flat or growing.
    assert {v["verdict"] for v in summary["memory"].values()} == {"unknown"}
    assert json.loads((out / "summary.json").read_text())["ok"] is True
    # Nothing left: no testbed, no agent, no controller of this run.
    assert not state_path().exists()
    agents = paths.run_dir() / "agents"
    assert not list(agents.glob("*.pid")) if agents.is_dir() else True
    pid = processes["controller"]["end"]["pid"]
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"controller" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
