"""The libbpf binding against the running kernel: CO-RE objects open, relocate, load and run."""

from __future__ import annotations

import ctypes as ct
import os
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest
from core_objects import CORE_HEADERS, EXE_INODES, compile_btf, compile_core

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import libbpf
from beekeeper.node_daemon.libbpf import BpfObject, GlobalDataError, ObjectLoadFailed, ObjectOpenFailed

pytestmark = pytest.mark.kernel

EXE_INODES_AND_XDP = EXE_INODES + textwrap.dedent(
    """
    SEC("xdp")
    int pass_all(struct xdp_md *ctx) { return XDP_PASS; }
    """
)

OPEN_OPTS_LAYOUT = textwrap.dedent(
    """
    #include <stddef.h>
    #include <stdio.h>
    #include <bpf/libbpf.h>
    #define F(f) printf(#f " %zu\\n", offsetof(struct bpf_object_open_opts, f))
    int main(void) {
        printf("sz_total %zu\\n", sizeof(struct bpf_object_open_opts));
        F(sz); F(object_name); F(relaxed_maps); F(pin_root_path); F(kconfig);
        F(btf_custom_path); F(kernel_log_buf); F(kernel_log_size); F(kernel_log_level);
        return 0;
    }
    """
)


@pytest.fixture(scope="module")
def exe_inodes() -> bytes:
    return compile_core(EXE_INODES_AND_XDP, "exe_inodes")


def test_open_opts_match_the_c_struct(tmp_path: Path) -> None:
    (tmp_path / "layout.c").write_text(OPEN_OPTS_LAYOUT)
    subprocess.run(["cc", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    c = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    py = {name: getattr(libbpf._OpenOpts, name).offset for name in c if name != "sz_total"}
    assert py == {k: v for k, v in c.items() if k != "sz_total"}
    assert ct.sizeof(libbpf._OpenOpts) == c["sz_total"]


def test_lists_programs_maps_and_variables(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes, name="listing") as obj:
        progs = {p.name: p for p in obj.programs()}
        assert progs["count_exe"].section == "tracepoint/syscalls/sys_enter_getppid"
        assert progs["count_exe"].type == bpf.PROG_TYPE_TRACEPOINT
        assert progs["pass_all"].type == bpf.PROG_TYPE_XDP
        assert progs["pass_all"].expected_attach_type == bpf.ATTACH_XDP
        maps = {m.name: m for m in obj.maps()}
        assert (maps["exe_inodes"].key_size, maps["exe_inodes"].value_size, maps["exe_inodes"].max_entries) == (
            8,
            8,
            64,
        )
        assert not maps["exe_inodes"].internal
        assert any(m.internal and m.name.endswith(".rodata") for m in maps.values())
        variables = obj.global_variables()
        assert (variables["target_tgid"].size, variables["step"].size) == (4, 8)
        assert {v.section for v in variables.values()} == {".rodata"}


def _getppid_counts(obj: BpfObject, step: int) -> dict[int, int]:
    """Load count_exe for this process with the given step, run getppid 3 times, read the map."""
    obj.load_only({"count_exe"})
    obj.set_global_data({"target_tgid": struct.pack("<I", os.getpid()), "step": struct.pack("<Q", step)})
    obj.load()
    with obj.program_fd("count_exe") as prog, obj.map_fd("exe_inodes") as counts:
        tp_id = int(Path("/sys/kernel/tracing/events/syscalls/sys_enter_getppid/id").read_text())
        with bpf.perf_event_open(bpf.PERF_TYPE_TRACEPOINT, tp_id) as event:
            link = bpf.link_create(prog.fd, event.fd, bpf.ATTACH_PERF_EVENT)
        with link:
            for _ in range(3):
                os.getppid()
        return {struct.unpack("<Q", k)[0]: struct.unpack("<Q", v)[0] for k, v in bpf.map_items(counts.fd, 8, 8)}


def test_core_read_of_task_struct_runs_and_global_data_changes_behaviour(exe_inodes: bytes) -> None:
    """BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino) relocated against this kernel finds our
    own executable's inode; the const volatile step set before load is what the program adds."""
    exe_inode = os.stat("/proc/self/exe").st_ino
    for step in (1, 7):
        with BpfObject.open(exe_inodes, name="exe_inodes") as obj:
            assert _getppid_counts(obj, step) == {exe_inode: 3 * step}


def test_fds_outlive_the_object(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as obj:
        obj.load_only({"pass_all"})
        obj.load()
        prog = obj.program_fd("pass_all")
    with prog:
        assert bpf.prog_info(prog.fd).type == bpf.PROG_TYPE_XDP


def test_only_the_selected_programs_load(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as obj:
        obj.load_only({"pass_all"})
        obj.load()
        with pytest.raises(bpf.BpfError, match="count_exe is not loaded"):
            obj.program_fd("count_exe")


def test_set_program_type_overrides_the_section(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as obj:
        obj.load_only({"pass_all"})
        obj.set_program_type("pass_all", bpf.PROG_TYPE_SCHED_CLS, 0)
        obj.load()
        with obj.program_fd("pass_all") as prog:
            assert bpf.prog_info(prog.fd).type == bpf.PROG_TYPE_SCHED_CLS


def test_reused_map_is_shared(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as first:
        first.load_only({"count_exe"})
        first.load()
        shared = first.map_fd("exe_inodes")
    with shared, BpfObject.open(exe_inodes) as second:
        second.reuse_map("exe_inodes", shared.fd)
        second.load_only({"count_exe"})
        second.load()
        with second.map_fd("exe_inodes") as fd:
            assert bpf.map_info(fd.fd).id == bpf.map_info(shared.fd).id


def test_global_data_errors_name_the_variable(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as obj:
        with pytest.raises(GlobalDataError, match=r"nosuch: no such global variable .*has: step, target_tgid"):
            obj.set_global_data({"nosuch": b"\0"})
        with pytest.raises(GlobalDataError, match="step: the variable is 8 bytes, the value has 4"):
            obj.set_global_data({"step": b"\1\0\0\0"})


def test_unknown_names_list_what_the_object_has(exe_inodes: bytes) -> None:
    with BpfObject.open(exe_inodes) as obj:
        with pytest.raises(KeyError, match=r"no program 'nosuch' .*has: count_exe, pass_all"):
            obj.load_only({"nosuch"})
        with pytest.raises(KeyError, match="no map 'nosuch'"):
            obj.reuse_map("nosuch", 0)


def test_malformed_elf_is_a_clear_error() -> None:
    with pytest.raises(ObjectOpenFailed, match="not a usable BPF ELF object"):
        BpfObject.open(b"\x7fELF" + b"\0" * 60)
    with pytest.raises(ObjectOpenFailed):
        BpfObject.open(b"this is not an object")


def test_relocation_failure_against_a_custom_btf_names_the_field(exe_inodes: bytes) -> None:
    """A 'kernel' whose task_struct has no mm: the read is poisoned and the load names it."""
    btf = compile_btf("struct task_struct { int pid; int tgid; };\nstruct task_struct used;\n", "no_mm")
    with BpfObject.open(exe_inodes, btf_custom_path=str(btf)) as obj:
        obj.load_only({"count_exe"})
        with pytest.raises(ObjectLoadFailed) as info:
            obj.load()
    failure = info.value
    assert failure.program == "count_exe"
    assert failure.relocation_failed
    assert [r.field for r in failure.relocations] == ["struct task_struct.mm"]
    assert "CO-RE relocation failed in program 'count_exe': struct task_struct.mm does not exist" in failure.message
    assert "<invalid CO-RE relocation>" in failure.verifier_log


def test_verifier_rejection_carries_the_log() -> None:
    obj_bytes = compile_core(
        CORE_HEADERS
        + 'char LICENSE[] SEC("license") = "GPL";\n'
        + 'SEC("xdp") int deref(struct xdp_md *ctx) { return *(int *)(long)ctx->data; }\n',
        "unchecked",
    )
    with BpfObject.open(obj_bytes) as obj, pytest.raises(ObjectLoadFailed) as info:
        obj.load()
    assert info.value.program == "deref"
    assert not info.value.relocation_failed
    assert "invalid access to packet" in info.value.verifier_log
    assert info.value.message.startswith("verifier rejected program 'deref'")
