"""Unit tests of the image builder's pure parts: the apt mirror lookup and the image identity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fogmig.platform.cli import services as commands
from fogmig.services import image

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""

SRC_ONLY = """\
Types: deb-src
URIs: http://src.example/debian
Suites: unstable bookworm
Components: main
"""

DISABLED = """\
Enabled: no
Types: deb
URIs: http://off.example/debian
Suites: bookworm
"""


def test_mirror_from_deb822() -> None:
    got = image.mirror_from_sources([DEB822], "", "bookworm")
    assert got == "http://mirror.example/debian"


def test_mirror_skips_source_only_and_disabled_entries() -> None:
    got = image.mirror_from_sources([SRC_ONLY, DISABLED, DEB822], "", "bookworm")
    assert got == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_list() -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
    )
    assert image.mirror_from_sources([], text, "bookworm") == "http://one.example/debian"


def test_no_mirror_for_the_suite() -> None:
    assert (
        image.mirror_from_sources([SRC_ONLY], "deb http://x.example/d trixie main", "bookworm")
        is None
    )


def test_deb822_continuation_lines() -> None:
    text = "Types: deb\nURIs:\n http://cont.example/debian\nSuites: bookworm\n"
    assert image.mirror_from_sources([text], "", "bookworm") == "http://cont.example/debian"


def test_image_id_changes_with_each_input() -> None:
    base = image.compute_image_id("recipe", "aiocoap==0.4.17\n", b"print(1)")
    assert len(base) == 16
    assert base == image.compute_image_id("recipe", "# pinned\naiocoap==0.4.17\n\n", b"print(1)")
    assert base != image.compute_image_id("recipe2", "aiocoap==0.4.17\n", b"print(1)")
    assert base != image.compute_image_id("recipe", "aiocoap==0.4.16\n", b"print(1)")
    assert base != image.compute_image_id("recipe", "aiocoap==0.4.17\n", b"print(2)")


def test_image_id_follows_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sensor.py"
    src.write_text("print(1)\n")
    monkeypatch.setattr(image, "SENSOR_SOURCE", src)
    first = image.image_id()
    src.write_text("print(2)\n")
    assert image.image_id() != first


def test_find_image_is_none_in_an_empty_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOGMIG_CACHE_DIR", str(tmp_path))
    assert image.find_image() is None
    # A directory with the right name but no manifest is not an image.
    (tmp_path / "images" / f"sensor-{image.image_id()}" / "rootfs").mkdir(parents=True)
    assert image.find_image() is None


def _fake_image(cache: Path) -> Path:
    ident = image.image_id()
    top = cache / "images" / f"sensor-{ident}"
    sensor = top / "rootfs" / "opt/fogmig/sensor.py"
    sensor.parent.mkdir(parents=True)
    sensor.write_bytes(image.SENSOR_SOURCE.read_bytes())
    info = {
        "image_id": ident,
        "base_recipe": image.BASE_RECIPE,
        "requirements": ["aiocoap==0.4.17"],
        "sensor_sha256": "0" * 64,
        "aiocoap_version": "0.4.17",
        "built_at": 0.0,
        "build_seconds": 1.0,
        "rootfs": str(top / "rootfs"),
    }
    (top / image.MANIFEST).write_text(json.dumps(info))
    return top


def test_find_image_accepts_a_complete_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOGMIG_CACHE_DIR", str(tmp_path))
    top = _fake_image(tmp_path)
    assert image.find_image() == top / "rootfs"
    info = image.image_info()
    assert info is not None
    assert info.aiocoap_version == "0.4.17"


def test_find_image_rejects_a_manifest_of_another_identity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOGMIG_CACHE_DIR", str(tmp_path))
    top = _fake_image(tmp_path)
    doc = json.loads((top / image.MANIFEST).read_text())
    doc["image_id"] = "0" * 16
    (top / image.MANIFEST).write_text(json.dumps(doc))
    assert image.find_image() is None


async def test_ensure_image_returns_a_built_image_without_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOGMIG_CACHE_DIR", str(tmp_path))
    top = _fake_image(tmp_path)
    said: list[str] = []
    assert await image.ensure_image(progress=said.append) == top / "rootfs"
    assert any("up to date" in s for s in said)


def test_image_info_command_without_an_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOGMIG_CACHE_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["image", "info", "--json"])
    assert args.func(args) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "image_id": image.image_id(),
        "built": False,
        "images_dir": str(tmp_path / "images"),
    }
