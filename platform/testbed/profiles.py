"""Link profiles of the testbed: the rate and round-trip time of every emulated data link.

Built-in profiles live in ``profiles.toml`` next to this module; ``--profile`` also accepts a
TOML file of the same shape (one table per profile, or the two keys at top level).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.base.errors import ConfigError

DEFAULT_PROFILE = "mobility"

# Bounds that the userspace link emulator can honour; beyond them the figures are not credible.
MAX_RATE_MBIT = 1000.0
MAX_RTT_MS = 10_000.0


class LinkProfile(BaseModel):
    """One data link's shape: the same profile applies to every link of the testbed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    rate_mbit: float = Field(gt=0, le=MAX_RATE_MBIT, description="link rate, Mbit/s")
    rtt_ms: float = Field(ge=0, le=MAX_RTT_MS, description="round-trip time, milliseconds")

    def describe(self) -> str:
        return f"{self.name} ({self.rate_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT)"


def _validate(name: str, raw: Any, source: str) -> LinkProfile:
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {name!r} in {source} must be a table with rate_mbit and rtt_ms")
    try:
        return LinkProfile.model_validate({"name": name, **raw})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid profile {name!r} in {source}: {problems}") from exc


def parse_profiles(text: str, source: str) -> dict[str, LinkProfile]:
    """Parse a profiles TOML document: ``[name]`` tables, or one profile at top level."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    if not doc:
        raise ConfigError(f"{source} defines no profile")
    if "rate_mbit" in doc or "rtt_ms" in doc:
        name = str(doc.pop("name", Path(source).stem))
        return {name: _validate(name, doc, source)}
    return {name: _validate(name, raw, source) for name, raw in doc.items()}


def builtin_profiles() -> dict[str, LinkProfile]:
    text = resources.files("fogmig.platform.testbed").joinpath("profiles.toml").read_text()
    return parse_profiles(text, "built-in profiles.toml")


def load_profile(spec: str) -> LinkProfile:
    """A built-in profile by name, or the profile in a TOML file (path ending in ``.toml``).

    A file holding several profiles needs ``path.toml:name``.
    """
    builtins = builtin_profiles()
    if spec in builtins:
        return builtins[spec]
    path_part, _, wanted = spec.partition(":") if ".toml:" in spec else (spec, "", "")
    path = Path(path_part)
    if path.suffix != ".toml":
        raise ConfigError(
            f"unknown profile {spec!r}",
            hint=f"use one of {', '.join(sorted(builtins))} or a path to a .toml file",
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read profile file {path}: {exc.strerror}") from exc
    found = parse_profiles(text, str(path))
    if wanted:
        if wanted not in found:
            raise ConfigError(f"{path} has no profile {wanted!r} (it has {', '.join(found)})")
        return found[wanted]
    if len(found) > 1:
        raise ConfigError(
            f"{path} defines several profiles ({', '.join(found)})",
            hint=f"pick one with {path}:NAME",
        )
    return next(iter(found.values()))
