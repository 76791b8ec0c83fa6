"""The state transfer channel's throughput on loopback: what ``fogmig transfer-bench`` measures.

Runs a receiving node in a child process and a sending node here, both on loopback, and
streams a directory of random data (the worst case for compression) a few times per mode. The
channel runs over mutual TLS 1.3 as between agents, with a throwaway CA and two node
certificates made for the run; the plaintext baseline (never used by agents) shows what TLS
costs, measured in the same run.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles, create_ca, issue, save_ca, save_identity
from fogmig.platform.transfer.client import TransferClient, TransferStats
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.platform.transfer.server import TransferServer, TransferSession, remove_migration_dir

Security = Literal["tls", "plaintext"]
SENDER = "bench1"
RECEIVER = "bench2"


@dataclass(frozen=True, slots=True)
class ModeRuns:
    """The transfers of one mode: TLS or plaintext, with zstd where it pays or uncompressed."""

    security: Security
    compress: bool
    runs: list[TransferStats]


class _NoCalls:
    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        raise ConfigError(f"the benchmark receiver has no operation {op!r}")


def _channel(security: Security, files: IdentityFiles) -> ChannelSecurity:
    if security == "plaintext":
        return ChannelSecurity.plaintext_for_benchmarks(files.identity.principal)
    return ChannelSecurity.from_files(files)


def _receiver(root: str, pki: str, ports: Any) -> None:
    """Child process: a receiving node (a TLS and a plaintext endpoint) until terminated."""
    import uvloop

    from fogmig.platform.security.pki import identity_files

    files = identity_files(Path(pki), Identity.node(RECEIVER))

    async def main() -> None:
        servers = {
            mode: TransferServer(
                host="127.0.0.1",
                port=0,
                security=_channel(mode, files),
                root=Path(root),
                handler=_NoCalls(),
            )
            for mode in ("tls", "plaintext")
        }
        async with servers["tls"] as tls, servers["plaintext"] as plain:
            ports.put({"tls": tls.port, "plaintext": plain.port})
            await asyncio.Event().wait()

    uvloop.run(main())


def _make_identities(pki: Path) -> IdentityFiles:
    """A CA of the run and both nodes' certificates in ``pki``; the sender's files."""
    ca = create_ca(name="fogmig transfer-bench CA")
    save_ca(ca, pki)
    save_identity(issue(ca, Identity.node(RECEIVER)), pki)
    return save_identity(issue(ca, Identity.node(SENDER)), pki)


def _make_source(directory: Path, size_mb: int, files: int) -> None:
    """One big pages file plus small files, like a CRIU image directory."""
    small = 128 * 1024
    big = max(0, size_mb * 1024 * 1024 - small * (files - 1))
    (directory / "pages-1.img").write_bytes(os.urandom(big))
    for i in range(files - 1):
        (directory / f"core-{i}.img").write_bytes(os.urandom(small))


async def _send(
    port: int,
    security: ChannelSecurity,
    source: Path,
    root: Path,
    *,
    compress: bool,
    repeat: int,
) -> list[TransferStats]:
    results = []
    async with TransferClient.connect(
        "127.0.0.1", port, security=security, peer=RECEIVER
    ) as channel:
        for i in range(repeat):
            migration_id = f"bench-{i}"
            results.append(await channel.send_dir(migration_id, source, compress=compress))
            remove_migration_dir(root, migration_id)
    return results


def run_transfer_bench(
    *,
    size_mb: int,
    files: int,
    repeat: int,
    modes: Sequence[bool] = (False, True),
    securities: Sequence[Security] = ("tls",),
    work_dir: Path | None = None,
    on_mode: Callable[[ModeRuns], None] | None = None,
) -> list[ModeRuns]:
    """Send a ``size_mb`` MiB directory of ``files`` files ``repeat`` times per mode
    (``modes``: compressed or not, each over every one of ``securities``) to a receiver on
    loopback; ``on_mode`` hears each mode as it ends.

    ``work_dir`` holds the data (default: TMPDIR). Starts its own event loops: call it from
    synchronous code.
    """
    if size_mb < 1 or files < 1 or repeat < 1:
        raise ConfigError("--size-mb, --files and --repeat must be at least 1")
    results: list[ModeRuns] = []
    with tempfile.TemporaryDirectory(prefix="fogmig-bench-", dir=work_dir) as work:
        source = Path(work) / "source"
        root = Path(work) / "received"
        pki = Path(work) / "pki"
        source.mkdir()
        root.mkdir()
        sender = _make_identities(pki)
        _make_source(source, size_mb, files)
        spawn = multiprocessing.get_context("spawn")
        ports = spawn.Queue()
        receiver = spawn.Process(target=_receiver, args=(str(root), str(pki), ports), daemon=True)
        receiver.start()
        try:
            port_of: dict[str, int] = ports.get(timeout=30)
            for compress in modes:
                for security in securities:
                    runs = run_async(
                        functools.partial(
                            _send,
                            port_of[security],
                            _channel(security, sender),
                            source,
                            root,
                            compress=compress,
                            repeat=repeat,
                        )
                    )
                    result = ModeRuns(security, compress, runs)
                    results.append(result)
                    if on_mode is not None:
                        on_mode(result)
        finally:
            receiver.terminate()
            receiver.join(10)
    return results
