"""CLI of the controller: ``fogmig controller`` (the daemon), ``fogmig drain NODE`` and
``fogmig controller-bench``.

``controller`` runs in the root namespace against the testbed's broker with the ``controller``
credentials and shows its decisions live; ``drain`` asks a node to drain and waits until the
controller has moved every service off it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError, FogmigError
from fogmig.platform.bus.client import Bus, CommandRejectedError, Subscription
from fogmig.platform.bus.schemas import (
    BusMessage,
    Cleared,
    CommandAck,
    Decision,
    DrainCommand,
    MigrateCommand,
    MigrationDone,
    NodeStatus,
    topics,
)
from fogmig.platform.controller.core import (
    OBJECTIVES,
    Controller,
    ControllerConfig,
    ControllerEvent,
    EventKind,
)

console = Console()

_STYLES = {
    EventKind.DECISION: "bold cyan",
    EventKind.DONE: "green",
    EventKind.NODE_EMPTY: "bold green",
    EventKind.REJECTED: "yellow",
    EventKind.SEND_FAILED: "yellow",
    EventKind.GAVE_UP: "red",
    EventKind.LOST: "red",
    EventKind.HOLD: "dim",
}


def default_decision_log() -> Path:
    return paths.state_dir() / "controller" / "decisions.jsonl"


@contextlib.contextmanager
def single_instance(path: Path) -> Iterator[None]:
    """One controller per machine: two would send competing commands for the same services."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"another controller is running (pid {other})", hint=f"lock file {path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def config_for_testbed(**overrides: Any) -> ControllerConfig:
    """The controller's configuration on the testbed: links default to the testbed's profile."""
    from fogmig.platform.testbed.state import load_state
    from fogmig.policies.conditions import LinkConditions

    profile = load_state().profile
    link = LinkConditions.from_mbit(profile.rate_mbit, profile.rtt_ms)
    return ControllerConfig(default_link=link, **overrides)


def open_testbed_bus(client: str) -> Bus:
    """A bus client with the controller's credentials on the testbed's broker."""
    from fogmig.platform.testbed.broker import CONTROLLER_USER
    from fogmig.platform.testbed.credentials import load_credentials
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    return Bus(
        host=state.broker.ip,
        port=state.broker.port,
        username=CONTROLLER_USER,
        password=load_credentials().password(CONTROLLER_USER),
        client_id=f"{client}-{uuid.uuid4().hex[:8]}",
        known_nodes=state.node_names,
    )


class LiveView:
    """Prints controller events as lines; migration progress only when the phase changes."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self._phase: dict[str, str] = {}

    def __call__(self, event: ControllerEvent) -> None:
        if event.kind is EventKind.PROGRESS:
            phase = str(event.data.get("phase"))
            key = f"{event.service}:{event.data.get('command_id')}"
            if self._phase.get(key) == phase:
                return
            self._phase[key] = phase
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        style = _STYLES.get(event.kind, "")
        kind = f"[{style}]{event.kind.value:>13}[/]" if style else f"{event.kind.value:>13}"
        self.out.print(f"[dim]{stamp}[/] {kind} {escape(event.message)}", highlight=False)


async def run_controller(config: ControllerConfig, *, on_event: LiveView | None = None) -> None:
    """Run the controller on the testbed until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with single_instance(paths.run_dir() / "controller.lock"):
        async with open_testbed_bus("controller") as bus:
            controller = Controller(config, bus, on_event=on_event)
            await controller.run(stop)


def _cmd_controller(args: argparse.Namespace) -> int:
    from fogmig.platform.cli.main import run_async

    threshold = args.load_threshold
    target = args.load_target if args.load_target is not None else round(threshold * 0.75, 3)
    config = config_for_testbed(
        debounce_s=args.debounce,
        load_threshold=threshold,
        load_target=target,
        load_reports=args.load_reports,
        objective=args.objective,
        decision_log=args.decision_log or default_decision_log(),
    )
    console.print(
        f"controller: debounce {config.debounce_s:g} s, load > {config.load_threshold:g} for "
        f"{config.load_reports} reports, objective {config.objective}, assumed link "
        f"{config.default_link.throughput_mbit_per_s:g} Mbit/s / "
        f"{config.default_link.rtt_s * 1000:g} ms; decisions in {config.decision_log}"
    )
    run_async(lambda: run_controller(config, on_event=LiveView(console)))
    return 0


# --- drain --------------------------------------------------------------------------------


class DrainWatch:
    """Follows a draining node from its status, its commands and its events.

    The node is empty once it reports draining with no service and every migration off it has
    ended: after a post-copy the source still serves memory pages when its container is gone.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.draining = False
        self.services: list[str] | None = None
        self.migrating: dict[str, str] = {}  # command id -> service
        self._told: list[str] | None = None

    @property
    def empty(self) -> bool:
        return self.draining and self.services == [] and not self.migrating

    def update(self, msg: BusMessage | Cleared) -> list[str]:
        """Take one message; return what is worth telling the user."""
        match msg:
            case NodeStatus() if msg.node == self.node:
                if not msg.online:
                    return [f"{self.node} is offline"]
                self.draining = msg.draining
                names = sorted(s.name for s in msg.services)
                self.services = names
                if self.draining and names and names != self._told:
                    self._told = names
                    return [f"{self.node} still runs {len(names)}: {', '.join(names)}"]
            case MigrateCommand():
                self.migrating[msg.command_id] = msg.service
            case CommandAck(accepted=False):
                self.migrating.pop(msg.command_id, None)
            case MigrationDone() if msg.node == self.node:
                self.migrating.pop(msg.command_id, None)
                where = msg.record.get("destination", "?")
                return [f"{msg.service} left {self.node} for {where}: {msg.outcome.value}"]
            case Decision() if msg.source == self.node:
                return [f"moving {msg.service} to {msg.destination} by {msg.technique}"]
            case _:
                pass
        return []

    def describe(self) -> str:
        parts = []
        if not self.draining:
            parts.append("it does not report draining")
        if self.services:
            parts.append(f"it still runs {', '.join(self.services)}")
        if self.migrating:
            parts.append(f"migrations of {', '.join(sorted(self.migrating.values()))} not ended")
        return "; ".join(parts) or "no status from it"


async def drain_node(
    bus: Bus,
    node: str,
    *,
    timeout: float = 600.0,
    on_update: Callable[[str], None] | None = None,
) -> float:
    """Ask ``node`` to drain and wait until it is empty (see :class:`DrainWatch`).

    Returns the seconds it took. The node's agent stops accepting services; the controller
    moves the ones it has. Raises :class:`FogmigError` if the node refuses or is still not
    empty after ``timeout``.
    """
    say = on_update or (lambda _line: None)
    started = time.monotonic()
    watch = DrainWatch(node)
    inbox: asyncio.Queue[BusMessage | Cleared | None] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        pumps = []
        for pattern in (
            topics.status(node),
            topics.cmd(node),
            topics.events(node),
            topics.decisions(),
        ):
            sub = await stack.enter_async_context(bus.subscribe(pattern))
            pumps.append(asyncio.create_task(_pump(sub, inbox)))
        try:
            try:
                await bus.request(node, DrainCommand(command_id=uuid.uuid4().hex[:12]), 15.0)
            except CommandRejectedError as exc:
                raise FogmigError(
                    f"{node} refused to drain: {exc.ack.reason}",
                    hint="does this node's agent handle drain commands?",
                ) from exc
            say(f"{node} accepted the drain command")
            async with asyncio.timeout(timeout):
                while not watch.empty:
                    msg = await inbox.get()
                    if msg is None:
                        raise FogmigError("the bus closed before the node was empty")
                    for line in watch.update(msg):
                        say(line)
            return time.monotonic() - started
        except TimeoutError:
            raise FogmigError(
                f"{node} is not empty after {timeout:g} s: {watch.describe()}",
                hint="is `fogmig controller` running? It moves the services off a draining node",
            ) from None
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _pump(sub: Subscription, inbox: asyncio.Queue[BusMessage | Cleared | None]) -> None:
    async for _, msg in sub:
        inbox.put_nowait(msg)
    inbox.put_nowait(None)


def _cmd_drain(args: argparse.Namespace) -> int:
    from fogmig.platform.cli.main import run_async
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    if args.node not in state.node_names:
        raise ConfigError(
            f"no node {args.node!r} on the testbed; nodes: {', '.join(state.node_names)}"
        )

    async def go() -> float:
        async with open_testbed_bus("drain") as bus:
            return await drain_node(bus, args.node, timeout=args.timeout, on_update=console.print)

    took = run_async(go)
    console.print(f"[bold green]{args.node} is empty and ready to power down[/] ({took:.1f} s)")
    return 0


# --- benchmark ----------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from fogmig.platform.apps.bench.controller import BenchOptions, format_report, run_bench
    from fogmig.platform.cli.main import run_async

    rates = [0 if p.strip() == "max" else int(p) for p in args.rates.split(",")]
    options = BenchOptions(
        devices=args.devices,
        nodes=args.nodes,
        samples=args.samples,
        load_rate=args.load_rate,
        rates=tuple(rates),
        phase_s=args.phase_s,
        debounce_s=args.debounce,
    )
    report = run_async(lambda: run_bench(options, on_progress=console.print))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("controller", help="run the controller (mobility, load, drain)")
    p.add_argument("--debounce", type=float, default=1.5, metavar="S", help="default 1.5 s")
    p.add_argument("--load-threshold", type=float, default=0.8, metavar="X")
    p.add_argument("--load-target", type=float, default=None, metavar="X")
    p.add_argument("--load-reports", type=int, default=3, metavar="K")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="downtime")
    p.add_argument("--decision-log", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("drain", help="empty a node (the controller moves its services off)")
    p.add_argument("node")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S")
    p.set_defaults(func=_cmd_drain)

    p = sub.add_parser(
        "controller-bench", help="controller reaction time and attach rate on a local broker"
    )
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--samples", type=int, default=100, help="reaction-time samples per run")
    p.add_argument(
        "--load-rate", type=int, default=1000, help="attach/s in the background of the 2nd run"
    )
    p.add_argument("--rates", default="1000,2000,5000,max", help="offered attach/s to try")
    p.add_argument("--phase-s", type=float, default=3.0, help="seconds per offered rate")
    p.add_argument("--debounce", type=float, default=0.0, metavar="S")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=_cmd_bench)
