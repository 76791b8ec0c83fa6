"""Shared pieces of the system tests: the fogmig CLI, and a testbed with its agents."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fogmig.platform.testbed.state import TestbedState, exclusive_use, load_state


def fogmig(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a newcomer would (``-P``: the checkout never shadows the stdlib)."""
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


@contextlib.contextmanager
def testbed_with_agents(profile: str) -> Iterator[TestbedState]:
    """A fresh two-node testbed and its agents, held under the lease, torn down at the end.

    The lease keeps other test modules (which bring their own testbed up and down) out.
    """
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    with exclusive_use(timeout=900):
        fogmig("testbed", "down")  # leftovers of a crashed run
        fogmig("testbed", "up", "--profile", profile, "--nodes", "2")
        try:
            fogmig("agents", "up")
            yield load_state()
        finally:
            fogmig("agents", "down", check=False, timeout=120)
            fogmig("testbed", "down")


@pytest.fixture(scope="module")
def orchestration_testbed() -> Iterator[TestbedState]:
    """Two nodes over the orchestration profile's links, with their agents."""
    with testbed_with_agents("orchestration") as state:
        yield state


@pytest.fixture(scope="module")
def lan_testbed() -> Iterator[TestbedState]:
    """Two nodes over the lan profile's links, with their agents."""
    with testbed_with_agents("lan") as state:
        yield state
