"""A migration watched by a probe: which gateway the probe asks, and what the record gets."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from fogmig.device_sim.events import RequestOutcome
from fogmig.device_sim.observed import ProbeRecord, ProbeTimeline
from fogmig.experiments.table import summary_table
from fogmig.platform.apps.probed import observe, probe_gateway
from fogmig.platform.cli.main import build_parser
from fogmig.platform.migration.record import MigrationRecord

T0 = 1_700_000_000.0
INTERVAL = 0.05


def probe_run(down: tuple[float, float]) -> ProbeTimeline:
    """20 Hz for 10 s, monotonic 0 at T0 on the wall clock; no answers while ``down``."""
    records = []
    for i in range(200):
        t = i * INTERVAL + 0.01
        dead = down[0] <= t < down[1]
        records.append(
            ProbeRecord(
                seq=i + 1,
                address="10.79.0.3",
                sent_at=t,
                answered_at=None if dead else t + 0.003,
                outcome=RequestOutcome.TIMEOUT if dead else RequestOutcome.OK,
            )
        )
    return ProbeTimeline(
        address="10.79.0.3",
        port=5690,
        path="ping",
        interval_s=INTERVAL,
        timeout_s=1.0,
        started_at=0.01,
        stopped_at=10.0,
        wall_offset_s=T0,
        records=tuple(records),
    )


def record(start: float, finish: float) -> MigrationRecord:
    return MigrationRecord(
        migration_id="m1",
        service="bench",
        source="gw1",
        destination="gw2",
        technique="cold",
        dump_time_s=0.3,
        dump_transfer_time_s=0.3,
        resume_time_s=0.2,
        started_at=start,
        finished_at=finish,
    )


def test_the_probe_asks_a_third_gateway_if_there_is_one() -> None:
    assert probe_gateway(["gw1", "gw2", "gw3"], "gw1", "gw2") == "gw3"
    assert probe_gateway(["gw1", "gw2", "gw3"], "gw3", "gw1") == "gw2"
    # Two nodes: the source, which forwards to the destination once the service left.
    assert probe_gateway(["gw1", "gw2"], "gw2", "gw1") == "gw2"


def test_the_record_gets_what_the_probe_saw_during_the_migration() -> None:
    r = record(T0 + 3.0, T0 + 5.0)
    seen = observe(r, probe_run(down=(3.5, 4.5)))
    assert seen is not None
    # Last answer before: sent 3.46, at 3.463; first after: sent 4.51, at 4.513.
    assert r.device_downtime_s == pytest.approx(1.0)
    assert r.device_downtime_s < r.downtime_s + 1.0
    assert r.probe_rate_hz == pytest.approx(20.0)
    # Sent 3.01 .. 4.96 in the window (40), of them 3.51 .. 4.46 (20) unanswered.
    assert (r.probe_sent, r.probe_answered, r.probe_lost) == (40, 20, 20)
    assert r.csv_row()["device_downtime_s"] == pytest.approx(1.0)


def test_a_probe_that_never_saw_the_service_back_bounds_nothing() -> None:
    r = record(T0 + 3.0, T0 + 5.0)
    observe(r, probe_run(down=(3.5, 20.0)))
    assert r.device_downtime_s is None
    assert r.probe_sent == 40
    assert r.probe_lost == 30


def test_a_record_without_times_is_left_alone() -> None:
    r = record(0.0, 0.0)
    assert observe(r, probe_run(down=(3.5, 4.5))) is None
    assert r.device_downtime_s is None
    assert r.probe_rate_hz is None


def test_the_experiment_table_puts_the_device_downtime_beside_the_node_downtime() -> None:
    probed = record(T0 + 3.0, T0 + 5.0)
    observe(probed, probe_run(down=(3.5, 4.5)))
    unprobed = record(T0 + 3.0, T0 + 5.0)
    console = Console(record=True, width=200)
    console.print(summary_table([probed, unprobed]))
    text = console.export_text()
    assert "device downtime s" in text
    probed_row, unprobed_row = text.splitlines()[-3:-1]
    assert re.search(r"│ 0\.80 +│ 1\.00 \(20/40 lost\) +│", probed_row), probed_row
    assert re.search(r"│ 0\.80 +│ - +│", unprobed_row), unprobed_row


def test_the_command_line_takes_the_probe_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["migrate", "s0", "--to", "gw2", "--technique", "cold", "--probe"])
    assert (args.probe, args.probe_hz, args.probe_csv) == (True, 20.0, None)
    args = parser.parse_args(["migrate", "s0", "--to", "gw2", "--technique", "cold"])
    assert args.probe is False
    assert parser.parse_args(["experiment", "--probe-hz", "0"]).probe_hz == 0.0
    assert parser.parse_args(["demo", "--probe-hz", "50"]).probe_hz == 50.0
