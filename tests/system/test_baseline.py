"""The paper's toolchain as a baseline: runc, CRIU and rsync over ssh between testbed nodes.

Cold and post-copy must move the service with its counter and hash intact, leave it on the
destination only, and leave it where fogmig's own engine can migrate it next. Pre-copy needs
CRIU's pre-dump: on a kernel without soft-dirty tracking the record must say so and the
service must still run on the source.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator

import pytest

from fogmig.experiments.baseline import run_baseline
from fogmig.experiments.baseline_cmds import DIRTY_TRACK_CHECK
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.base import paths
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy

pytestmark = [pytest.mark.system, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SERVICE = "blsvc"
PORT = 5697


@pytest.fixture(scope="module")
def testbed(orchestration_testbed: TestbedState) -> TestbedState:
    return orchestration_testbed


@pytest.fixture
async def service(testbed: TestbedState) -> AsyncIterator[str]:
    await deploy(ServiceSpec(name=SERVICE, state_mb=8, port=PORT), node=testbed.nodes[0].name)
    try:
        yield SERVICE
    finally:
        if await find_service(SERVICE):
            await undeploy(SERVICE)


async def running_on(service: str) -> list[str]:
    return [p.node for p in await find_service(service) if p.container.running]


def _no_leftovers() -> None:
    root = paths.state_dir() / "baseline"
    assert not root.exists() or not any(root.iterdir())
    with open("/proc/mounts") as fh:
        assert "/baseline/" not in fh.read()


async def test_cold_and_post_copy_move_the_service_and_fogmig_moves_it_on(
    testbed: TestbedState, service: str
) -> None:
    a, b = testbed.nodes[0].name, testbed.nodes[1].name
    cold = await run_baseline(service, b, Technique.COLD)
    assert cold.outcome is Outcome.COMPLETED, cold.error
    assert cold.migration_id.startswith("baseline-")
    assert cold.dump_bytes > 8 << 20
    assert cold.downtime_s == pytest.approx(cold.total_time_s)
    assert await running_on(service) == [b]
    _no_leftovers()

    post = await run_baseline(service, a, Technique.POSTCOPY)
    assert post.outcome is Outcome.COMPLETED, post.error
    assert post.faulted_pages_bytes > 8 << 20
    assert post.dump_bytes < post.faulted_pages_bytes
    assert post.total_time_s > post.downtime_s
    assert await running_on(service) == [a]
    _no_leftovers()

    # The service is where fogmig's agents can find and migrate it.
    record = await request_migration(service, b, Technique.COLD, timeout=120)
    assert record.outcome is Outcome.COMPLETED, record.error
    assert await running_on(service) == [b]


async def test_pre_copy_without_dirty_tracking_fails_and_leaves_the_service_running(
    testbed: TestbedState, service: str
) -> None:
    if subprocess.run(list(DIRTY_TRACK_CHECK), capture_output=True, check=False).returncode == 0:
        pytest.skip("this kernel tracks dirty memory: pre-dump works here")
    a, b = testbed.nodes[0].name, testbed.nodes[1].name
    record = await run_baseline(service, b, Technique.PRECOPY)
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.failed_phase == "pre_dump"
    assert record.error is not None
    assert "--pre-dump" in record.error
    assert "missing features" in record.error
    assert await running_on(service) == [a]
    _no_leftovers()
