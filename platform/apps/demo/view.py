"""The demo's live terminal view: nodes, devices, services, migrations under way, decisions.

:class:`DemoModel` folds the controller's and the devices' events into what is shown (pure, no
terminal); :class:`DemoView` draws it with rich's ``Live`` on a terminal, or prints one line
per noteworthy event when the output is not a terminal (a log, a test).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fogmig.device_sim.events import (
    ContinuityCheck,
    FleetEvent,
    MigrationSeen,
    Outage,
    RequestKind,
    RequestRecord,
    Roam,
)
from fogmig.platform.apps.demo.results import DemoSummary, MigrationRow
from fogmig.platform.base import fmt
from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.bus.schemas import NodeStatus
from fogmig.platform.controller.actions import ControllerEvent, EventKind

RECENT_LINES = 8

NodesSource = Callable[[], Mapping[str, NodeStatus]]
LocationSource = Callable[[str], "str | None"]


@dataclass(slots=True)
class DeviceView:
    service: str
    gateway: str = "-"
    last_latency_ms: float | None = None
    last_outcome: str = "-"
    ok: int = 0
    failed: int = 0
    checks: str = "-"


@dataclass(slots=True)
class MigrationView:
    service: str
    source: str
    destination: str
    technique: str
    phase: str = "asked"
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bytes_per_s: float = 0.0


class DemoModel:
    """What the live view shows; fed with events, read by :meth:`render`."""

    def __init__(
        self,
        *,
        devices: Mapping[str, str],
        duration_s: float,
        nodes: NodesSource | None = None,
        location: LocationSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.devices = {name: DeviceView(service) for name, service in devices.items()}
        self.duration_s = duration_s
        self.nodes_source: NodesSource = nodes or dict
        self.location: LocationSource = location or (lambda _s: None)
        self.migrating: dict[str, MigrationView] = {}
        self.recent: deque[tuple[float, str, str]] = deque(maxlen=RECENT_LINES)
        self.completed = 0
        self.failed = 0
        self.phase = "starting"
        self._clock = clock
        self._t0 = clock()

    def set_devices(self, devices: Mapping[str, str]) -> None:
        """Device -> its service, in the order the tables list them."""
        self.devices = {name: DeviceView(service) for name, service in devices.items()}

    def start_clock(self) -> None:
        self._t0 = self._clock()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._t0

    def _line(self, at: float, text: str, style: str = "") -> None:
        self.recent.append((at, text, style))

    # --- inputs ---------------------------------------------------------------------------

    def controller_event(self, event: ControllerEvent) -> str | None:
        """Apply ``event``; return the line it is worth in the event list, if any."""
        service = event.service
        data = event.data
        line: tuple[str, str] | None = None
        match event.kind:
            case EventKind.DECISION if service is not None:
                d = data.get("decision", {})
                self.migrating[service] = MigrationView(
                    service,
                    str(d.get("source", event.node)),
                    str(d.get("destination", "?")),
                    str(d.get("technique", "?")),
                )
                line = (event.message, "cyan")
            case EventKind.ACCEPTED if service in self.migrating:
                self.migrating[service].phase = "accepted"
            case EventKind.PROGRESS if service in self.migrating:
                m = self.migrating[service]
                m.phase = str(data.get("phase", m.phase))
                m.bytes_done = int(data.get("bytes_done", 0))
                m.bytes_total = int(data.get("bytes_total", 0))
                m.rate_bytes_per_s = float(data.get("rate_bytes_per_s", 0.0))
            case EventKind.DONE:
                if service is not None and not data.get("foreign"):
                    self.migrating.pop(service, None)
                if data.get("outcome") == Outcome.COMPLETED:
                    self.completed += 1
                    line = (event.message, "green")
                else:
                    self.failed += 1
                    line = (event.message, "red")
            case EventKind.REJECTED | EventKind.SEND_FAILED | EventKind.GAVE_UP | EventKind.LOST:
                if service is not None:
                    self.migrating.pop(service, None)
                line = (f"{event.kind.value}: {event.message}", "yellow")
            case EventKind.DRAIN_STARTED | EventKind.NODE_EMPTY | EventKind.DRAIN_ENDED:
                line = (event.message, "magenta")
            case _:
                pass
        if line is None:
            return None
        self._line(event.at, *line)
        return line[0]

    def fleet_event(self, event: FleetEvent) -> str | None:
        """Apply a device event; return its line for the event list, if it is worth one."""
        line: tuple[str, str] | None = None
        match event:
            case RequestRecord(request=RequestKind.POST):
                dv = self.devices.get(event.device)
                if dv is not None:
                    dv.gateway = event.gateway
                    dv.last_outcome = event.outcome.value
                    if event.ok:
                        dv.ok += 1
                        dv.last_latency_ms = event.latency_s * 1000
                    else:
                        dv.failed += 1
            case Roam():
                dv = self.devices.get(event.device)
                if dv is not None:
                    dv.gateway = event.to_gateway
                if event.from_gateway is not None:
                    text = f"{event.device} roamed {event.from_gateway} -> {event.to_gateway}"
                    line = (text, "bold")
            case Outage():
                line = (
                    f"{event.device} saw {event.service} down {event.downtime_s:.2f} s "
                    f"({event.failed} failed request(s))",
                    "yellow",
                )
            case ContinuityCheck():
                dv = self.devices.get(event.device)
                verdict = "ok" if event.verified and event.matches else "FAILED"
                if not event.verified:
                    verdict = "unverified"
                if dv is not None:
                    dv.checks = f"{verdict} ({event.reason}, {event.service_count})"
                if verdict != "ok" or event.reason != "periodic":
                    style = "green" if verdict == "ok" else "red"
                    line = (
                        f"{event.device} continuity ({event.reason}): {verdict}, "
                        f"{event.service_count} readings",
                        style,
                    )
            case MigrationSeen():
                pass  # the controller's done event says the same
            case _:
                pass
        if line is None:
            return None
        self._line(getattr(event, "at", time.time()), *line)
        return line[0]

    # --- drawing --------------------------------------------------------------------------

    def _nodes_table(self) -> Table:
        t = Table(title="nodes", title_justify="left", expand=True)
        for col in ("node", "online", "load", "mem free", "services", "draining"):
            t.add_column(col)
        for name, s in sorted(self.nodes_source().items()):
            t.add_row(
                name,
                "yes" if s.online else "[red]no[/]",
                f"{s.load:.2f}",
                fmt.megabytes(s.mem_free_bytes),
                ", ".join(sorted(i.name for i in s.services)) or "-",
                "[magenta]yes[/]" if s.draining else "no",
            )
        return t

    def _devices_table(self) -> Table:
        t = Table(title="devices", title_justify="left", expand=True)
        for col in (
            "device",
            "gateway",
            "service",
            "last latency",
            "last",
            "ok",
            "failed",
            "check",
        ):
            t.add_column(col)
        for name, d in self.devices.items():
            last = d.last_outcome if d.last_outcome in ("ok", "-") else f"[red]{d.last_outcome}[/]"
            t.add_row(
                name,
                d.gateway,
                d.service,
                "-" if d.last_latency_ms is None else f"{d.last_latency_ms:.1f} ms",
                last,
                str(d.ok),
                str(d.failed) if not d.failed else f"[yellow]{d.failed}[/]",
                escape(d.checks),
            )
        return t

    def _services_table(self) -> Table:
        t = Table(title="services", title_justify="left", expand=True)
        for col in ("service", "runs on", "device on", "state"):
            t.add_column(col)
        for name, d in self.devices.items():
            where = self.location(d.service) or "?"
            m = self.migrating.get(d.service)
            if m is not None:
                state = f"[cyan]migrating to {m.destination} ({m.technique}, {m.phase})[/]"
            elif where == d.gateway:
                state = "[green]with its device[/]"
            else:
                state = "[yellow]away from its device[/]"
            t.add_row(d.service, where, f"{d.gateway} ({name})", state)
        return t

    def _migrations_table(self) -> Table:
        t = Table(title="migrations in progress", title_justify="left", expand=True)
        for col in ("service", "move", "technique", "phase", "bytes", "rate"):
            t.add_column(col)
        for m in self.migrating.values():
            total = f" / {fmt.megabytes(m.bytes_total)}" if m.bytes_total else ""
            t.add_row(
                m.service,
                f"{m.source} -> {m.destination}",
                m.technique,
                m.phase,
                f"{fmt.megabytes(m.bytes_done)}{total}",
                f"{m.rate_bytes_per_s * 8 / 1e6:.1f} Mbit/s" if m.rate_bytes_per_s else "-",
            )
        if not self.migrating:
            t.add_row("-", "", "", "", "", "")
        return t

    def render(self) -> RenderableType:
        head = Text.assemble(
            ("fogmig demo ", "bold"),
            f"{self.phase}: {self.elapsed_s:5.1f} s of {self.duration_s:g} s; migrations ",
            (f"{self.completed} completed", "green"),
            ", ",
            (f"{self.failed} failed", "red" if self.failed else ""),
        )
        recent = Table(title="recent events", title_justify="left", expand=True, show_header=False)
        recent.add_column("at", width=8)
        recent.add_column("event")
        for at, text, style in self.recent:
            recent.add_row(
                time.strftime("%H:%M:%S", time.localtime(at)),
                Text(text, style=style, overflow="ellipsis", no_wrap=True),
            )
        return Group(
            head,
            self._nodes_table(),
            self._devices_table(),
            self._services_table(),
            self._migrations_table(),
            recent,
        )


class DemoView:
    """Live tables on a terminal, event lines otherwise; use as a context manager."""

    def __init__(self, model: DemoModel, console: Console, *, live: bool | None = None) -> None:
        self.model = model
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.live:
            # Refreshed by the caller's event loop (:meth:`refresh`), never by rich's own
            # thread: the model is only ever touched by the loop that feeds it.
            self._live = Live(
                get_renderable=self.model.render,
                console=self.console,
                auto_refresh=False,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def refresh(self) -> None:
        """Redraw the live tables (a no-op without them)."""
        if self._live is not None:
            self._live.refresh()

    async def refresh_every(self, seconds: float) -> None:
        """Redraw every ``seconds`` until cancelled."""
        while True:
            self.refresh()
            await asyncio.sleep(seconds)

    def say(self, text: str) -> None:
        """A message about the demo itself (set-up, clean-up)."""
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"[dim]{stamp}[/] {escape(text)}", highlight=False)

    def _print(self, line: str | None) -> None:
        if line is not None and not self.live:
            self.say(line)

    def controller_event(self, event: ControllerEvent) -> None:
        self._print(self.model.controller_event(event))

    def fleet_event(self, event: FleetEvent) -> None:
        self._print(self.model.fleet_event(event))

    def set_phase(self, phase: str) -> None:
        self.model.phase = phase


# --- the summary at the end ---------------------------------------------------------------------


def _probe(m: MigrationRow) -> str:
    if m.probe is None:
        return "-"
    return f"{fmt.duration(m.probe.downtime_s)}, {m.probe.lost} lost"


def summary_renderable(summary: DemoSummary) -> RenderableType:
    """The end-of-run summary: migrations (technique, why, downtime predicted against measured
    against observed), requests, continuity checks, the verdict."""
    t = Table(title="migrations", title_justify="left")
    for col in (
        "#",
        "service",
        "move",
        "technique",
        "trigger",
        "outcome",
        "downtime predicted",
        "measured",
        "probe",
        "observed by device",
        "total",
        "sent",
    ):
        t.add_column(col)
    for i, m in enumerate(summary.migrations):
        seen = ", ".join(f"{d} {fmt.duration(v)}" for d, v in m.observed_downtime_s.items()) or "-"
        outcome = m.outcome if m.outcome is Outcome.COMPLETED else f"[red]{m.outcome}[/]"
        t.add_row(
            str(i + 1),
            m.service,
            f"{m.source} -> {m.destination}",
            m.technique,
            m.trigger,
            outcome,
            fmt.duration(m.predicted_downtime_s),
            fmt.duration(m.downtime_s),
            _probe(m),
            seen,
            fmt.duration(m.total_time_s),
            "-" if m.transferred_bytes is None else fmt.megabytes(m.transferred_bytes),
        )
    why = Text()
    techniques: dict[str, int] = {}
    for i, m in enumerate(summary.migrations):
        techniques[m.technique] = techniques.get(m.technique, 0) + 1
        why.append(f"{i + 1}. {m.service} by {m.technique}: ", style="bold")
        why.append(f"{m.reason or '-'}\n", style="dim")
    r, c = summary.requests, summary.continuity
    chosen = ", ".join(f"{k} x{n}" for k, n in sorted(techniques.items())) or "none"
    finals = ", ".join(f"{d} {'ok' if good else 'FAILED'}" for d, good in c.final.items())
    lines = Text.assemble(
        ("migrations ", "bold"),
        f"{len(summary.migrations)} ({chosen}); decisions {len(summary.decisions)}\n",
        ("requests ", "bold"),
        f"{r.sent} sent, {r.ok} ok, {r.failed} failed ({r.timeouts} timeouts), "
        f"{r.retries} retries; readings lost {r.lost_readings}, doubled {r.doubled_readings}; "
        f"latency p50 {'-' if r.p50_ms is None else f'{r.p50_ms:.1f} ms'}, "
        f"p99 {'-' if r.p99_ms is None else f'{r.p99_ms:.1f} ms'}\n",
        ("continuity ", "bold"),
        f"{c.passed} checks passed, {c.failed} failed, {c.unverified} unverified; "
        f"final: {finals or '-'}\n",
    )
    if summary.ok:
        verdict = Text("PASSED: every migration completed, every continuity check held", "green")
    else:
        verdict = Text("FAILED: " + "; ".join(summary.problems), "bold red")
    interval = summary.options.get("interval_s", 1.0)
    probe_hz = summary.options.get("probe_hz") or 0
    probe = (
        f"; probe: the longest gap between answers to a device's {probe_hz:g} Hz pings "
        "through its gateway, minus one interval (requests lost in the migration)"
        if probe_hz
        else ""
    )
    note = Text(
        "measured: the node's downtime (dump + transfer + resume)"
        + probe
        + "; observed: the longest gap between acknowledged readings around the migration "
        f"(one reading every {interval} s)",
        style="dim",
    )
    parts: list[RenderableType] = [t, note, why, lines]
    if not summary.settled and not summary.interrupted:
        parts.append(Text("note: not every service was with its device at the end", "yellow"))
    parts.append(verdict)
    return Group(*parts)
