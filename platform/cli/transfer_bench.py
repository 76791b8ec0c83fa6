"""``fogmig transfer-bench``: how fast the state transfer channel moves an image directory.

Runs a receiving node in a child process and a sending node here, both on loopback, and
streams a directory of random data (the worst case for compression) a few times; the
measurement is ``fogmig.platform.apps.bench.transfer``, this prints it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from fogmig.platform.apps.bench.transfer import ModeRuns, run_transfer_bench
from fogmig.platform.base import fmt


def _print_mode(result: ModeRuns) -> None:
    runs = result.runs
    rates = [r.mbytes_per_second for r in runs]
    label = "zlib level 1" if result.compress else "uncompressed"
    for r in runs:
        print(
            f"{label}: {r.files} files, {fmt.megabytes(r.bytes)} in {fmt.seconds(r.seconds)}"
            f" = {r.mbytes_per_second:.1f} MB/s"
            f" ({fmt.megabytes(r.wire_bytes)} on the wire)"
        )
    print(
        f"{label}: median {statistics.median(rates):.1f} MB/s, "
        f"best {max(rates):.1f} MB/s over {len(runs)} runs"
    )


def _cmd(args: argparse.Namespace) -> int:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compress]
    run_transfer_bench(
        size_mb=args.size_mb,
        files=args.files,
        repeat=args.repeat,
        modes=modes,
        work_dir=args.dir,
        on_mode=_print_mode,
    )
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
