"""The state transfer channel's throughput on loopback: what ``fogmig transfer-bench`` measures.

Runs a receiving node in a child process and a sending node here, both on loopback, and
streams a directory of random data (the worst case for compression) a few times per mode.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.transfer.client import TransferClient, TransferStats
from fogmig.platform.transfer.server import TransferServer, TransferSession, remove_migration_dir


@dataclass(frozen=True, slots=True)
class ModeRuns:
    """The transfers of one mode: with zlib level 1 or uncompressed."""

    compress: bool
    runs: list[TransferStats]


class _NoCalls:
    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        raise ConfigError(f"the benchmark receiver has no operation {op!r}")


def _receiver(root: str, secret: bytes, ports: Any) -> None:
    """Child process: a receiving node until it is terminated."""
    import uvloop

    async def main() -> None:
        async with TransferServer(
            host="127.0.0.1",
            port=0,
            secret=secret,
            node="bench2",
            root=Path(root),
            handler=_NoCalls(),
        ) as server:
            ports.put(server.port)
            await asyncio.Event().wait()

    uvloop.run(main())


def _make_source(directory: Path, size_mb: int, files: int) -> None:
    """One big pages file plus small files, like a CRIU image directory."""
    small = 128 * 1024
    big = max(0, size_mb * 1024 * 1024 - small * (files - 1))
    (directory / "pages-1.img").write_bytes(os.urandom(big))
    for i in range(files - 1):
        (directory / f"core-{i}.img").write_bytes(os.urandom(small))


async def _send(
    port: int, secret: bytes, source: Path, root: Path, *, compress: bool, repeat: int
) -> list[TransferStats]:
    results = []
    async with TransferClient.connect(
        "127.0.0.1", port, secret=secret, node="bench1", peer="bench2"
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
    work_dir: Path | None = None,
    on_mode: Callable[[ModeRuns], None] | None = None,
) -> list[ModeRuns]:
    """Send a ``size_mb`` MiB directory of ``files`` files ``repeat`` times per mode
    (``True``: compressed) to a receiver on loopback; ``on_mode`` hears each mode as it ends.

    ``work_dir`` holds the data (default: TMPDIR). Starts its own event loops: call it from
    synchronous code.
    """
    if size_mb < 1 or files < 1 or repeat < 1:
        raise ConfigError("--size-mb, --files and --repeat must be at least 1")
    secret = secrets.token_bytes(32)
    results: list[ModeRuns] = []
    with tempfile.TemporaryDirectory(prefix="fogmig-bench-", dir=work_dir) as work:
        source = Path(work) / "source"
        root = Path(work) / "received"
        source.mkdir()
        root.mkdir()
        _make_source(source, size_mb, files)
        spawn = multiprocessing.get_context("spawn")
        ports = spawn.Queue()
        receiver = spawn.Process(target=_receiver, args=(str(root), secret, ports), daemon=True)
        receiver.start()
        try:
            port = int(ports.get(timeout=30))
            for compress in modes:
                runs = run_async(
                    functools.partial(
                        _send, port, secret, source, root, compress=compress, repeat=repeat
                    )
                )
                result = ModeRuns(compress, runs)
                results.append(result)
                if on_mode is not None:
                    on_mode(result)
        finally:
            receiver.terminate()
            receiver.join(10)
    return results
