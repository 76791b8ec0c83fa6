"""How the controller moves one service: the technique the cost model picks for the move, the
command that carries it to the source's agent and the decision published alongside it, with the
prediction and every input it was made from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from fogmig.platform.bus.schemas import Decision, MigrateCommand, NodeStatus, ServiceInfo
from fogmig.platform.controller.actions import PendingMove
from fogmig.platform.controller.config import ControllerConfig
from fogmig.policies.choice import Decision as TechniqueDecision
from fogmig.policies.choice import choose_technique
from fogmig.policies.conditions import LinkConditions, Objective, ServiceConditions
from fogmig.policies.costmodel import Prediction

_TEXT_MAX: Final = 4096  # the bus's limit for free text


def _numbers(p: Prediction) -> dict[str, float]:
    return {
        "downtime_s": p.downtime,
        "total_time_s": p.total_time,
        "transferred_bytes": float(p.transferred_bytes),
    }


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 3] + "..."


def decide_move(
    move: PendingMove,
    source: str,
    src: NodeStatus,
    dst: NodeStatus,
    *,
    info: ServiceInfo | None,
    config: ControllerConfig,
    objective: Objective,
    new_id: Callable[[], str],
    wall: Callable[[], float],
) -> tuple[MigrateCommand, Decision, TechniqueDecision]:
    """The technique for ``move`` and the command and decision that carry it.

    ``info`` is what the source reports of the service (``None``: assume the configured
    defaults); ``new_id`` names the command and ``wall`` stamps the decision.
    """
    cfg = config
    service, target = move.service, move.target
    conditions = ServiceConditions(
        state_bytes=info.state_bytes if info is not None else cfg.default_state_bytes,
        dirty_rate_bytes_per_s=info.dirty_rate_bytes_per_s if info is not None else 0.0,
    )
    link, link_source = cfg.default_link, "profile"
    for m in src.links:
        # Slower than a byte a second is no measurement of a link, only of its absence.
        if m.peer == target and m.throughput_bytes_per_s >= 1.0:
            link = LinkConditions(throughput_bytes_per_s=m.throughput_bytes_per_s, rtt_s=m.rtt_s)
            link_source = "measured"
    choice = choose_technique(
        conditions,
        link,
        src.capabilities,
        dst.capabilities,
        objective,
        cfg.stop_rules,
        constants=cfg.cost_constants,
    )
    reason = _clip(f"{move.detail}; {choice.reason}")
    predicted: dict[str, Any] = {
        **_numbers(choice.prediction),
        "objective": objective.name,
        "ranking": [t.value for t in choice.ranking],
        "alternatives": {t.value: _numbers(p) for t, p in choice.predictions.items()},
        "excluded": {t.value: why for t, why in choice.excluded.items()},
        "inputs": {
            **conditions.to_dict(),
            **link.to_dict(),
            "link_source": link_source,
            "service_source": "status" if info is not None else "default",
        },
    }
    technique = choice.technique
    command = MigrateCommand(
        command_id=new_id(),
        service=service,
        destination=target,
        technique=technique,
        compression=cfg.compression,
        precopy=cfg.stop_rules,
        reason=reason,
    )
    decision = Decision(
        service=service,
        source=source,
        destination=target,
        technique=technique,
        reason=reason,
        predicted=predicted,
        trigger=move.trigger,
        at=wall(),
    )
    return command, decision, choice
