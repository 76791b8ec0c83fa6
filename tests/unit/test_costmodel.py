"""The cost model: structure of each technique, edge cases, the paper's findings, calibration."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from fogmig.platform.base.vocabulary import PAGE_SIZE, NodeCapabilities, Technique
from fogmig.policies.calibration import CalibrationSample, fit_constants
from fogmig.policies.conditions import (
    MB,
    PAPER_CONFIGURATIONS,
    InvalidConditionsError,
    LinkConditions,
    PrecopyStopRules,
    ServiceConditions,
    StopReason,
)
from fogmig.policies.costmodel import (
    CostConstants,
    MigrationComponents,
    Prediction,
    lazy_requests,
    predict,
    predict_all,
    transfer_time,
)

DELTA = NodeCapabilities(postcopy=True, native_predump=False)
NATIVE = NodeCapabilities(postcopy=True, native_predump=True)
LAN = LinkConditions.from_mbit(72.41, 6.94)
WAN = LinkConditions.from_mbit(11.34, 122.95)


def paper(name: str) -> dict[Technique, Prediction]:
    c = PAPER_CONFIGURATIONS[name]
    return predict_all(c.service, c.link, source=DELTA, stop_rules=PrecopyStopRules.single_round())


# --- inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServiceConditions(state_bytes=-1, dirty_rate_bytes_per_s=0),
        lambda: ServiceConditions(state_bytes=1, dirty_rate_bytes_per_s=-5.0),
        lambda: ServiceConditions(state_bytes=1, dirty_rate_bytes_per_s=float("nan")),
        lambda: LinkConditions(throughput_bytes_per_s=0, rtt_s=0.01),
        lambda: LinkConditions(throughput_bytes_per_s=1e6, rtt_s=-0.1),
        lambda: LinkConditions(throughput_bytes_per_s=float("inf"), rtt_s=0.1),
        lambda: PrecopyStopRules(max_rounds=0),
        lambda: PrecopyStopRules(max_precopy_bytes_factor=0.5),
        lambda: CostConstants(dump_fixed_s=-0.1),
        lambda: CostConstants(throughput_efficiency=0.0),
        lambda: CostConstants(lazy_chunk_bytes=0),
        lambda: CostConstants(lazy_chunk_bytes=8 << 20),
    ],
)
def test_out_of_range_inputs_are_rejected(make: object) -> None:
    assert callable(make)
    with pytest.raises(InvalidConditionsError):
        make()


def test_link_from_table2_units() -> None:
    assert WAN.throughput_bytes_per_s == pytest.approx(1_417_500)
    assert WAN.rtt_s == pytest.approx(0.12295)
    assert LinkConditions.from_dict(WAN.to_dict()) == WAN


def test_dirtied_bytes_bounded_by_writable_set() -> None:
    s = ServiceConditions(state_bytes=10 * MB, dirty_rate_bytes_per_s=1 * MB, writable_bytes=3 * MB)
    assert s.dirtied_bytes(2.0) == 2 * MB
    assert s.dirtied_bytes(100.0) == 3 * MB
    assert ServiceConditions(state_bytes=MB, dirty_rate_bytes_per_s=1e9).dirtied_bytes(5) == MB


# --- mechanics -------------------------------------------------------------------------------


def test_transfer_time_is_bytes_over_rate_plus_round_trips() -> None:
    k = CostConstants(throughput_efficiency=0.5, transfer_round_trips=2.0)
    link = LinkConditions(throughput_bytes_per_s=1e6, rtt_s=0.1)
    assert transfer_time(0, link, k) == 0.0
    assert transfer_time(1_000_000, link, k) == pytest.approx(2.0 + 0.2)
    assert transfer_time(1_000_000, link, k, transfers=3) == pytest.approx(2.0 + 0.6)


def test_lazy_requests_follow_criu_background_chunks() -> None:
    k = CostConstants(lazy_chunk_bytes=64 * 1024, lazy_max_chunk_bytes=4 << 20)
    assert lazy_requests(0, k, demand_faults=0) == 0
    assert lazy_requests(64 * 1024, k, demand_faults=0) == 1
    assert lazy_requests(3 * 64 * 1024, k, demand_faults=0) == 2  # 64 K + 128 K
    assert lazy_requests(3 * 64 * 1024 + 1, k, demand_faults=0) == 3
    # after 64 growing chunks the 4 MiB cap holds: 130 MiB ramp, then 4 MiB a request
    assert lazy_requests(130 * (1 << 20) + 8 * (4 << 20), k, demand_faults=0) == 64 + 8
    # a fault resets the chunk: each fault costs its own round trip and one small chunk
    assert lazy_requests(4 * PAGE_SIZE + 7 * 64 * 1024, k, demand_faults=4) == 4 + 4 + 2
    # never more faults than pages
    assert lazy_requests(2 * PAGE_SIZE, k, demand_faults=500) == 2


def test_cold_moves_everything_while_stopped() -> None:
    svc = ServiceConditions(state_bytes=50 * MB, dirty_rate_bytes_per_s=1e5)
    p = predict(Technique.COLD, svc, LAN)
    m = p.components
    assert m.downtime == pytest.approx(m.total_time)
    assert m.pre_dump_bytes == 0
    assert m.faulted_pages_bytes == 0
    assert m.dump_bytes == 50 * MB + p.inputs.constants.image_overhead_bytes


def test_zero_dirty_rate_precopy_converges_after_one_round() -> None:
    svc = ServiceConditions(state_bytes=50 * MB, dirty_rate_bytes_per_s=0.0)
    p = predict(Technique.PRECOPY, svc, WAN)
    assert len(p.rounds) == 1
    assert p.stop_reason is StopReason.CONVERGED
    assert p.converged
    assert p.components.dump_bytes == p.inputs.constants.image_overhead_bytes
    h = predict(Technique.HYBRID, svc, WAN)
    assert h.components.faulted_pages_bytes == 0
    assert h.components.faulted_pages_transfer_time == 0.0


def test_precopy_rounds_shrink_and_stop_at_the_threshold() -> None:
    svc = ServiceConditions(state_bytes=100 * MB, dirty_rate_bytes_per_s=1e6)
    rules = PrecopyStopRules(max_rounds=10, min_changed_bytes=256 * 1024)
    p = predict(Technique.PRECOPY, svc, LAN, source=NATIVE, stop_rules=rules)
    sizes = [r.bytes for r in p.rounds]
    assert sizes[0] == 100 * MB
    assert all(a > b for a, b in itertools.pairwise(sizes))
    assert p.stop_reason is StopReason.CONVERGED
    assert len(p.rounds) < 10
    # round i+1 ships what round i left dirty
    first = p.rounds[0]
    assert sizes[1] == svc.dirtied_bytes(first.dump_time + first.transfer_time)
    assert p.components.pre_dump_bytes == sum(sizes)


def test_full_checkpoint_rounds_floor_the_final_dump() -> None:
    # without soft-dirty every round freezes and compares the whole state, so at least what
    # is dirtied during one such checkpoint is always left for the final dump
    svc = ServiceConditions(state_bytes=100 * MB, dirty_rate_bytes_per_s=1e6)
    rules = PrecopyStopRules(max_rounds=10, min_changed_bytes=256 * 1024)
    p = predict(Technique.PRECOPY, svc, LAN, source=DELTA, stop_rules=rules)
    assert p.stop_reason in (StopReason.MAX_ROUNDS, StopReason.NOT_SHRINKING)
    floor = svc.dirtied_bytes(p.rounds[-1].dump_time)
    assert p.components.dump_bytes > floor > rules.min_changed_bytes


def test_max_rounds_bounds_precopy() -> None:
    svc = ServiceConditions(state_bytes=100 * MB, dirty_rate_bytes_per_s=1e6)
    p = predict(Technique.PRECOPY, svc, WAN, stop_rules=PrecopyStopRules(max_rounds=2))
    assert len(p.rounds) == 2
    assert p.stop_reason is StopReason.MAX_ROUNDS
    assert not p.converged


def test_dirty_rate_above_throughput_never_converges() -> None:
    svc = ServiceConditions(state_bytes=40 * MB, dirty_rate_bytes_per_s=3e6)
    p = predict(Technique.PRECOPY, svc, WAN)
    assert p.stop_reason is StopReason.NOT_SHRINKING
    assert len(p.rounds) == 1
    assert p.components.dump_bytes >= 40 * MB  # the final dump is the whole state again
    cold = predict(Technique.COLD, svc, WAN)
    assert p.downtime == pytest.approx(cold.downtime, rel=0.1)
    assert p.total_time > cold.total_time
    # without the shrink rule the byte budget stops it instead
    rules = PrecopyStopRules(
        stop_when_not_shrinking=False, max_rounds=10, max_precopy_bytes_factor=3
    )
    q = predict(Technique.PRECOPY, svc, WAN, stop_rules=rules)
    assert q.stop_reason is StopReason.BYTE_BUDGET
    assert len(q.rounds) == 3


def test_postcopy_downtime_ignores_state_size_and_dirty_rate() -> None:
    small = ServiceConditions(state_bytes=20 * MB, dirty_rate_bytes_per_s=0)
    big = ServiceConditions(state_bytes=500 * MB, dirty_rate_bytes_per_s=5e6)
    a = predict(Technique.POSTCOPY, small, LAN)
    b = predict(Technique.POSTCOPY, big, LAN)
    assert a.downtime == pytest.approx(b.downtime)
    assert b.components.faulted_pages_bytes > a.components.faulted_pages_bytes
    assert b.total_time > a.total_time


def test_postcopy_faulted_pages_pay_round_trips() -> None:
    svc = ServiceConditions(state_bytes=100 * MB, dirty_rate_bytes_per_s=0)
    near = LinkConditions(throughput_bytes_per_s=9e6, rtt_s=0.005)
    far = LinkConditions(throughput_bytes_per_s=9e6, rtt_s=0.120)
    a = predict(Technique.POSTCOPY, svc, near).components.faulted_pages_transfer_time
    b = predict(Technique.POSTCOPY, svc, far).components.faulted_pages_transfer_time
    assert b > a
    p = predict(Technique.POSTCOPY, svc, far)
    assert b - a == pytest.approx(p.lazy_requests * (0.120 - 0.005))


def test_tiny_state() -> None:
    svc = ServiceConditions(state_bytes=PAGE_SIZE, dirty_rate_bytes_per_s=1e3)
    for t, p in predict_all(svc, LAN).items():
        m = p.components
        assert m.total_time > 0, t
        assert min(m.pre_dump_bytes, m.dump_bytes, m.faulted_pages_bytes) >= 0, t
        assert all(math.isfinite(v) for v in (m.total_time, m.downtime)), t
    post = predict(Technique.POSTCOPY, svc, LAN)
    assert post.components.faulted_pages_bytes == 0  # the lazy dump already holds it all


def test_empty_state() -> None:
    svc = ServiceConditions(state_bytes=0, dirty_rate_bytes_per_s=0)
    for p in predict_all(svc, WAN).values():
        assert p.components.faulted_pages_bytes == 0
        assert math.isfinite(p.total_time)


def test_native_predump_saves_checkpoint_time() -> None:
    svc = ServiceConditions(state_bytes=200 * MB, dirty_rate_bytes_per_s=2e5)
    delta = predict(Technique.PRECOPY, svc, LAN, source=DELTA)
    native = predict(Technique.PRECOPY, svc, LAN, source=NATIVE)
    assert native.components.dump_time < delta.components.dump_time
    assert native.components.resume_time < delta.components.resume_time
    assert native.inputs.native_predump
    assert not delta.inputs.native_predump


def test_predictions_carry_their_inputs_and_serialise() -> None:
    svc = ServiceConditions(state_bytes=30 * MB, dirty_rate_bytes_per_s=5e4)
    rules = PrecopyStopRules(max_rounds=3)
    k = CostConstants(demand_faults=7)
    for t, p in predict_all(svc, WAN, stop_rules=rules, constants=k).items():
        assert p.technique is t
        assert p.inputs.service == svc
        assert p.inputs.link == WAN
        assert p.inputs.stop_rules == rules
        assert p.inputs.constants == k
        data = json.loads(json.dumps(p.to_dict()))
        assert data["inputs"]["service"]["state_bytes"] == 30 * MB
        assert data["components"]["downtime"] == pytest.approx(p.downtime)
        assert MigrationComponents.from_dict(data["components"]) == p.components
    assert CostConstants.from_dict(k.to_dict()) == k


def test_components_follow_the_papers_definitions() -> None:
    m = MigrationComponents(
        pre_dump_time=1, pre_dump_transfer_time=2, dump_time=3, dump_transfer_time=4,
        resume_time=5, faulted_pages_transfer_time=6, pre_dump_bytes=7, dump_bytes=8,
        faulted_pages_bytes=9,
    )  # fmt: skip
    assert m.downtime == 3 + 4 + 5
    assert m.total_time == 21
    assert m.transferred_bytes == 24


# --- the paper's findings (section 5.2) that the model must reproduce --------------------------


@pytest.mark.parametrize("cfg", "ABCD")
def test_paper_cold_lowest_total_time_and_highest_downtime(cfg: str) -> None:
    p = paper(cfg)
    cold = p[Technique.COLD]
    assert all(cold.total_time <= q.total_time for q in p.values())
    assert all(cold.downtime >= q.downtime for q in p.values())
    assert cold.downtime == pytest.approx(cold.total_time)


@pytest.mark.parametrize("cfg", "ABCD")
def test_paper_postcopy_slower_than_cold_and_hybrid_slowest(cfg: str) -> None:
    p = paper(cfg)
    assert p[Technique.POSTCOPY].total_time > p[Technique.COLD].total_time
    assert p[Technique.HYBRID].total_time > p[Technique.PRECOPY].total_time
    assert p[Technique.HYBRID].total_time > p[Technique.COLD].total_time


@pytest.mark.parametrize("cfg", "ABCD")
def test_paper_cold_and_postcopy_transfer_least(cfg: str) -> None:
    p = paper(cfg)
    cold, post = p[Technique.COLD], p[Technique.POSTCOPY]
    assert post.transferred_bytes == pytest.approx(cold.transferred_bytes, rel=0.01)
    for t in (Technique.PRECOPY, Technique.HYBRID):
        assert p[t].transferred_bytes >= cold.transferred_bytes
    # most of the state: the pre-dump for pre-copy/hybrid, the dump for cold, faults for post-copy
    assert cold.components.dump_bytes > 0.99 * cold.transferred_bytes
    assert post.components.faulted_pages_bytes > 0.9 * post.transferred_bytes
    for t in (Technique.PRECOPY, Technique.HYBRID):
        assert p[t].components.pre_dump_bytes > 0.5 * p[t].transferred_bytes


def test_paper_high_dirty_rate_on_slow_link_inflates_precopy_and_hybrid() -> None:
    a, b = paper("A"), paper("B")
    for t in (Technique.PRECOPY, Technique.HYBRID):
        assert b[t].total_time > 1.2 * a[t].total_time
        assert b[t].transferred_bytes > 1.2 * b[Technique.COLD].transferred_bytes
    # the dump grows for pre-copy, the faulted pages for hybrid (Table 1)
    assert (
        b[Technique.PRECOPY].components.dump_bytes > 10 * a[Technique.PRECOPY].components.dump_bytes
    )
    assert (
        b[Technique.HYBRID].components.faulted_pages_bytes
        > 10 * a[Technique.HYBRID].components.faulted_pages_bytes
    )
    # pre-copy's downtime is far above post-copy's and hybrid's under B (section 5.2.2)
    assert b[Technique.PRECOPY].downtime > 5 * b[Technique.POSTCOPY].downtime
    assert b[Technique.PRECOPY].downtime > 5 * b[Technique.HYBRID].downtime


def test_paper_higher_dirty_rate_on_fast_link_has_no_evident_effect() -> None:
    c, d = paper("C"), paper("D")
    for t in Technique:
        assert d[t].total_time == pytest.approx(c[t].total_time, rel=0.35), t
        assert d[t].downtime == pytest.approx(c[t].downtime, abs=1.0), t


@pytest.mark.parametrize("cfg", "CD")
def test_paper_live_techniques_have_similar_downtimes_on_fast_link(cfg: str) -> None:
    p = paper(cfg)
    live = [p[t].downtime for t in (Technique.PRECOPY, Technique.POSTCOPY, Technique.HYBRID)]
    # next to cold's the three are alike: each well under a sixth of it, within 1.5 s of each other
    assert max(live) - min(live) < 1.5
    assert p[Technique.COLD].downtime > 6 * max(live)


def test_paper_postcopy_and_hybrid_downtime_unaffected_by_dirty_rate() -> None:
    a, b = paper("A"), paper("B")
    assert b[Technique.POSTCOPY].downtime == pytest.approx(a[Technique.POSTCOPY].downtime)
    assert b[Technique.HYBRID].downtime == pytest.approx(a[Technique.HYBRID].downtime, abs=0.5)


def test_paper_postcopy_slower_than_precopy_on_slow_link_with_low_dirty_rate() -> None:
    p = paper("A")
    assert p[Technique.POSTCOPY].total_time > p[Technique.PRECOPY].total_time


def test_paper_postcopy_resumes_fastest() -> None:
    for cfg in "ABCD":
        p = paper(cfg)
        assert all(
            p[Technique.POSTCOPY].components.resume_time <= q.components.resume_time
            for q in p.values()
        )


def test_paper_precopy_phase_lengths() -> None:
    # "tens of seconds with the lowest throughput and only few seconds with the highest one"
    slow = paper("A")[Technique.PRECOPY].components.pre_dump_transfer_time
    fast = paper("C")[Technique.PRECOPY].components.pre_dump_transfer_time
    assert 20 < slow < 100
    assert fast < 15
    assert slow / fast == pytest.approx(72.41 / 11.34, rel=0.05)


# --- calibration -----------------------------------------------------------------------------

TRUE = CostConstants(
    dump_fixed_s=0.3,
    freeze_s_per_gib=4.0,
    delta_s_per_gib=1.2,
    restore_fixed_s=0.5,
    restore_s_per_gib=3.0,
    rebuild_s_per_gib=0.8,
    image_overhead_bytes=40_000,
    lazy_dump_bytes=1_500_000,
    lazy_warm_bytes=3_000_000,
    throughput_efficiency=0.8,
    transfer_round_trips=1.0,
    demand_faults=120,
)


def _measured_samples(k: CostConstants) -> list[CalibrationSample]:
    samples = []
    links = (LAN, WAN, LinkConditions.from_mbit(30, 40))
    rules = PrecopyStopRules(max_rounds=3)
    for s in (20 * MB, 60 * MB, 150 * MB):
        for rate in (1e4, 3e5):
            for link in links:
                for caps in (DELTA, NATIVE):
                    svc = ServiceConditions(state_bytes=s, dirty_rate_bytes_per_s=rate)
                    for t, p in predict_all(
                        svc, link, source=caps, stop_rules=rules, constants=k
                    ).items():
                        samples.append(
                            CalibrationSample(
                                technique=t,
                                service=svc,
                                link=link,
                                measured=p.components,
                                native_predump=caps.native_predump,
                                precopy_rounds=max(1, len(p.rounds)),
                            )
                        )
    return samples


def test_fit_recovers_the_constants_that_produced_the_measurements() -> None:
    fitted = fit_constants(_measured_samples(TRUE), base=CostConstants())
    for name, want in TRUE.to_dict().items():
        got = getattr(fitted, name)
        if name in ("lazy_chunk_bytes", "lazy_max_chunk_bytes"):
            assert got == want
        elif name == "demand_faults":
            assert got == pytest.approx(want, abs=3), name
        else:
            assert got == pytest.approx(want, rel=0.02, abs=1e-6), name


def test_fit_without_samples_keeps_the_base() -> None:
    base = CostConstants(demand_faults=42)
    assert fit_constants([], base=base) == base


def test_fit_only_touches_what_the_samples_exercise() -> None:
    cold_only = [s for s in _measured_samples(TRUE) if s.technique is Technique.COLD]
    base = CostConstants()
    fitted = fit_constants(cold_only, base=base)
    # lazy transfers and the lazy dump never occurred: they keep their base values
    assert fitted.demand_faults == base.demand_faults
    assert fitted.lazy_dump_bytes == base.lazy_dump_bytes
    assert fitted.delta_s_per_gib == base.delta_s_per_gib
    assert fitted.image_overhead_bytes == TRUE.image_overhead_bytes
    assert fitted.throughput_efficiency == pytest.approx(TRUE.throughput_efficiency, rel=0.02)


def test_fitted_constants_predict_the_measurements() -> None:
    samples = _measured_samples(TRUE)
    fitted = fit_constants(samples)
    svc = ServiceConditions(state_bytes=80 * MB, dirty_rate_bytes_per_s=1e5)
    for t in Technique:
        want = predict(t, svc, LAN, source=DELTA, constants=TRUE)
        got = predict(t, svc, LAN, source=DELTA, constants=fitted)
        assert got.total_time == pytest.approx(want.total_time, rel=0.03), t
        assert got.downtime == pytest.approx(want.downtime, rel=0.03), t


def test_hybrid_final_dump_ships_the_lazy_dump_memory() -> None:
    k = CostConstants(lazy_dump_bytes=2_000_000, image_overhead_bytes=10_000)
    svc = ServiceConditions(state_bytes=30 * MB, dirty_rate_bytes_per_s=1e5)
    hybrid = predict(Technique.HYBRID, svc, WAN, source=DELTA, constants=k)
    postcopy = predict(Technique.POSTCOPY, svc, WAN, source=DELTA, constants=k)
    assert hybrid.components.dump_bytes == postcopy.components.dump_bytes == 2_010_000


def test_postcopys_copy_ahead_adds_to_its_total_not_its_downtime() -> None:
    svc = ServiceConditions(state_bytes=80 * MB, dirty_rate_bytes_per_s=1e4)
    plain = predict(Technique.POSTCOPY, svc, WAN, source=DELTA, constants=CostConstants())
    warm = predict(
        Technique.POSTCOPY, svc, WAN, source=DELTA, constants=CostConstants(lazy_warm_bytes=3 * MB)
    )
    assert plain.components.pre_dump_bytes == 0
    assert warm.components.pre_dump_bytes == 3 * MB
    assert warm.total_time > plain.total_time
    assert warm.downtime == plain.downtime


def test_lazy_restores_pay_round_trips_before_resuming() -> None:
    svc = ServiceConditions(state_bytes=30 * MB, dirty_rate_bytes_per_s=1e4)
    k0, k8 = CostConstants(), CostConstants(lazy_resume_round_trips=8.0)
    for t in Technique:
        extra = (
            predict(t, svc, WAN, source=DELTA, constants=k8).components.resume_time
            - predict(t, svc, WAN, source=DELTA, constants=k0).components.resume_time
        )
        assert extra == pytest.approx(8 * WAN.rtt_s if t.lazy else 0.0), t


def test_fit_recovers_the_round_trips_of_a_lazy_restore() -> None:
    from dataclasses import replace

    true = replace(TRUE, lazy_resume_round_trips=8.0)
    fitted = fit_constants(_measured_samples(true))
    assert fitted.lazy_resume_round_trips == pytest.approx(8.0, rel=0.02)
    assert fitted.demand_faults == pytest.approx(true.demand_faults, abs=3)
