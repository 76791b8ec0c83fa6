"""``fogmig transfer-bench``: how fast the state transfer channel moves an image directory.

Runs a receiving node in a child process and a sending node here, both on loopback, and
streams a directory of random data (the worst case for compression) a few times, over mutual
TLS as between agents; ``--plaintext`` measures the unprotected baseline instead, ``--security
both`` both in the same run with the cost of TLS. The measurement is
``fogmig.platform.apps.bench.transfer``, this prints it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from fogmig.platform.apps.bench.transfer import ModeRuns, Security, run_transfer_bench
from fogmig.platform.base import fmt


def _label(result: ModeRuns) -> str:
    compression = "zstd where it pays" if result.compress else "uncompressed"
    return f"{result.security}, {compression}"


def _median(result: ModeRuns) -> float:
    return statistics.median(r.mbytes_per_second for r in result.runs)


def _print_mode(result: ModeRuns) -> None:
    runs = result.runs
    label = _label(result)
    for r in runs:
        print(
            f"{label}: {r.files} files, {fmt.megabytes(r.bytes)} in {fmt.seconds(r.seconds)}"
            f" = {r.mbytes_per_second:.1f} MB/s"
            f" ({fmt.megabytes(r.wire_bytes)} on the wire)"
        )
    print(
        f"{label}: median {_median(result):.1f} MB/s, "
        f"best {max(r.mbytes_per_second for r in runs):.1f} MB/s over {len(runs)} runs"
    )


def print_tls_cost(results: list[ModeRuns]) -> None:
    """For each compression mode run both ways: TLS's median against plaintext's."""
    for compress in sorted({r.compress for r in results}):
        by = {r.security: r for r in results if r.compress is compress}
        if "tls" not in by or "plaintext" not in by:
            continue
        tls, plain = _median(by["tls"]), _median(by["plaintext"])
        print(
            f"cost of TLS ({'zstd where it pays' if compress else 'uncompressed'}): median "
            f"{tls:.1f} MB/s with TLS, {plain:.1f} MB/s plaintext "
            f"(TLS changes the rate by {(tls / plain - 1) * 100:+.1f} %)"
        )


def _cmd(args: argparse.Namespace) -> int:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compress]
    choice = "plaintext" if args.plaintext else args.security
    choices: dict[str, list[Security]] = {
        "tls": ["tls"],
        "plaintext": ["plaintext"],
        "both": ["plaintext", "tls"],
    }
    securities = choices[choice]
    results = run_transfer_bench(
        size_mb=args.size_mb,
        files=args.files,
        repeat=args.repeat,
        modes=modes,
        securities=securities,
        work_dir=args.dir,
        on_mode=_print_mode,
    )
    print_tls_cost(results)
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
    p.add_argument(
        "--security",
        choices=["tls", "plaintext", "both"],
        default="tls",
        help="mutual TLS as between agents (default), the plaintext baseline, or both",
    )
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="only the plaintext baseline (no TLS; agents never run so)",
    )
    p.add_argument("--dir", type=Path, default=None, help="where to put the data (default: TMPDIR)")
    p.set_defaults(func=_cmd)
