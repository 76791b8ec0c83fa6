"""Calibrates the cost model's constants from measured migrations.

``fit_constants`` fits the per-byte and per-request constants of
:class:`~fogmig.policies.costmodel.CostConstants` by least squares over
:class:`CalibrationSample` s (one measured migration each); constants the samples do not
exercise keep their base value. ``constants_document`` and ``parse_constants_document`` are the
JSON form of a constants file, the one the controller loads.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from fogmig.platform.base.vocabulary import PAGE_SIZE, Technique
from fogmig.policies.conditions import InvalidConditionsError, LinkConditions, ServiceConditions
from fogmig.policies.costmodel import (
    CostConstants,
    MigrationComponents,
    gib,
    lazy_requests,
)


@dataclass(frozen=True, slots=True)
class CalibrationSample:
    """One measured migration: its conditions and the nine metrics it produced."""

    technique: Technique
    service: ServiceConditions
    link: LinkConditions
    measured: MigrationComponents
    native_predump: bool = False
    precopy_rounds: int = 1


def _fit_linear(
    rows: Sequence[tuple[Sequence[float], float]],
    names: Sequence[str],
    base: dict[str, float],
) -> dict[str, float]:
    """Least squares for non-negative coefficients ``names``; columns the rows never exercise,
    or that the rows cannot separate, keep their ``base`` value."""
    if not rows:
        return {}
    x = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=float)
    active = [i for i in range(len(names)) if np.any(x[:, i] != 0.0)]
    fixed = [i for i in range(len(names)) if i not in active]
    for i in fixed:
        y = y - x[:, i] * base[names[i]]
    if not active:
        return {}
    xa = x[:, active]
    if np.linalg.matrix_rank(xa) < len(active):
        return {}
    coef, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return {names[i]: max(0.0, float(c)) for i, c in zip(active, coef, strict=True)}


def _solve_demand_faults(nbytes: int, extra_s: float, rtt_s: float, k: CostConstants) -> int:
    """The demand-fault count that makes the lazy transfer's round trips take ``extra_s``."""
    target = extra_s / rtt_s
    lo, hi = 0, max(1, math.ceil(nbytes / PAGE_SIZE))
    while lo < hi:
        mid = (lo + hi) // 2
        if lazy_requests(nbytes, k, demand_faults=mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _fit_demand_faults(lazy: Sequence[tuple[int, float, float]], k: CostConstants) -> int:
    """The demand-fault count whose round trips best explain the lazy transfers' extra time
    (least squares in seconds over (bytes, extra seconds, RTT)). Each transfer alone would be
    explained by one count; the best common one lies between the smallest and the largest."""
    alone = [_solve_demand_faults(n, extra, rtt, k) for n, extra, rtt in lazy]
    lo, hi = min(alone), max(alone)
    step = max(1, (hi - lo) // 2000)

    def sse(f: int) -> float:
        return sum(
            (lazy_requests(n, k, demand_faults=f) * rtt - extra) ** 2 for n, extra, rtt in lazy
        )

    best = min(range(lo, hi + 1, step), key=sse)
    if step > 1:
        best = min(range(max(lo, best - step), min(hi, best + step) + 1), key=sse)
    return best


def fit_constants(
    samples: Iterable[CalibrationSample], base: CostConstants | None = None
) -> CostConstants:
    """Fit the constants to measured migrations; what the samples cannot determine stays at
    ``base``. Transfer rows fit throughput efficiency and per-transfer round trips; dump,
    pre-dump and resume rows fit the fixed costs and per-GiB rates (and the round trips of a
    lazy restore); dump sizes fit the image overheads; lazy transfers fit the number of demand
    faults."""
    k = base if base is not None else CostConstants()
    items = list(samples)
    if not items:
        return k
    updates: dict[str, float] = {}

    # transfers: time = bytes/B * (1/efficiency) + transfers * RTT * round_trips
    xfer_rows: list[tuple[list[float], float]] = []
    for smp in items:
        m, b, rtt = smp.measured, smp.link.throughput_bytes_per_s, smp.link.rtt_s
        if m.pre_dump_bytes > 0 and m.pre_dump_transfer_time > 0:
            xfer_rows.append(
                ([m.pre_dump_bytes / b, smp.precopy_rounds * rtt], m.pre_dump_transfer_time)
            )
        if m.dump_bytes > 0 and m.dump_transfer_time > 0:
            xfer_rows.append(([m.dump_bytes / b, rtt], m.dump_transfer_time))
    inv = _fit_linear(
        xfer_rows,
        ["inv_efficiency", "transfer_round_trips"],
        {
            "inv_efficiency": 1 / k.throughput_efficiency,
            "transfer_round_trips": k.transfer_round_trips,
        },
    )
    if inv.get("inv_efficiency", 0.0) > 0.0:
        updates["throughput_efficiency"] = min(1.0, 1.0 / inv["inv_efficiency"])
    if "transfer_round_trips" in inv:
        updates["transfer_round_trips"] = inv["transfer_round_trips"]

    # image sizes
    cold_overheads = [
        smp.measured.dump_bytes - smp.service.state_bytes
        for smp in items
        if smp.technique is Technique.COLD and smp.measured.dump_bytes > 0
    ]
    if cold_overheads:
        updates["image_overhead_bytes"] = max(0, round(statistics.median(cold_overheads)))
    overhead = int(updates.get("image_overhead_bytes", k.image_overhead_bytes))
    lazy_sizes = [
        smp.measured.dump_bytes - overhead
        for smp in items
        if smp.technique is Technique.POSTCOPY and smp.measured.dump_bytes > 0
    ]
    if lazy_sizes:
        updates["lazy_dump_bytes"] = max(0, round(statistics.median(lazy_sizes)))
    warm_sizes = [
        smp.measured.pre_dump_bytes
        for smp in items
        if smp.technique is Technique.POSTCOPY and smp.measured.pre_dump_bytes > 0
    ]
    if warm_sizes:
        updates["lazy_warm_bytes"] = round(statistics.median(warm_sizes))

    # checkpoints: time = n * fixed + written_gib * freeze + compared_gib * delta
    dump_rows: list[tuple[list[float], float]] = []
    # restores: time = fixed + eager_gib * rate + rebuilt_gib * rebuild
    resume_rows: list[tuple[list[float], float]] = []
    for smp in items:
        m, s = smp.measured, smp.service.state_bytes
        native = smp.native_predump
        payload = max(0, m.dump_bytes - overhead)
        if smp.technique is Technique.COLD:
            written, compared, eager, rebuilt = s, 0, s, 0
        elif smp.technique is Technique.PRECOPY:
            written, compared = (payload, 0) if native else (s, s)
            eager, rebuilt = s, (0 if native else s)
        elif smp.technique is Technique.POSTCOPY:
            written, compared, eager, rebuilt = payload, 0, payload, 0
        else:
            written, compared = payload, (0 if native else s)
            eager, rebuilt = max(0, s - m.faulted_pages_bytes), (0 if native else s)
        if m.dump_time > 0:
            dump_rows.append(([1.0, gib(written), gib(compared)], m.dump_time))
        if m.resume_time > 0:
            lazy_rtt = smp.link.rtt_s if smp.technique.lazy else 0.0
            resume_rows.append(([1.0, gib(eager), gib(rebuilt), lazy_rtt], m.resume_time))
        if smp.technique.precopy_rounds and m.pre_dump_time > 0:
            n = max(1, smp.precopy_rounds)
            if native:
                dump_rows.append(([float(n), gib(m.pre_dump_bytes), 0.0], m.pre_dump_time))
            else:
                dump_rows.append(([float(n), gib(n * s), gib((n - 1) * s)], m.pre_dump_time))
    updates.update(
        _fit_linear(
            dump_rows,
            ["dump_fixed_s", "freeze_s_per_gib", "delta_s_per_gib"],
            {
                "dump_fixed_s": k.dump_fixed_s,
                "freeze_s_per_gib": k.freeze_s_per_gib,
                "delta_s_per_gib": k.delta_s_per_gib,
            },
        )
    )
    updates.update(
        _fit_linear(
            resume_rows,
            [
                "restore_fixed_s",
                "restore_s_per_gib",
                "rebuild_s_per_gib",
                "lazy_resume_round_trips",
            ],
            {
                "restore_fixed_s": k.restore_fixed_s,
                "restore_s_per_gib": k.restore_s_per_gib,
                "rebuild_s_per_gib": k.rebuild_s_per_gib,
                "lazy_resume_round_trips": k.lazy_resume_round_trips,
            },
        )
    )

    # lazy transfers: time = bytes / (efficiency * B) + requests(demand_faults) * RTT
    k_eff = replace(
        k, throughput_efficiency=updates.get("throughput_efficiency", k.throughput_efficiency)
    )
    lazy: list[tuple[int, float, float]] = []
    for smp in items:
        m, link = smp.measured, smp.link
        if not smp.technique.lazy or m.faulted_pages_bytes <= 0 or link.rtt_s <= 0:
            continue
        stream = m.faulted_pages_bytes / (link.throughput_bytes_per_s * k_eff.throughput_efficiency)
        extra = m.faulted_pages_transfer_time - stream
        if extra > 0:
            lazy.append((m.faulted_pages_bytes, extra, link.rtt_s))
    if lazy:
        updates["demand_faults"] = _fit_demand_faults(lazy, k_eff)

    ints = {f.name for f in fields(CostConstants) if f.type in ("int", int)}
    changes: dict[str, Any] = {n: (round(v) if n in ints else v) for n, v in updates.items()}
    return replace(k, **changes)


# ---------------------------------------------------------------------------------------------
# The constants file: what ``fogmig calibrate`` writes and the controller loads

CONSTANTS_KIND = "fogmig-cost-constants"
CONSTANTS_VERSION = 1


def constants_document(k: CostConstants, *, about: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of a constants file: every constant, and what they were fitted from."""
    return {
        "kind": CONSTANTS_KIND,
        "version": CONSTANTS_VERSION,
        "constants": k.to_dict(),
        "about": dict(about or {}),
    }


def parse_constants_document(doc: object, source: str) -> CostConstants:
    """The constants of a constants file's document, strictly: an unknown or non-numeric
    constant is an error rather than a silent default. Constants the document leaves out keep
    the model's defaults (a hand-written file may set only a few)."""
    hint = "write it with `fogmig calibrate RECORDS_DIR --out FILE`"
    if not isinstance(doc, dict):
        raise InvalidConditionsError(f"{source} is not a JSON object", hint=hint)
    if doc.get("kind") != CONSTANTS_KIND:
        raise InvalidConditionsError(
            f"{source} is not a cost constants file (kind {doc.get('kind')!r}, "
            f"expected {CONSTANTS_KIND!r})",
            hint=hint,
        )
    if doc.get("version") != CONSTANTS_VERSION:
        raise InvalidConditionsError(
            f"{source} has version {doc.get('version')!r}; this fogmig reads version "
            f"{CONSTANTS_VERSION}",
            hint=hint,
        )
    raw = doc.get("constants")
    if not isinstance(raw, dict):
        raise InvalidConditionsError(f"{source} has no 'constants' object", hint=hint)
    known = {f.name: f for f in fields(CostConstants)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InvalidConditionsError(
            f"{source} has unknown constants: {', '.join(unknown)}",
            hint=f"known constants: {', '.join(known)}",
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidConditionsError(
                f"{source}: constant {name} must be a number, got {value!r}", hint=hint
            )
        if known[name].type in ("int", int):
            if not float(value).is_integer():
                raise InvalidConditionsError(
                    f"{source}: constant {name} must be a whole number, got {value!r}", hint=hint
                )
            values[name] = int(value)
        else:
            values[name] = float(value)
    try:
        return CostConstants(**values)
    except InvalidConditionsError as exc:
        raise InvalidConditionsError(f"{source}: {exc}", hint=hint) from exc
