"""Tracepoint, raw tracepoint and uprobe programs, triggered by this test process."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit

pytestmark = pytest.mark.kernel

COUNT_BY_PROCESS = r"""
BPF_HASH(calls, u32, u64, 1024);

int count(void *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 zero = 0;
    u64 *n = calls.lookup_or_try_init(&tgid, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""

RAW_SYSCALL_COUNTER = r"""
#include <asm/unistd.h>

BPF_ARRAY(getppid_calls, u64, 1);

int on_sys_enter(struct bpf_raw_tracepoint_args *ctx) {
    if (bpf_get_current_pid_tgid() >> 32 != TGID || ctx->args[1] != __NR_getppid)
        return 0;
    int zero = 0;
    u64 *n = getppid_calls.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""

UPROBE_COUNTER = r"""
BPF_ARRAY(calls, u64, 2);

static __always_inline int bump(int slot) {
    u64 *n = calls.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
int on_entry(struct pt_regs *ctx) { return bump(0); }
int on_return(struct pt_regs *ctx) { return bump(1); }
"""

TARGET_BINARY = textwrap.dedent(
    """
    #include <stdio.h>
    #include <stdlib.h>

    __attribute__((noinline)) int bk_work(int x) {
        asm volatile("" ::: "memory");
        return x * 2;
    }

    int main(int argc, char **argv) {
        int total = 0;
        for (int i = 0; i < atoi(argv[1]); i++)
            total += bk_work(i);
        printf("%d\\n", total);
        return 0;
    }
    """
)


def test_tracepoint_counts_openat_of_this_process(backend, tmp_path):
    unit = ProgramUnit(
        "opens",
        COUNT_BY_PROCESS,
        programs=[AttachSpec("count", "tracepoint", tracepoint="syscalls:sys_enter_openat")],
    )
    (report,) = backend.apply(unit)
    assert report.phase == Phase.ATTACHED, report
    assert report.attach_points == ("tracepoint:syscalls:sys_enter_openat",)

    target = tmp_path / "f"
    target.write_text("x")
    for _ in range(25):
        os.close(os.open(target, os.O_RDONLY))
    counts = {e.key: e.values[0] for e in backend.read_map("opens", "calls")}
    assert counts.get(os.getpid(), 0) >= 25


def test_raw_tracepoint_counts_exact_syscalls(backend):
    unit = ProgramUnit(
        "raw-getppid",
        RAW_SYSCALL_COUNTER,
        cflags=[f"-DTGID={os.getpid()}"],
        programs=[AttachSpec("on_sys_enter", "raw_tracepoint", tracepoint="sys_enter")],
    )
    (report,) = backend.apply(unit)
    assert report.phase == Phase.ATTACHED, report
    assert report.attach_points == ("raw_tracepoint:sys_enter",)
    for _ in range(40):
        os.getppid()
    (entry,) = backend.read_map("raw-getppid", "getppid_calls")
    assert entry.values == (40,)


def test_uprobe_and_uretprobe_count_calls_of_a_binary(backend, tmp_path):
    source = tmp_path / "target.c"
    source.write_text(TARGET_BINARY)
    binary = tmp_path / "target"
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(source)], check=True)
    unit = ProgramUnit(
        "uprobes",
        UPROBE_COUNTER,
        programs=[
            AttachSpec("on_entry", "uprobe", binary=str(binary), symbol="bk_work"),
            AttachSpec("on_return", "uretprobe", binary=str(binary), symbol="bk_work"),
            AttachSpec("on_entry", "uprobe", binary=str(binary), symbol="bk_no_such_function"),
            AttachSpec("on_entry", "uprobe", binary=str(tmp_path / "missing"), symbol="main"),
        ],
    )
    entry, ret, no_symbol, no_binary = backend.apply(unit)
    assert entry.phase == ret.phase == Phase.ATTACHED, (entry, ret)
    assert entry.attach_points == (f"uprobe:{binary}:bk_work",)
    assert (no_symbol.reason, no_binary.reason) == ("SymbolNotFound", "BinaryNotFound")

    out = subprocess.run([str(binary), "7"], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "42"
    assert [e.values[0] for e in backend.read_map("uprobes", "calls")] == [7, 7]
