"""Unit tests of the image builder's pure parts: the apt mirror lookup and the image identity."""

from __future__ import annotations

from pathlib import Path

import pytest

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
