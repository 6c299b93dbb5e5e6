"""The version of the installed beekeeper: `beekeeper --version`, User-Agents and beekeeper_build_info."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed package's version (pyproject.toml), "unknown" when run from a bare checkout."""
    try:
        return metadata.version("beekeeper")
    except metadata.PackageNotFoundError:
        return "unknown"
