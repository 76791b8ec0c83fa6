"""The set-up a newcomer runs, from a fresh clone, and the doctor that explains the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

ROOT = Path(__file__).resolve().parents[2]


def test_setup_from_a_fresh_clone_is_idempotent(tmp_path: Path) -> None:
    clone = tmp_path / "fogmig"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "PYTHONSAFEPATH": "1"}
    first = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "set-up complete" in first.stdout
    assert (tmp_path / "venv" / "bin" / "fogmig").exists()
    again = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    # Nothing is installed or built the second time.
    assert "Python environment: up to date" in again.stdout
    assert "Debian packages: all present" in again.stdout
    assert "installing" not in again.stdout


def test_doctor_explains_the_machine() -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    doc = json.loads(done.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert done.returncode == 0, [c for c in doc["checks"] if c["status"] == "fail"]
    assert doc["ok"] is True
    assert checks["criu"]["status"] == "ok"
    assert checks["criu check"]["status"] == "ok"
    assert checks["uffd-noncoop"]["status"] == "ok"
    # This kernel has no soft-dirty tracking and no netem: the doctor says what is used instead.
    assert "page-delta" in checks["mem_dirty_track"]["detail"]
    assert "userspace" in checks["netem"]["detail"]
    assert checks["service image"]["status"] == "ok"


def test_doctor_table_and_failure_exit(tmp_path: Path) -> None:
    table = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0
    assert "fogmig doctor" in table.stdout
    # Without CRIU on the PATH the platform cannot run, and the doctor says so.
    env = {**os.environ, "PATH": str(tmp_path)}
    broken = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert broken.returncode == 1
    doc = json.loads(broken.stdout)
    assert doc["ok"] is False
    assert any(c["name"] == "criu" and c["status"] == "fail" for c in doc["checks"])
