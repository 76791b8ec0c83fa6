"""The verdicts on the paper's findings, decided from recorded runs and from made-up ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fogmig.experiments.claims import CLAIMS, TECHNIQUES
from fogmig.experiments.compare import (
    Check,
    Claim,
    Status,
    View,
    aggregate,
    comparable,
    higher,
    significantly_higher,
)
from fogmig.experiments.stats import Estimate, Summary
from fogmig.experiments.store import RunRecord
from fogmig.experiments.verdicts import decide_all, tally


def _verdicts(runs: list[RunRecord]) -> dict[str, tuple[Status, list[Check]]]:
    return {v.claim.id: (v.status, v.checks) for v in decide_all(Summary(runs))}


def test_every_claim_has_a_unique_id_and_names_where_the_paper_says_it() -> None:
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids))
    for claim in CLAIMS:
        assert re.fullmatch(r"Table 4 / [a-z-]+ / [a-z ]+|5\.2\.[1-4]", claim.source), claim
    # Every cell of the summary table: four techniques x three metrics.
    assert sum(c.source.startswith("Table 4") for c in CLAIMS) == 12


def test_comparison_rules() -> None:
    a, b = Estimate(3, 10.0, 0.5), Estimate(3, 11.0, 0.4)
    assert comparable(a, b, "total_time_s")  # within 15%
    far = Estimate(3, 20.0, 0.5)
    assert not comparable(a, far, "total_time_s")
    assert higher(far, a, "total_time_s")
    assert not higher(a, far, "total_time_s")
    assert significantly_higher(far, a, "total_time_s")
    # Small values: a tenth of a second apart is comparable whatever the ratio.
    assert comparable(Estimate(3, 0.1, 0.0), Estimate(3, 0.3, 0.0), "dump_time_s")
    # Overlapping intervals are comparable even beyond the margin.
    assert comparable(Estimate(3, 10.0, 3.0), Estimate(3, 14.0, 2.0), "total_time_s")
    assert not comparable(Estimate(0, float("nan"), 0.0), a, "total_time_s")


def test_a_verdict_holds_only_when_every_check_passes() -> None:
    yes, no = Check("A", True, ""), Check("B", False, "")
    assert aggregate([yes, yes]) is Status.HOLDS
    assert aggregate([yes, no]) is Status.PARTLY
    assert aggregate([no]) is Status.FAILS
    assert aggregate([]) is Status.NO_DATA


def test_the_recorded_runs_confirm_cold_and_live_downtimes(
    evaluation_runs: list[RunRecord],
) -> None:
    v = _verdicts(evaluation_runs)
    assert v["T4-cold-time"][0] is Status.HOLDS
    assert v["T4-cold-downtime"][0] is Status.HOLDS
    assert v["L-cold-avoid"][0] is Status.HOLDS
    assert v["S-container-overhead"][0] is Status.HOLDS


def test_the_recorded_runs_contradict_hybrid_as_always_slowest_only_on_the_slow_link(
    evaluation_runs: list[RunRecord],
) -> None:
    status, checks = _verdicts(evaluation_runs)["T4-hybrid-time"]
    assert status is Status.PARTLY
    assert {c.configuration: c.ok for c in checks} == {"A": False, "C": True, "D": True}
    a = next(c for c in checks if c.configuration == "A")
    # The numbers behind it are printed: hybrid 109.31 s against post-copy 130.23 s.
    assert "hybrid 109.31 s" in a.detail
    assert "postcopy 130.23 s" in a.detail


def test_postcopy_resumes_slowest_here_and_the_claim_fails_everywhere(
    evaluation_runs: list[RunRecord],
) -> None:
    status, checks = _verdicts(evaluation_runs)["S-resume-postcopy-shortest"]
    assert status is Status.FAILS
    assert len(checks) == 3


def test_claims_about_configuration_b_have_no_data_without_its_runs(
    evaluation_runs: list[RunRecord],
) -> None:
    v = _verdicts(evaluation_runs)
    for cid in ("T4-precopy-data", "T4-hybrid-data", "S-AB-precopy-hybrid-time", "S-data-B-parts"):
        assert v[cid] == (Status.NO_DATA, []), cid
    # A claim over A-D is decided on the configurations present.
    assert {c.configuration for c in v["T4-cold-time"][1]} == {"A", "C", "D"}


def _scaled(
    runs: list[RunRecord], configuration: str, technique: str, **factors: float
) -> list[RunRecord]:
    out = []
    for r in runs:
        if r.configuration == configuration and r.technique == technique:
            fields = {k: getattr(r.record, k) * f for k, f in factors.items()}
            out.append(r.model_copy(update={"record": r.record.model_copy(update=fields)}))
        else:
            out.append(r)
    return out


def test_a_made_up_slow_hybrid_in_a_turns_the_verdict(evaluation_runs: list[RunRecord]) -> None:
    slower = _scaled(evaluation_runs, "A", "hybrid", faulted_pages_transfer_time_s=3.0)
    assert _verdicts(slower)["T4-hybrid-time"][0] is Status.HOLDS


def test_a_made_up_slow_cold_in_c_breaks_the_lowest_claim(
    evaluation_runs: list[RunRecord],
) -> None:
    # Cold in C made slower than every other technique there.
    slower = _scaled(evaluation_runs, "C", "cold", dump_transfer_time_s=2.0)
    status, checks = _verdicts(slower)["T4-cold-time"]
    assert status is Status.PARTLY
    assert [c.configuration for c in checks if not c.ok] == ["C"]


def test_a_baseline_engine_gets_its_own_verdicts(evaluation_runs: list[RunRecord]) -> None:
    baseline = [r.model_copy(update={"engine": "runc-rsync"}) for r in evaluation_runs]
    summary = Summary([*evaluation_runs, *baseline])
    ours = decide_all(summary)
    theirs = decide_all(summary, engine="runc-rsync")
    assert [v.status for v in ours] == [v.status for v in theirs]
    assert tally(ours)[Status.HOLDS] > 0
    assert View(summary, "runc-rsync").configurations() == ["A", "C", "D"]
    assert set(TECHNIQUES) == {g.technique for g in summary.groups}


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_every_claim_that_fails_here_says_why(
    claim: Claim, evaluation_runs: list[RunRecord]
) -> None:
    status = _verdicts(evaluation_runs)[claim.id][0]
    if status in (Status.FAILS, Status.PARTLY):
        assert claim.differs


def test_the_documentation_lists_every_claim_as_the_code_checks_it() -> None:
    text = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    for claim in CLAIMS:
        assert f"| {claim.id} | {claim.source} | {claim.statement} |" in text, claim.id
