"""The paper's findings, in this project's words, each with the function that checks it.

``T4-*`` are the cells of the paper's summary table (technique x total time, downtime,
transferred data); ``S-*`` are the further statements of its results section (section 5.2),
including its closing lessons (``L-*``); a statement of section 5.2 that only repeats a cell of
the summary table is checked once, under the table. Configurations are named as the paper
names them: in A and B the dirty rate reaches the slow link's order of magnitude (B) or the
pre-copy phase is long (A); in C and D the dirty rate is orders of magnitude below a fast link.
"""

from __future__ import annotations

from typing import Final

from fogmig.experiments.claim_checks import (
    CHANNEL,
    DELTAS,
    DIRTY,
    FAST_NODES,
    LAZY_SETUP,
    PRECOPY_SHORT_DUMP,
    SMALL,
    STREAMED,
    TECHNIQUES,
    across,
    approaches_cold,
    beyond_state,
    cold_coincides,
    dump_bound,
    every,
    exec_state,
    largest_component,
    limited_increase,
    local_negligible,
    low_downtime,
    rank,
    rtt_penalty,
)
from fogmig.experiments.compare import Claim

__all__ = ["CLAIMS", "TECHNIQUES"]

CLAIMS: Final[list[Claim]] = [
    # --- Table 4: cold ---
    Claim(
        "T4-cold-time",
        "Table 4 / cold / total time",
        "Cold migration has the lowest total migration time in every configuration.",
        rank("total_time_s", "cold", "lowest"),
        differs=STREAMED,
    ),
    Claim(
        "T4-cold-downtime",
        "Table 4 / cold / downtime",
        "Cold migration has the highest downtime in every configuration, and its downtime "
        "equals its total migration time.",
        every(rank("downtime_s", "cold", "highest"), cold_coincides),
    ),
    Claim(
        "T4-cold-data",
        "Table 4 / cold / transferred data",
        "Cold migration transfers the least data in every configuration, comparable to post-copy.",
        every(
            rank("transferred_mb", "cold", "comparable or lower"),
            rank("transferred_mb", "cold", "comparable", ("postcopy",)),
        ),
        differs=DIRTY,
    ),
    # --- Table 4: pre-copy ---
    Claim(
        "T4-precopy-time",
        "Table 4 / pre-copy / total time",
        "Pre-copy's total time is comparable to or lower than post-copy's where the dirty rate "
        "is orders of magnitude below the throughput (A, C, D) and higher where it reaches the "
        "throughput's order (B).",
        every(
            rank("total_time_s", "precopy", "comparable or lower", ("postcopy",), ("A", "C", "D")),
            rank("total_time_s", "precopy", "higher", ("postcopy",), ("B",)),
        ),
        differs=STREAMED + "; " + DELTAS,
    ),
    Claim(
        "T4-precopy-downtime",
        "Table 4 / pre-copy / downtime",
        "Pre-copy's downtime is higher than post-copy's and hybrid's where the dirty rate reaches "
        "the throughput's order or the pre-copy phase is long (A, B).",
        rank("downtime_s", "precopy", "higher", ("postcopy", "hybrid"), ("A", "B")),
        differs=PRECOPY_SHORT_DUMP,
    ),
    Claim(
        "T4-precopy-data",
        "Table 4 / pre-copy / transferred data",
        "Pre-copy transfers much more data than cold and post-copy where the dirty rate reaches "
        "the throughput's order (B).",
        rank("transferred_mb", "precopy", "much higher", ("cold", "postcopy"), ("B",)),
        differs=DELTAS,
    ),
    # --- Table 4: post-copy ---
    Claim(
        "T4-postcopy-time",
        "Table 4 / post-copy / total time",
        "Post-copy's total time is higher than cold's (the more so the longer the RTT), "
        "comparable to or higher than pre-copy's in A, C and D, and lower than pre-copy's in B.",
        every(
            rank("total_time_s", "postcopy", "higher", ("cold",)),
            rtt_penalty,
            rank("total_time_s", "postcopy", "comparable or higher", ("precopy",), ("A", "C", "D")),
            rank("total_time_s", "postcopy", "lower", ("precopy",), ("B",)),
        ),
        differs=STREAMED,
    ),
    Claim(
        "T4-postcopy-downtime",
        "Table 4 / post-copy / downtime",
        "Post-copy's downtime is always low and comparable to hybrid's.",
        every(
            low_downtime("postcopy"),
            rank("downtime_s", "postcopy", "comparable", ("hybrid",)),
        ),
        differs=FAST_NODES,
    ),
    Claim(
        "T4-postcopy-data",
        "Table 4 / post-copy / transferred data",
        "Post-copy transfers the least data in every configuration, comparable to cold.",
        every(
            rank("transferred_mb", "postcopy", "comparable or lower"),
            rank("transferred_mb", "postcopy", "comparable", ("cold",)),
        ),
        differs=DIRTY,
    ),
    # --- Table 4: hybrid ---
    Claim(
        "T4-hybrid-time",
        "Table 4 / hybrid / total time",
        "Hybrid migration has the highest total migration time in every configuration.",
        rank("total_time_s", "hybrid", "highest"),
        differs=STREAMED + "; hybrid adds its pre-copy rounds to a lazy phase of its own",
    ),
    Claim(
        "T4-hybrid-downtime",
        "Table 4 / hybrid / downtime",
        "Hybrid's downtime is always low and comparable to post-copy's.",
        every(low_downtime("hybrid"), rank("downtime_s", "hybrid", "comparable", ("postcopy",))),
        differs=FAST_NODES,
    ),
    Claim(
        "T4-hybrid-data",
        "Table 4 / hybrid / transferred data",
        "Hybrid transfers much more data than cold and post-copy where the dirty rate reaches the "
        "throughput's order (B).",
        rank("transferred_mb", "hybrid", "much higher", ("cold", "postcopy"), ("B",)),
        differs=DELTAS,
    ),
    # --- Section 5.2.1: total migration time ---
    Claim(
        "S-local-negligible",
        "5.2.1",
        "Local steps (pre-dump, dump, resume) take little time next to the transfers.",
        local_negligible,
        differs=SMALL,
    ),
    Claim(
        "S-A-postcopy-over-precopy",
        "5.2.1",
        "In A, post-copy takes longer in total than pre-copy although it moves less data.",
        every(
            rank("total_time_s", "postcopy", "higher", ("precopy",), ("A",)),
            rank("transferred_mb", "postcopy", "less", ("precopy",), ("A",)),
        ),
        differs=STREAMED,
    ),
    Claim(
        "S-dirty-cold-postcopy-time",
        "5.2.1",
        "A higher dirty rate does not change the total times of cold and post-copy "
        "(A to B, C to D).",
        across("total_time_s", ("cold", "postcopy"), (("A", "B"), ("C", "D")), "comparable"),
        differs=DIRTY,
    ),
    Claim(
        "S-dirty-CD-time",
        "5.2.1",
        "From C to D the total times of pre-copy and hybrid do not change noticeably.",
        across("total_time_s", ("precopy", "hybrid"), (("C", "D"),), "comparable"),
        differs=DIRTY,
    ),
    Claim(
        "S-CD-precopy-like-postcopy",
        "5.2.1",
        "In C and D pre-copy's total time is similar to post-copy's.",
        rank("total_time_s", "precopy", "comparable", ("postcopy",), ("C", "D")),
        differs=CHANNEL,
    ),
    Claim(
        "S-AB-precopy-hybrid-time",
        "5.2.1",
        "From A to B the total times of pre-copy and hybrid grow markedly.",
        across("total_time_s", ("precopy", "hybrid"), (("A", "B"),), "much higher"),
        differs=DELTAS,
    ),
    # --- Section 5.2.2: downtime ---
    Claim(
        "S-CD-downtime-similar",
        "5.2.2",
        "In C and D the downtimes of pre-copy, post-copy and hybrid are similar.",
        every(
            rank("downtime_s", "precopy", "comparable", ("postcopy", "hybrid"), ("C", "D")),
            rank("downtime_s", "postcopy", "comparable", ("hybrid",), ("C", "D")),
        ),
        differs=FAST_NODES,
    ),
    Claim(
        "S-CD-downtime-dirty",
        "5.2.2",
        "From C to D no technique's downtime changes noticeably.",
        across("downtime_s", TECHNIQUES, (("C", "D"),), "comparable"),
        differs=DIRTY,
    ),
    Claim(
        "S-B-precopy-downtime",
        "5.2.2",
        "In B pre-copy's downtime grows over A's and approaches cold's, and its total time "
        "exceeds cold's.",
        every(
            across("downtime_s", ("precopy",), (("A", "B"),), "much higher"),
            approaches_cold,
        ),
        differs=DELTAS,
    ),
    Claim(
        "S-lazy-downtime-stable",
        "5.2.2",
        "The downtimes of post-copy and hybrid do not depend on the link or the dirty rate "
        "(A against C, B against D).",
        across("downtime_s", ("postcopy", "hybrid"), (("C", "A"), ("D", "B")), "comparable"),
        differs=LAZY_SETUP,
    ),
    Claim(
        "S-dump-live-short",
        "5.2.2",
        "Dumps of the live techniques take at most a second (except pre-copy's in B).",
        dump_bound(exempt=False),
        differs=FAST_NODES,
    ),
    Claim(
        "S-dump-cold-long",
        "5.2.2",
        "Cold migration's dumps (and pre-copy's in B) take more than a second.",
        dump_bound(exempt=True),
        differs=FAST_NODES,
    ),
    Claim(
        "S-dump-dirty",
        "5.2.2",
        "A higher dirty rate does not lengthen dumps (C to D for all techniques, A to B for all "
        "but pre-copy).",
        every(
            across("dump_time_s", TECHNIQUES, (("C", "D"),), "comparable"),
            across("dump_time_s", ("cold", "postcopy", "hybrid"), (("A", "B"),), "comparable"),
        ),
        differs=DIRTY,
    ),
    Claim(
        "S-resume-postcopy-shortest",
        "5.2.2",
        "Post-copy resumes fastest.",
        rank("resume_time_s", "postcopy", "lowest"),
        differs=LAZY_SETUP,
    ),
    Claim(
        "S-resume-hybrid-long",
        "5.2.2",
        "Hybrid resumes more slowly than cold and pre-copy.",
        rank("resume_time_s", "hybrid", "higher", ("cold", "precopy")),
        differs=FAST_NODES + "; where the link is slow, setting up lazy paging dominates",
    ),
    Claim(
        "S-resume-cold-precopy",
        "5.2.2",
        "Cold and pre-copy resume in similar times (except pre-copy in B).",
        rank("resume_time_s", "precopy", "comparable", ("cold",), ("A", "C", "D")),
        differs=FAST_NODES,
    ),
    # --- Section 5.2.3: transferred data ---
    Claim(
        "S-data-components",
        "5.2.3",
        "Most of the data is the pre-dump for pre-copy and hybrid, the dump for cold and the "
        "faulted pages for post-copy.",
        largest_component,
        differs=DIRTY,
    ),
    Claim(
        "S-exec-state-small",
        "5.2.3",
        "The execution state (post-copy's dump) is a negligible part of the data moved.",
        exec_state,
        differs=SMALL,
    ),
    Claim(
        "S-container-overhead",
        "5.2.3",
        "A container moves more memory than the service allocates: every technique transfers "
        "more than the service's state.",
        beyond_state,
    ),
    Claim(
        "S-data-ACD-comparable",
        "5.2.3",
        "In A, C and D pre-copy and hybrid move amounts comparable to cold and post-copy.",
        every(
            rank("transferred_mb", "precopy", "comparable", ("cold", "postcopy"), ("A", "C", "D")),
            rank("transferred_mb", "hybrid", "comparable", ("cold", "postcopy"), ("A", "C", "D")),
        ),
        differs=DIRTY,
    ),
    Claim(
        "S-data-CD-limited",
        "5.2.3",
        "From C to D pre-copy and hybrid move more data, but not much more.",
        limited_increase,
        differs=DIRTY,
    ),
    Claim(
        "S-data-B-parts",
        "5.2.3",
        "From A to B pre-copy's dump and hybrid's faulted pages grow markedly.",
        every(
            across("dump_mb", ("precopy",), (("A", "B"),), "much higher"),
            across("faulted_pages_mb", ("hybrid",), (("A", "B"),), "much higher"),
        ),
        differs=DELTAS,
    ),
    # --- Section 5.2.4: lessons ---
    Claim(
        "L-cold-avoid",
        "5.2.4",
        "Cold migration's downtime is much higher than every other technique's everywhere.",
        rank("downtime_s", "cold", "much higher"),
    ),
    Claim(
        "L-precopy-CD",
        "5.2.4",
        "In C and D pre-copy performs like post-copy and hybrid (total time, downtime).",
        every(
            rank("total_time_s", "precopy", "comparable", ("postcopy", "hybrid"), ("C", "D")),
            rank("downtime_s", "precopy", "comparable", ("postcopy", "hybrid"), ("C", "D")),
        ),
        differs=CHANNEL,
    ),
    Claim(
        "L-postcopy-AB",
        "5.2.4",
        "In A and B post-copy has a downtime comparable to hybrid's, a lower total time and "
        "moves less data.",
        every(
            rank("downtime_s", "postcopy", "comparable", ("hybrid",), ("A", "B")),
            rank("total_time_s", "postcopy", "lower", ("hybrid",), ("A", "B")),
            rank("transferred_mb", "postcopy", "less", ("hybrid",), ("A", "B")),
        ),
        differs=STREAMED,
    ),
]
