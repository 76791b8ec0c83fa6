"""Builds the service image: a self-contained Debian 12 rootfs with python3, aiocoap and sensor.py.

Containers mount the rootfs read-only (one copy shared by every container on the machine). The
debootstrap base is cached; the image itself is rebuilt only when its identity changes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError, RuntimeToolError, SetupError
from fogmig.platform.base.mounts import mounts_below
from fogmig.platform.base.proc import run

log = logging.getLogger(__name__)

SUITE = "bookworm"
# Everything that decides the base's content; the mirror is not part of it (any mirror of the
# archive serves the same packages). python3-minimal alone lacks asyncio, json's friends and
# logging: libpython3.11-stdlib adds the rest of the standard library aiocoap needs.
BASE_ARGS = ("--variant=minbase", "--include=python3-minimal,libpython3.11-stdlib")
BASE_RECIPE = f"debootstrap {' '.join(BASE_ARGS)} {SUITE}"
# Where Debian 12's python3 looks for locally installed packages.
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
SENSOR_IN_IMAGE = "/opt/fogmig/sensor.py"
MANIFEST = "image.json"

_HERE = Path(__file__).resolve().parent
SENSOR_SOURCE = _HERE / "sensor.py"
REQUIREMENTS = _HERE / "requirements-image.txt"

APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")

Progress = Callable[[str], None]


class ImageBuildError(SetupError):
    """The service image could not be built."""

    hint = "run `fogmig image build -v` to see every step; `--force` starts from a clean base"


class ImageToolError(RuntimeToolError):
    """A tool run while building the image (debootstrap, pip, chroot) failed."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("hint", ImageBuildError.hint)
        super().__init__(message, **kwargs)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the manifest of a built image records."""

    image_id: str
    base_recipe: str
    requirements: list[str]
    sensor_sha256: str
    aiocoap_version: str
    built_at: float
    build_seconds: float
    rootfs: str


# ---- identity -------------------------------------------------------------------------------


def _requirements_text() -> str:
    return REQUIREMENTS.read_text()


def requirement_lines(text: str) -> list[str]:
    """The requirement specifiers of a requirements file (comments and blanks dropped)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def compute_image_id(base_recipe: str, requirements: str, sensor_source: bytes) -> str:
    """Identity of an image: a short hash over everything that decides its content."""
    h = hashlib.sha256()
    for part in (base_recipe.encode(), "\n".join(requirement_lines(requirements)).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    h.update(len(sensor_source).to_bytes(8, "big"))
    h.update(sensor_source)
    return h.hexdigest()[:16]


def base_id() -> str:
    return hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]


def image_id() -> str:
    """The identity of the image that the current sources would build."""
    return compute_image_id(BASE_RECIPE, _requirements_text(), SENSOR_SOURCE.read_bytes())


# ---- locations ------------------------------------------------------------------------------


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def _base_dir() -> Path:
    return images_dir() / f"base-{base_id()}"


def _image_dir(ident: str) -> Path:
    return images_dir() / f"sensor-{ident}"


def _read_manifest(image_dir: Path) -> ImageInfo | None:
    try:
        doc = json.loads((image_dir / MANIFEST).read_text())
        return ImageInfo(**doc)
    except (OSError, ValueError, TypeError):
        return None


def find_image() -> Path | None:
    """The current image's rootfs if it is built and matches the sources, else ``None``."""
    ident = image_id()
    info = _read_manifest(_image_dir(ident))
    if info is None or info.image_id != ident:
        return None
    rootfs = _image_dir(ident) / "rootfs"
    if not (rootfs / SENSOR_IN_IMAGE.lstrip("/")).is_file():
        return None
    return rootfs


def image_info() -> ImageInfo | None:
    """The manifest of the current image, if built."""
    if find_image() is None:
        return None
    return _read_manifest(_image_dir(image_id()))


# ---- apt mirror -----------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> Iterable[dict[str, str]]:
    stanza: dict[str, str] = {}
    key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if raw[0] in " \t" and key is not None:
            stanza[key] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if sep:
            key = name.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def mirror_from_sources(deb822_texts: Iterable[str], one_line_text: str, suite: str) -> str | None:
    """The URI of the first binary (``deb``) source that serves ``suite``.

    ``deb822_texts`` are the contents of ``*.sources`` files; ``one_line_text`` is the classic
    ``sources.list``. Disabled stanzas (``Enabled: no``) and source-only entries are skipped.
    """
    for text in deb822_texts:
        for st in _deb822_stanzas(text):
            if "deb" not in st.get("types", "").split():
                continue
            if st.get("enabled", "yes").lower() == "no":
                continue
            if suite not in st.get("suites", "").split():
                continue
            uris = st.get("uris", "").split()
            if uris:
                return uris[0]
    for raw in one_line_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        # deb [options] URI suite components...
        m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m and m.group(2) == suite:
            return m.group(1)
    return None


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for ``suite``."""
    texts = []
    if APT_SOURCES_DIR.is_dir():
        for p in sorted(APT_SOURCES_DIR.glob("*.sources")):
            try:
                texts.append(p.read_text())
            except OSError:
                continue
    try:
        one_line = APT_SOURCES_LIST.read_text()
    except OSError:
        one_line = ""
    uri = mirror_from_sources(texts, one_line, suite)
    if uri is None:
        raise ImageBuildError(
            f"no apt source for suite {suite!r} in {APT_SOURCES_DIR} or {APT_SOURCES_LIST}",
            hint=f"add a `deb` source for Debian {suite} to the machine's apt configuration",
        )
    return uri


# ---- file system helpers --------------------------------------------------------------------


async def _remove_tree(path: Path) -> None:
    """Remove a build directory; unmount what debootstrap may have left mounted below it."""
    for mp in mounts_below(path.resolve()):
        await run(["umount", "-l", str(mp)], check=False)
    await run(["rm", "-rf", "--one-file-system", str(path)], timeout=300)


class _BuildLock:
    """An exclusive lock on the image cache, so concurrent builders do not collide."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    async def __aenter__(self) -> _BuildLock:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ---- build ----------------------------------------------------------------------------------


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def _check_root() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building the service image needs root (debootstrap, chroot)")


async def _ensure_base(progress: Progress | None, force: bool) -> Path:
    base = _base_dir()
    marker = base / "complete"
    if force and base.exists():
        _say(progress, f"removing the cached base {base}")
        await _remove_tree(base)
    if marker.is_file():
        _say(progress, f"base: cached at {base}")
        return base / "rootfs"
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed", hint="apt-get install debootstrap")
    mirror = apt_mirror()
    tmp = images_dir() / f".base-{base_id()}.tmp-{os.getpid()}"
    await _remove_tree(tmp)
    await _remove_tree(base)
    tmp.mkdir(parents=True)
    log_path = tmp.parent / f"debootstrap-{base_id()}.log"
    _say(progress, f"base: {BASE_RECIPE} (mirror from apt configuration), about 40 s")
    t0 = time.monotonic()
    try:
        done = await run(
            ["debootstrap", *BASE_ARGS, SUITE, str(tmp / "rootfs"), mirror],
            timeout=1800,
            check=False,
        )
        log_path.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise ImageToolError(
                "debootstrap failed",
                cmd=done.argv,
                returncode=done.returncode,
                stderr=done.stderr or done.stdout,
                log_path=log_path,
            )
        # The downloaded .deb files are not part of the image.
        await run(["rm", "-rf", "--one-file-system", str(tmp / "rootfs/var/cache/apt/archives")])
        (tmp / "rootfs/var/cache/apt/archives/partial").mkdir(parents=True)
        (tmp / "complete").write_text(json.dumps({"recipe": BASE_RECIPE, "mirror": mirror}))
        tmp.rename(base)
    except BaseException:
        await _remove_tree(tmp)
        raise
    _say(progress, f"base: built in {time.monotonic() - t0:.1f} s")
    return base / "rootfs"


async def _chroot_python(rootfs: Path, *args: str, what: str) -> str:
    done = await run(
        ["chroot", str(rootfs), "/usr/bin/python3", *args],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
        timeout=300,
        error=ImageToolError,
        what=what,
    )
    return done.stdout.strip()


async def _build_image(ident: str, base_rootfs: Path, progress: Progress | None) -> Path:
    t0 = time.monotonic()
    final = _image_dir(ident)
    tmp = images_dir() / f".sensor-{ident}.tmp-{os.getpid()}"
    await _remove_tree(tmp)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    try:
        # Hard links: the image shares the base's files (the rootfs is mounted read-only, so
        # nothing writes through them) and costs no space and a second to make.
        _say(progress, "image: linking the base")
        await run(["cp", "-al", str(base_rootfs), str(rootfs)], timeout=300)
        reqs = requirement_lines(_requirements_text())
        _say(progress, f"image: adding {', '.join(reqs)} with the host's pip")
        site = rootfs / SITE_PACKAGES
        site.mkdir(parents=True, exist_ok=True)
        await run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
                "--disable-pip-version-check", "--no-deps", "--no-compile",
                "--target", str(site), *reqs,
            ],
            timeout=600,
            error=ImageToolError,
            what="pip install into the image",
        )  # fmt: skip
        target = rootfs / SENSOR_IN_IMAGE.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SENSOR_SOURCE, target)
        target.chmod(0o644)
        sensor_sha = hashlib.sha256(SENSOR_SOURCE.read_bytes()).hexdigest()
        _say(progress, "image: checking aiocoap and sensor.py with the image's python3")
        # Compile once here: the rootfs is read-only in containers, so they could not cache it.
        await _chroot_python(
            rootfs, "-m", "compileall", "-q", "/" + SITE_PACKAGES, "/opt/fogmig",
            what="compiling the image's Python files",
        )  # fmt: skip
        version = await _chroot_python(
            rootfs, SENSOR_IN_IMAGE, "--check", what="sensor.py --check in the image"
        )
        info = ImageInfo(
            image_id=ident,
            base_recipe=BASE_RECIPE,
            requirements=reqs,
            sensor_sha256=sensor_sha,
            aiocoap_version=version,
            built_at=time.time(),
            build_seconds=round(time.monotonic() - t0, 3),
            rootfs=str(final / "rootfs"),
        )
        (tmp / MANIFEST).write_text(json.dumps(asdict(info), indent=2) + "\n")
        await _remove_tree(final)
        tmp.rename(final)
    except BaseException:
        await _remove_tree(tmp)
        raise
    return final / "rootfs"


async def _prune(keep: set[str], progress: Progress | None) -> None:
    """Keep only the current image and the base: old images are just dead weight."""
    for p in sorted(images_dir().iterdir()):
        if p.name in keep or not p.is_dir():
            continue
        if p.name.startswith(("sensor-", "base-")):
            _say(progress, f"removing the old {p.name}")
            await _remove_tree(p)
    for p in images_dir().glob("debootstrap-*.log"):
        if p.name != f"debootstrap-{base_id()}.log":
            p.unlink(missing_ok=True)


async def ensure_image(*, progress: Progress | None = None, force: bool = False) -> Path:
    """Return the current image's rootfs, building it first if it is missing or out of date.

    ``force`` rebuilds the base and the image from scratch. Safe to call from several
    processes at once: one builds, the others wait and reuse.
    """
    if not force:
        found = find_image()
        if found is not None:
            _say(progress, f"image {image_id()}: up to date")
            return found
    _check_root()
    async with _BuildLock(images_dir() / ".lock"):
        if not force:
            found = find_image()
            if found is not None:
                _say(progress, f"image {image_id()}: up to date")
                return found
        ident = image_id()
        t0 = time.monotonic()
        try:
            base_rootfs = await _ensure_base(progress, force)
            rootfs = await _build_image(ident, base_rootfs, progress)
        except FogmigError:
            raise
        except OSError as exc:
            raise ImageBuildError(f"building the service image failed: {exc}") from exc
        await _prune({_base_dir().name, _image_dir(ident).name}, progress)
        _say(progress, f"image {ident}: built in {time.monotonic() - t0:.1f} s at {rootfs}")
        return rootfs
