"""Building small CO-RE objects in tests: clang -target bpf -g -O2 against this kernel's BTF.

vmlinux.h is dumped from /sys/kernel/btf/vmlinux with bpftool once per test process; the
objects are stripped of DWARF (the BTF that CO-RE needs stays), which keeps them well
under a ConfigMap's size.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

CORE_HEADERS = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n#include <bpf/bpf_core_read.h>\n'
EXE_INODES = CORE_HEADERS + textwrap.dedent(
    """
    char LICENSE[] SEC("license") = "GPL";
    const volatile __u32 target_tgid = 0;
    const volatile __u64 step = 1;

    struct {
        __uint(type, BPF_MAP_TYPE_HASH);
        __uint(max_entries, 64);
        __type(key, __u64);
        __type(value, __u64);
    } exe_inodes SEC(".maps");

    SEC("tracepoint/syscalls/sys_enter_getppid")
    int count_exe(void *ctx)
    {
        if (bpf_get_current_pid_tgid() >> 32 != target_tgid)
            return 0;
        struct task_struct *task = (void *)bpf_get_current_task();
        __u64 ino = BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino);
        __u64 *n = bpf_map_lookup_elem(&exe_inodes, &ino);
        if (n) {
            __sync_fetch_and_add(n, step);
        } else {
            __u64 first = step;
            bpf_map_update_elem(&exe_inodes, &ino, &first, BPF_NOEXIST);
        }
        return 0;
    }
    """
)
"""A CO-RE program the libbpf and backend tests share: count_exe counts getppid() calls of the
process target_tgid by `step`, keyed by the inode of its executable (a CO-RE read through
task->mm->exe_file); tests append the functions they need."""

SYSCALL_COUNTER = CORE_HEADERS + textwrap.dedent(
    """
    struct {
        __uint(type, BPF_MAP_TYPE_HASH);
        __uint(max_entries, 16);
        __type(key, __u32);
        __type(value, __u64);
    } counts SEC(".maps");

    SEC("tracepoint/raw_syscalls/sys_enter")
    int count_syscalls(void *ctx)
    {
        __u32 key = VARIANT;
        __u64 one = 1, *value = bpf_map_lookup_elem(&counts, &key);
        if (value)
            __sync_fetch_and_add(value, 1);
        else
            bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST);
        return 0;
    }

    char LICENSE[] SEC("license") = "GPL";
    """
)
"""The bytecode-image tests' program: count_syscalls counts every syscall under the one key VARIANT
(replaced per image, so each variant is different bytes with a recognisable series)."""


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="beekeeper-core-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    header = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
        check=True,
        capture_output=True,
    ).stdout
    (path / "vmlinux.h").write_bytes(header)
    return path


def compile_core(source: str, name: str = "prog", cflags: Sequence[str] = ()) -> bytes:
    """The stripped ELF object of source (a complete C file; CORE_HEADERS gives the usual includes)."""
    work = _workdir()
    src, obj = work / f"{name}.c", work / f"{name}.o"
    src.write_text(source)
    subprocess.run(
        [
            "clang",
            "-target",
            "bpf",
            "-g",
            "-O2",
            "-D__TARGET_ARCH_x86",
            f"-I{work}",
            *cflags,
            "-c",
            str(src),
            "-o",
            str(obj),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(["llvm-strip", "-g", str(obj)], check=True)
    return obj.read_bytes()


def compile_btf(source: str, name: str = "btf") -> Path:
    """An ELF object whose .BTF describes the types in source: a stand-in kernel BTF
    (btf_custom_path) to test relocations against a kernel that lacks some field."""
    work = _workdir()
    src, obj = work / f"{name}.c", work / f"{name}.o"
    src.write_text(source)
    subprocess.run(["clang", "-target", "bpf", "-g", "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
    return obj
