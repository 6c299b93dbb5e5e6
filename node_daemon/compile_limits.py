"""The bounds of one build of user code; a daemon flag each (see beekeeper node-daemon --help).

Apart from compile_worker so that the daemon's entry point can take them without
importing bcc (the fake backend runs without it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompileLimits:
    """What one build may use; a build over a limit fails, the daemon carries on."""

    timeout: float = 120.0
    """Seconds for compiling and loading (verifying) every function of a unit."""
    memory_mib: int = 2048
    """Address space of the worker (RLIMIT_AS)."""
    sandbox: bool = True
    """Confine the worker's file reads to the kernel headers with Landlock."""
