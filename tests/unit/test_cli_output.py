"""What the `beekeeper` command prints: its version, and nothing but its output when the reader leaves."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from beekeeper.version import version


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "beekeeper.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"beekeeper {version()} (Python {platform.python_version()})"
    assert version() != "unknown"


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`beekeeper dev status | head`: the pipe is closed before the command writes anything."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "BEEKEEPER_STATE_DIR": str(tmp_path / "state")}
    with os.fdopen(write, "wb") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "beekeeper.cli", "dev", "status"], stdout=stdout, stderr=subprocess.PIPE, env=env
        )
    assert result.stderr.decode() == "" and result.returncode == 141, result.stderr.decode()
