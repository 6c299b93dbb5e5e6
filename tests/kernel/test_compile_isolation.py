"""User C is compiled in a confined worker: a crash, hang or memory blow-up of the compiler
fails that build only, and the compiler reads no file but the kernel headers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from support import STACK_HOG, nested_macros

from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit, Reason
from beekeeper.node_daemon.compile_limits import CompileLimits
from beekeeper.node_daemon.kernel_backend import KernelBackend

pytestmark = pytest.mark.kernel

GETPPID = "syscalls:sys_enter_getppid"

HEALTHY = "int healthy(void *ctx) { return 0; }\n"


def repeated_tokens(depth: int) -> str:
    """A source whose `#if` line expands to 2**depth tokens, all held in memory at once."""
    lines = ["#define A0 +1"]
    lines += [f"#define A{i} A{i - 1} A{i - 1}" for i in range(1, depth + 1)]
    lines += [f"#if 0 A{depth}", "#endif", "int hungry(void *ctx) { return 0; }"]
    return "\n".join(lines) + "\n"


def _unit(key: str, source: str, function: str) -> ProgramUnit:
    return ProgramUnit(key, source, programs=[AttachSpec(function, "tracepoint", tracepoint=GETPPID)])


def _workers_of(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "compile_worker" in line]


@pytest.fixture
def limited(bpffs_dir: Path, tmp_path: Path):
    """A backend factory with chosen compile limits; units are removed afterwards."""
    made: list[KernelBackend] = []

    def make(**limits) -> KernelBackend:
        made.append(KernelBackend(str(bpffs_dir), str(tmp_path / "state"), compile_limits=CompileLimits(**limits)))
        return made[-1]

    yield make
    for be in made:
        for key in be.adopted():
            be.remove(key)
        be.close()


def test_a_compiler_that_exits_fails_only_its_build_with_its_words(backend):
    (crashed,) = backend.apply(_unit("stack-hog", STACK_HOG, "big_stack"))
    assert (crashed.phase, crashed.reason) == (Phase.FAILED, Reason.COMPILE_ERROR), crashed
    assert "Looks like the BPF stack limit of 512 bytes is exceeded" in crashed.message
    assert "exited with status 1" in crashed.message

    (healthy,) = backend.apply(_unit("healthy", HEALTHY, "healthy"))
    assert healthy.phase == Phase.ATTACHED, healthy
    assert backend.apply(_unit("stack-hog", STACK_HOG, "big_stack")) == [crashed], "a crash is not retried"


def test_a_compiler_that_hangs_is_stopped_at_the_timeout(limited):
    backend = limited(timeout=2.0)
    started = time.monotonic()
    (hung,) = backend.apply(_unit("hang", nested_macros(30), "slow"))
    took = time.monotonic() - started
    assert (hung.phase, hung.reason) == (Phase.FAILED, Reason.COMPILE_TIMEOUT), hung
    assert "did not finish within 2s" in hung.message
    assert took < 10, f"the timeout of 2s took {took:.1f}s"
    assert len(_workers_of(os.getpid())) <= 1, "only the spare worker may remain"

    (healthy,) = backend.apply(_unit("healthy", HEALTHY, "healthy"))
    assert healthy.phase == Phase.ATTACHED, healthy


def test_a_compiler_out_of_memory_fails_its_build(limited):
    backend = limited(memory_mib=512, timeout=60.0)
    (hungry,) = backend.apply(_unit("hungry", repeated_tokens(26), "hungry"))
    assert (hungry.phase, hungry.reason) == (Phase.FAILED, Reason.COMPILE_ERROR), hungry
    assert "its memory limit is 512 MiB" in hungry.message
    (healthy,) = backend.apply(_unit("healthy", HEALTHY, "healthy"))
    assert healthy.phase == Phase.ATTACHED, healthy


def test_include_of_a_host_file_is_refused_and_not_echoed(backend):
    hostname = Path("/etc/hostname").read_text().strip()
    source = '#include "/etc/hostname"\n' + HEALTHY
    (report,) = backend.apply(_unit("hostname", source, "healthy"))
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.COMPILE_ERROR), report
    assert "cannot open file '/etc/hostname': Permission denied" in report.message
    assert f"'{hostname}'" not in report.message and hostname not in report.message.splitlines()


def test_include_built_by_a_macro_is_refused_too(backend, tmp_path: Path):
    secret = tmp_path / "secret.h"
    secret.write_text("bk_secret_token_4242\n")
    source = f"#define STR(x) #x\n#define XSTR(x) STR(x)\n#define WHERE {secret}\n#include XSTR(WHERE)\n" + HEALTHY
    (report,) = backend.apply(_unit("macro-include", source, "healthy"))
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.COMPILE_ERROR), report
    assert "Permission denied" in report.message
    assert "bk_secret_token" not in report.message


def test_errors_in_headers_quote_no_header_lines(backend):
    source = "#define __be16 )\n#include <uapi/linux/if_ether.h>\n" + HEALTHY
    (report,) = backend.apply(_unit("header-error", source, "healthy"))
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.COMPILE_ERROR), report
    assert "if_ether.h:176:2: error: type name requires a specifier or qualifier" in report.message
    assert "h_proto" not in report.message, "a header's line was quoted"


def test_reading_past_a_tracepoint_context_says_why_attach_is_refused(backend):
    source = "struct past { u64 pad[4]; u64 beyond; };\nint past_ctx(struct past *ctx) { return ctx->beyond; }\n"
    (report,) = backend.apply(_unit("past-ctx", source, "past_ctx"))
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.ATTACH_FAILED), report
    point = f"tracepoint:{GETPPID}"
    assert report.message.count(point) == 1, report.message
    assert "Permission denied" in report.message
    assert "reads past the 12 bytes of its context" in report.message, report.message
