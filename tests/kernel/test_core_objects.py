"""CO-RE objects through the kernel backend: loaded by libbpf in a worker, pinned and attached
like bcc builds, configured by globalData, adopted after a restart, failures named."""

from __future__ import annotations

import os
import struct
import textwrap
from pathlib import Path

import pytest
from core_objects import EXE_INODES, compile_core
from support import wait_for

from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit
from beekeeper.node_daemon.kernel_backend import KernelBackend

pytestmark = pytest.mark.kernel

EXE_COUNTS = EXE_INODES + textwrap.dedent(
    """

    /* A struct this kernel does not have a field of: libbpf poisons the read. */
    struct task_struct___future { int beekeeper_future_field; } __attribute__((preserve_access_index));

    SEC("tracepoint/syscalls/sys_enter_getppid")
    int read_future(void *ctx)
    {
        struct task_struct___future *task = (void *)bpf_get_current_task();
        return BPF_CORE_READ(task, beekeeper_future_field);
    }

    SEC("xdp")
    int unchecked(struct xdp_md *ctx) { return *(int *)(long)ctx->data; }
    """
)


@pytest.fixture(scope="module")
def exe_counts() -> bytes:
    return compile_core(EXE_COUNTS, "exe_counts")


def _unit(obj: bytes, step: int, *extra: AttachSpec) -> ProgramUnit:
    return ProgramUnit(
        "core-exe",
        bytecode=obj,
        global_data=(("target_tgid", struct.pack("<I", os.getpid())), ("step", struct.pack("<Q", step))),
        programs=[AttachSpec("count_exe", "tracepoint", tracepoint="syscalls:sys_enter_getppid"), *extra],
    )


def _counts(backend: KernelBackend) -> dict[object, int]:
    return {e.key: e.values[0] for e in backend.read_map("core-exe", "exe_inodes")}


def test_core_tracepoint_runs_and_global_data_reconfigures_it(backend, exe_counts):
    (report,) = backend.apply(_unit(exe_counts, 1))
    assert report.phase == Phase.ATTACHED, report
    assert report.attach_points == ("tracepoint:syscalls:sys_enter_getppid",)
    exe = os.stat("/proc/self/exe").st_ino
    for _ in range(5):
        os.getppid()
    assert _counts(backend) == {exe: 5}, "BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino) relocated wrong"

    (updated,) = backend.apply(_unit(exe_counts, 100))
    assert updated.phase == Phase.ATTACHED, updated
    assert updated.program_ids != report.program_ids, "new globalData is a new build"
    for _ in range(2):
        os.getppid()
    assert _counts(backend) == {exe: 200}, "the new build has its own maps and adds the new step"


def test_relocation_failure_names_program_and_field_and_spares_siblings(backend, exe_counts):
    future = AttachSpec("read_future", "tracepoint", tracepoint="syscalls:sys_enter_getppid")
    good, bad = backend.apply(_unit(exe_counts, 1, future))
    assert good.phase == Phase.ATTACHED, good
    assert (bad.phase, bad.reason) == (Phase.FAILED, "RelocationFailed")
    assert bad.message.startswith(
        "CO-RE relocation failed in program 'read_future': struct task_struct.beekeeper_future_field does not exist"
    ), bad.message
    os.getppid()
    assert sum(_counts(backend).values()) == 1


def test_verifier_rejection_and_missing_functions_are_reported(backend, exe_counts):
    unchecked = AttachSpec("unchecked", "xdp", interfaces=["lo"], xdp_mode="generic")
    missing = AttachSpec("nosuch", "tracepoint", tracepoint="syscalls:sys_enter_getppid")
    good, rejected, not_found = backend.apply(_unit(exe_counts, 1, unchecked, missing))
    assert good.phase == Phase.ATTACHED, good
    assert (rejected.reason, not_found.reason) == ("VerifierRejected", "FunctionNotFound")
    assert rejected.message.startswith("verifier rejected unchecked: "), rejected.message
    assert "\n  at int unchecked(struct xdp_md *ctx) { return *(int *)(long)ctx->data; } @ exe_counts.c:" in (
        rejected.message
    ), "the object's own line info names the source line"
    assert "verifier log (tail):" in rejected.message
    assert "invalid access to packet" in rejected.message
    assert not_found.message == (
        "no program 'nosuch' in the object; it has: count_exe (section tracepoint/syscalls/sys_enter_getppid), "
        "read_future (section tracepoint/syscalls/sys_enter_getppid), unchecked (section xdp)"
    )


def test_a_program_is_selected_by_its_unique_section_name(backend, exe_counts):
    (report,) = backend.apply(
        ProgramUnit("core-section", bytecode=exe_counts, programs=[AttachSpec("xdp", "xdp", interfaces=["lo"])])
    )
    assert (report.phase, report.reason) == (Phase.FAILED, "VerifierRejected"), "section xdp is `unchecked`"


def test_bad_global_data_and_malformed_objects_fail_the_unit_only(backend, exe_counts):
    spec = AttachSpec("count_exe", "tracepoint", tracepoint="syscalls:sys_enter_getppid")
    (unknown,) = backend.apply(
        ProgramUnit("core-gd", bytecode=exe_counts, global_data=(("nosuch", b"\1"),), programs=[spec])
    )
    assert (unknown.phase, unknown.reason) == (Phase.FAILED, "InvalidSpec")
    assert unknown.message.startswith("globalData: nosuch: no such global variable"), unknown.message
    (size,) = backend.apply(
        ProgramUnit("core-gd", bytecode=exe_counts, global_data=(("step", b"\1"),), programs=[spec])
    )
    assert size.message == "globalData: step: the variable is 8 bytes, the value has 1"

    truncated = exe_counts[: len(exe_counts) // 2]
    for garbage in (b"\x7fELF" + os.urandom(200), truncated, b"not an object"):
        (report,) = backend.apply(ProgramUnit("core-garbage", bytecode=garbage, programs=[spec]))
        assert (report.phase, report.reason) == (Phase.FAILED, "InvalidBytecode"), report
        assert report.message.startswith("not a usable BPF ELF object"), report.message
    (still,) = backend.apply(_unit(exe_counts, 1))
    assert still.phase == Phase.ATTACHED


def test_restart_adopts_core_programs_without_reloading(bpffs_dir: Path, tmp_path: Path, exe_counts):
    state = str(tmp_path / "state")
    first = KernelBackend(str(bpffs_dir), state)
    try:
        (report,) = first.apply(_unit(exe_counts, 3))
    finally:
        first.close()
    os.getppid()
    again = KernelBackend(str(bpffs_dir), state)
    try:
        assert again.adopted() == {"core-exe": _unit(exe_counts, 3).content_hash}
        (adopted,) = again.apply(_unit(exe_counts, 3))
        assert adopted == report, "same program ids and attach points: adopted, not reloaded"
        os.getppid()
        assert _counts(again) == {os.stat("/proc/self/exe").st_ino: 6}
    finally:
        again.remove("core-exe")
        again.close()


def test_fentry_fexit_lsm_follow_the_kernels_answer(backend):
    """On these machines the kernel refuses BPF_PROG_TYPE_TRACING and LSM loads with EPERM
    (even to root): the probe reports it and programs of those types fail with its words."""
    caps = backend.capabilities()
    refused = {t: caps.support(t) for t in ("fentry", "fexit", "lsm") if not caps.support(t).supported}
    if not refused:
        pytest.skip("this kernel loads fentry, fexit and lsm programs")
    for support in refused.values():
        assert "the kernel refused a minimal" in support.reason and "(E" in support.reason, support.reason
    spec = AttachSpec(
        "whatever", next(iter(refused)), btf_target="do_unlinkat" if "lsm" not in refused else "file_open"
    )
    (report,) = backend.apply(ProgramUnit("core-btf", bytecode=b"unused", programs=[spec]))
    assert (report.phase, report.reason) == (Phase.FAILED, "UnsupportedOnNode")
    assert report.message.endswith(refused[spec.type].reason)


def _waiting_for_a_job(pid: int) -> str:
    """The worker's mapped files once it blocks in recvfrom (its imports are done by then)."""
    recvfrom = "45"  # x86_64
    syscall = Path(f"/proc/{pid}/syscall")
    wait_for(lambda: syscall.read_text().split()[0] == recvfrom, 20, f"worker {pid} ready")
    return Path(f"/proc/{pid}/maps").read_text()


def test_object_loads_run_in_workers_without_bcc_and_source_builds_still_follow(backend, exe_counts):
    """A spare worker is started for the kind of job that came last: an object load neither
    imports bcc nor waits for it, and a source build after it still compiles."""
    source = ProgramUnit(
        "source-after-object",
        "int healthy(void *ctx) { return 0; }\n",
        programs=[AttachSpec("healthy", "tracepoint", tracepoint="syscalls:sys_enter_getppid")],
    )
    try:
        for unit in (_unit(exe_counts, 1), source, _unit(exe_counts, 2)):
            (report,) = backend.apply(unit)
            assert report.phase == Phase.ATTACHED, report
            spare = backend._workers._spare
            assert spare is not None
            assert ("libbcc" in _waiting_for_a_job(spare.proc.pid)) == (unit is source), unit.key
    finally:
        backend.remove("source-after-object")
