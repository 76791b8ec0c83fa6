"""``fogmig transfer-bench``: how fast the state transfer channel moves an image directory.

Runs a receiving node in a child process and a sending node here, both on loopback, and
streams a directory of random data (the worst case for compression) a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import secrets
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.transfer.channel import (
    TransferClient,
    TransferServer,
    TransferSession,
    TransferStats,
    remove_migration_dir,
)


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


def _cmd(args: argparse.Namespace) -> int:
    from fogmig.platform.base.aio import run_async

    if args.size_mb < 1 or args.files < 1 or args.repeat < 1:
        raise ConfigError("--size-mb, --files and --repeat must be at least 1")
    secret = secrets.token_bytes(32)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compress]
    with tempfile.TemporaryDirectory(prefix="fogmig-bench-", dir=args.dir) as work:
        source = Path(work) / "source"
        root = Path(work) / "received"
        source.mkdir()
        root.mkdir()
        _make_source(source, args.size_mb, args.files)
        spawn = multiprocessing.get_context("spawn")
        ports = spawn.Queue()
        receiver = spawn.Process(target=_receiver, args=(str(root), secret, ports), daemon=True)
        receiver.start()
        try:
            port = int(ports.get(timeout=30))
            for compress in modes:
                runs = run_async(
                    functools.partial(
                        _send, port, secret, source, root, compress=compress, repeat=args.repeat
                    )
                )
                rates = [r.mbytes_per_second for r in runs]
                label = "zlib level 1" if compress else "uncompressed"
                for r in runs:
                    print(
                        f"{label}: {r.files} files, {r.bytes / 1e6:.1f} MB in {r.seconds:.3f} s"
                        f" = {r.mbytes_per_second:.1f} MB/s"
                        f" ({r.wire_bytes / 1e6:.1f} MB on the wire)"
                    )
                print(
                    f"{label}: median {statistics.median(rates):.1f} MB/s, "
                    f"best {max(rates):.1f} MB/s over {len(runs)} runs"
                )
        finally:
            receiver.terminate()
            receiver.join(10)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "transfer-bench", help="measure the state transfer channel's throughput on loopback"
    )
    p.add_argument("--size-mb", type=int, default=75, help="size of the image directory (MiB)")
    p.add_argument("--files", type=int, default=41, help="number of files in it")
    p.add_argument("--repeat", type=int, default=5, help="transfers per mode")
    p.add_argument(
        "--compress", choices=["off", "on", "both"], default="both", help="which modes to run"
    )
    p.add_argument("--dir", type=Path, default=None, help="where to put the data (default: TMPDIR)")
    p.set_defaults(func=_cmd)
