"""``fogmig image build|info``: build the service image and show what is built.

The build is idempotent: with the image up to date it returns at once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console

from fogmig.platform.base.aio import run_async
from fogmig.services import image

console = Console(highlight=False, soft_wrap=True)


def _build(args: argparse.Namespace) -> int:
    def progress(msg: str) -> None:
        console.print(f"[dim]-[/] {msg}")

    rootfs = run_async(lambda: image.ensure_image(progress=progress, force=args.force))
    print(rootfs)
    return 0


def _info(args: argparse.Namespace) -> int:
    info = image.image_info()
    doc: dict[str, Any] = {
        "image_id": image.image_id(),
        "built": info is not None,
        "images_dir": str(image.images_dir()),
    }
    if info is not None:
        doc.update(asdict(info))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0 if info is not None else 1
    if info is None:
        console.print(f"image {doc['image_id']}: not built (run `fogmig image build`)")
        return 1
    console.print(f"image {info.image_id}")
    console.print(f"  rootfs     {info.rootfs} (mounted read-only by containers)")
    console.print(f"  base       {info.base_recipe}")
    console.print(f"  packages   {', '.join(info.requirements)} (aiocoap {info.aiocoap_version})")
    console.print(f"  sensor.py  sha256 {info.sensor_sha256[:16]}")
    console.print(f"  built      in {info.build_seconds:.1f} s")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="build or inspect the service container image")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = isub.add_parser("build", help="build the image (quick when it is up to date)")
    b.add_argument("--force", action="store_true", help="rebuild the base and the image")
    b.set_defaults(func=_build)
    i = isub.add_parser("info", help="show the current image")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)
