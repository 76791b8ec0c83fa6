"""``fogmig controller-bench``: how fast the controller reacts and how many attach events it takes.

A private Mosquitto on loopback, simulated nodes holding one service per simulated device, and
the controller in its own process. Measured: reaction time from publishing an attach that needs
a migration to the node receiving the MigrateCommand (idle, and with attach traffic in the
background), and the attach rate the controller keeps up with when nothing needs to move
(offered rates in steps; kept up = nothing dropped and the queue drained right after).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import numpy as np

from fogmig.platform.apps.bench.controller_sim import DEVICE_HOST, LocalBroker, SimulatedNode
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.proc import terminate
from fogmig.platform.bus.schemas import DeviceAttach, MigrateCommand, encode
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.runner import Controller
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import identity_files
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.testbed.broker import CONTROLLER_USER

log = logging.getLogger(__name__)

PROBE = "probe"
SLOT_S = 0.01  # pacing granularity of offered rates
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    devices: int = 1000
    nodes: int = 4
    samples: int = 100
    load_rate: int = 1000
    rates: tuple[int, ...] = (1000, 2000, 5000, 0)
    """Offered attach events per second; 0 means as fast as the publisher can."""
    phase_s: float = 3.0
    debounce_s: float = 0.0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.nodes < 2 or self.samples < 1 or self.phase_s <= 0:
            raise FogmigError("need devices >= 1, nodes >= 2, samples >= 1, phase_s > 0")
        if self.nodes > 99:
            raise FogmigError("at most 99 nodes")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
    }


class _ControllerProcess:
    """The controller under test, in its own process (as in production), with counters on
    SIGUSR1."""

    def __init__(
        self, broker: LocalBroker, folder: Path, debounce_s: float, devices: dict[str, str]
    ) -> None:
        self.broker = broker
        self.devices = devices
        """Each device's service: the controller's device directory."""
        self.config_path = folder / "controller.json"
        self.stats_path = folder / "controller-stats.json"
        self.log_path = folder / "controller.log"
        self.debounce_s = debounce_s
        self.proc: asyncio.subprocess.Process | None = None
        self._seq = 0

    async def start(self) -> None:
        self.config_path.write_text(
            json.dumps(
                {
                    "host": self.broker.host,
                    "port": self.broker.port,
                    "pki": str(self.broker.identities[CONTROLLER_USER].cert.parent),
                    "nodes": list(self.broker.nodes),
                    "debounce_s": self.debounce_s,
                    "stats_path": str(self.stats_path),
                    "devices": self.devices,
                }
            )
        )
        os.chmod(self.config_path, 0o600)
        with self.log_path.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "fogmig.platform.apps.bench.controller",
                "serve",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise FogmigError(f"the controller under test did not start: {tail}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def counters(self) -> dict[str, Any]:
        """Ask the controller for its counters (it writes them on SIGUSR1)."""
        self._seq += 1
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                data: dict[str, Any] = json.loads(self.stats_path.read_text())
                if data.get("seq", 0) >= self._seq:
                    return data
            await asyncio.sleep(0.01)
        raise FogmigError("the controller under test does not report its counters")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await terminate(proc, grace=10.0)


class _Fleet:
    """The simulated devices' publisher: pre-encoded attach events at a paced rate."""

    def __init__(self, broker: LocalBroker, devices: dict[str, tuple[str, str]]) -> None:
        self.devices = devices  # device -> (gateway, service)
        self.client = aiomqtt.Client(
            broker.host,
            broker.port,
            tls_context=broker.tls(DEVICE_HOST),
            identifier=DEVICE_HOST,
            max_inflight_messages=1000,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # Hundreds of publish calls in flight are the point here, not a concern.
        self.client.pending_calls_threshold = 1 << 20
        self.published = 0

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.client.__aexit__(exc_type, exc, tb)

    def round(self) -> list[tuple[str, bytes]]:
        """One attach event per device, on its current gateway, stamped now."""
        at = time.time()
        out = []
        for device, (gateway, service) in self.devices.items():
            topic = topics.attach(device)
            msg = DeviceAttach(device=device, gateway=gateway, at=at, service=service)
            out.append((topic, encode(topic, msg)))
        return out

    async def send(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)
        self.published += 1

    async def publish(self, count: int, rate: int) -> tuple[float, float]:
        """Publish ``count`` events at ``rate``/s (0: unpaced); returns (start, end) times."""
        batch = self.round()
        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        per_slot = max(1, round(rate * SLOT_S)) if rate else 1000
        sent = 0
        slot = 0
        while sent < count:
            n = min(per_slot, count - sent)
            for _ in range(n):
                if not batch:
                    batch = self.round()
                topic, payload = batch.pop()
                pending.add(asyncio.create_task(self.send(topic, payload)))
            sent += n
            if rate:
                slot += 1
                delay = start + slot * SLOT_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return start, time.monotonic()


class _Prober:
    """Moves the probe device between two gateways; each move is one reaction sample."""

    def __init__(self, fleet: _Fleet, nodes: dict[str, SimulatedNode], first: str, other: str):
        self.fleet = fleet
        self.nodes = nodes
        self.at = first
        self.other = other
        self.count = 0

    async def sample(self, timeout: float = 60.0) -> tuple[float, float]:
        """(reaction seconds, monotonic time the command arrived)."""
        source, target = self.at, self.other
        msg = DeviceAttach(device=PROBE, gateway=target, at=time.time(), service=PROBE)
        topic = topics.attach(PROBE)
        t0 = time.monotonic()
        await self.fleet.client.publish(topic, encode(topic, msg), qos=1)
        node = self.nodes[source]
        received = await node.next_command(timeout)
        cmd = received.command
        if not isinstance(cmd, MigrateCommand) or (cmd.service, cmd.destination) != (
            PROBE,
            target,
        ):
            raise FogmigError(f"unexpected command at {source}: {cmd!r}")
        # The move is reported before the next sample, so the controller knows where it is.
        await asyncio.wait_for(node.done.get(), timeout)
        self.at, self.other = target, source
        self.count += 1
        return received.at - t0, received.at


async def run_bench(
    options: BenchOptions, *, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the benchmark and return its figures (see the module docstring)."""
    say = on_progress or (lambda _s: None)
    names = [f"gw{i + 1}" for i in range(options.nodes)]
    width = len(str(options.devices))
    devices = {
        f"dev{i:0{width}d}": (names[i % len(names)], f"svc{i:0{width}d}")
        for i in range(options.devices)
    }
    report: dict[str, Any] = {"options": asdict(options)}
    async with LocalBroker(nodes=names, fleet=True) as broker, contextlib.AsyncExitStack() as stack:
        assert broker.folder is not None
        buses = {n: await stack.enter_async_context(broker.bus(n)) for n in names}
        nodes = {n: SimulatedNode(buses[n], n) for n in names}
        for node in nodes.values():
            node.peers = nodes
        for gateway, service in devices.values():
            nodes[gateway].add_service(service)
        nodes[names[0]].add_service(PROBE)
        try:
            await asyncio.gather(*(node.start() for node in nodes.values()))
            say(f"{len(names)} simulated nodes, {len(devices)} services on a loopback broker")
            directory = {device: service for device, (_, service) in devices.items()}
            directory[PROBE] = PROBE
            controller = _ControllerProcess(broker, broker.folder, options.debounce_s, directory)
            await controller.start()
            try:
                async with _Fleet(broker, devices) as fleet:
                    prober = _Prober(fleet, nodes, names[0], names[1])
                    await _measure(
                        options=options,
                        report=report,
                        controller=controller,
                        fleet=fleet,
                        prober=prober,
                        say=say,
                    )
                report["controller"] = await controller.counters()
            finally:
                await controller.stop()
            # Nothing but the probe needed to move: any other command is a wrong decision.
            commands = sum(len(n.received) for n in nodes.values())
            report["commands_other_than_probes"] = commands - prober.count
        finally:
            for node in nodes.values():
                await node.stop()
    return report


async def _measure(
    *,
    options: BenchOptions,
    report: dict[str, Any],
    controller: _ControllerProcess,
    fleet: _Fleet,
    prober: _Prober,
    say: Callable[[str], None],
) -> None:
    # Every device announces itself once: each attachment is new and is evaluated.
    cpu0 = _cpu_seconds(controller.pid)
    # The probe's command comes a debounce after its attach was processed, so every
    # duration that ends with the probe is counted without it.
    debounce = options.debounce_s
    start, _ = await fleet.publish(len(fleet.devices), 0)
    _, arrived = await prober.sample()
    cpu1 = _cpu_seconds(controller.pid)
    n = len(fleet.devices)
    seconds = arrived - debounce - start
    report["first_attach"] = {
        "events": n,
        "seconds": seconds,
        "rate_per_s": n / seconds,
        "controller_cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
    }
    say(f"first attach of {n} devices: {n / seconds:,.0f} events/s")

    idle = [(await prober.sample())[0] for _ in range(options.samples)]
    report["reaction_idle"] = _percentiles(idle)
    say(f"reaction, idle: p50 {report['reaction_idle']['p50_ms']:.2f} ms")

    background = asyncio.create_task(fleet.publish(10**9, options.load_rate))
    await asyncio.sleep(0.5)
    published0, t0 = fleet.published, time.monotonic()
    try:
        loaded = [(await prober.sample())[0] for _ in range(options.samples)]
    finally:
        achieved = (fleet.published - published0) / (time.monotonic() - t0)
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
    await asyncio.sleep(0.5)
    report["reaction_loaded"] = {
        **_percentiles(loaded),
        "background_offered_per_s": options.load_rate,
        "background_achieved_per_s": achieved,
    }
    say(
        f"reaction with {achieved:,.0f} attach/s in the background: "
        f"p50 {report['reaction_loaded']['p50_ms']:.2f} ms"
    )

    rows = []
    for rate in options.rates:
        count = round(rate * options.phase_s) if rate else max(10 * len(fleet.devices), 10_000)
        before = await controller.counters()
        cpu0 = _cpu_seconds(controller.pid)
        start, end = await fleet.publish(count, rate)
        lag, arrived = await prober.sample()
        cpu1 = _cpu_seconds(controller.pid)
        after = await controller.counters()
        processed = after["attach_events"] - before["attach_events"] - 1  # minus the probe
        dropped = count - processed
        lag -= debounce
        row = {
            "offered_per_s": rate or "max",
            "events": count,
            "publish_rate_per_s": count / (end - start),
            "processed": processed,
            "dropped": dropped,
            "controller_rate_per_s": processed / (arrived - debounce - start),
            "probe_lag_ms": lag * 1000,
            "controller_cpu_us_per_event": (cpu1 - cpu0) / max(processed, 1) * 1e6,
            "kept_up": dropped == 0 and lag < 0.5,
        }
        rows.append(row)
        say(
            f"offered {row['offered_per_s']}/s: published {row['publish_rate_per_s']:,.0f}/s, "
            f"processed {processed}/{count} at {row['controller_rate_per_s']:,.0f}/s, "
            f"probe lag {lag * 1000:.1f} ms"
        )
    report["rates"] = rows
    kept = [r["controller_rate_per_s"] for r in rows if r["kept_up"]]
    report["sustained_rate_per_s"] = max(kept) if kept else None


def format_report(report: dict[str, Any]) -> str:
    o = report["options"]
    lines = [
        f"controller benchmark: {o['devices']} devices, {o['nodes']} nodes, debounce "
        f"{o['debounce_s']:g} s, Mosquitto on loopback (auth + ACL, QoS 1), controller in its "
        "own process",
        "",
        "reaction time, attach -> MigrateCommand at the node"
        + (f" (includes the {o['debounce_s']:g} s debounce):" if o["debounce_s"] else ":"),
    ]
    for key, label in (("reaction_idle", "idle"), ("reaction_loaded", "under load")):
        r = report[key]
        extra = (
            f"  ({r['background_achieved_per_s']:,.0f} attach/s in the background)"
            if key == "reaction_loaded"
            else ""
        )
        lines.append(
            f"  {label:>10}: p50 {r['p50_ms']:.1f} ms  p90 {r['p90_ms']:.1f} ms  "
            f"p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  (n={r['n']}){extra}"
        )
    f = report["first_attach"]
    lines += [
        "",
        f"first attach of every device (each evaluated): {f['rate_per_s']:,.0f} events/s, "
        f"{f['controller_cpu_us_per_event']:.0f} us CPU each",
        "",
        "attach events with nothing to move:",
        f"  {'offered/s':>10} {'published/s':>12} {'processed':>12} {'dropped':>8} "
        f"{'ctl rate/s':>11} {'probe lag':>10} {'CPU/event':>10}  kept up"
        + ("  (probe lag: beyond the debounce)" if o["debounce_s"] else ""),
    ]
    for r in report["rates"]:
        lines.append(
            f"  {r['offered_per_s']!s:>10} {r['publish_rate_per_s']:>12,.0f} "
            f"{r['processed']:>12,} {r['dropped']:>8,} {r['controller_rate_per_s']:>11,.0f} "
            f"{r['probe_lag_ms']:>8.1f}ms {r['controller_cpu_us_per_event']:>8.0f}us  "
            f"{'yes' if r['kept_up'] else 'NO'}"
        )
    sustained = report["sustained_rate_per_s"]
    lines += [
        "",
        "sustained: "
        + (f"{sustained:,.0f} attach events/s" if sustained else "no offered rate was kept up"),
        f"commands other than the probe's: {report['commands_other_than_probes']}",
    ]
    return "\n".join(lines)


# --- the controller under test (child process) --------------------------------------------


async def _serve(config_path: Path) -> None:
    from fogmig.platform.bus.client import Bus

    cfg = json.loads(config_path.read_text())
    stats_path = Path(cfg["stats_path"])
    seq = 0
    bus = Bus(
        host=cfg["host"],
        port=cfg["port"],
        tls=broker_client_context(identity_files(Path(cfg["pki"]), Identity.controller())),
        client_id=CONTROLLER_USER,
        known_nodes=cfg["nodes"],
    )
    async with bus:
        directory: dict[str, str] = cfg["devices"]
        controller = Controller(
            ControllerConfig(debounce_s=cfg["debounce_s"]), bus, devices=directory.get
        )
        stop = asyncio.Event()

        def write_counters() -> None:
            nonlocal seq
            seq += 1
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"seq": seq, **controller.counters()}))
            tmp.replace(stats_path)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, write_counters)
        task = asyncio.create_task(controller.run(stop))
        ready = asyncio.create_task(controller.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            print("ready", flush=True)
        else:
            ready.cancel()
        await task


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "serve":
        print(
            "usage: python -m fogmig.platform.apps.bench.controller serve CONFIG", file=sys.stderr
        )
        return 2
    from fogmig.platform.base.aio import run_async

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    run_async(lambda: _serve(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
