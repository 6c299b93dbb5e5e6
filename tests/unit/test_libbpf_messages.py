"""Turning libbpf's messages into the failing program and the field a CO-RE relocation missed."""

from __future__ import annotations

import errno

from beekeeper.node_daemon.libbpf import FailedRelocation, ObjectLoadFailed, failed_relocations, verifier_reason

MESSAGES = [
    ("debug", "libbpf: sec '.reltp': relo #0: insn #1 against 'target_tgid'\n"),
    ("debug", "libbpf: prog 'good': relo #0: <byte_off> [15] struct task_struct.mm (0:61 @ offset 1136)\n"),
    ("debug", "libbpf: prog 'good': relo #0: patched insn #9 (ALU/ALU64) imm 1136 -> 1136\n"),
    ("debug", "libbpf: prog 'bad': relo #0: <byte_off> [416] struct task_struct___old.nosuch (0:0 @ offset 0)\n"),
    ("debug", "libbpf: prog 'bad': relo #0: non-matching candidate #0 <byte_off> [114] struct task_struct\n"),
    ("debug", "libbpf: prog 'bad': relo #0: no matching targets found\n"),
    ("debug", "libbpf: prog 'bad': relo #0: substituting insn #1 w/ invalid insn\n"),
    ("warn", "libbpf: prog 'bad': BPF program load failed: Invalid argument\n"),
]

POISONED_LOG = """0: R1=ctx() R10=fp0
0: (85) call bpf_get_current_task#35          ; R0=scalar()
1: <invalid CO-RE relocation>
failed to resolve CO-RE relocation <byte_off> [416] struct task_struct___old.nosuch (0:0 @ offset 0)
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
"""


def test_only_relocations_without_a_match_are_failures() -> None:
    assert failed_relocations(MESSAGES) == [
        FailedRelocation("bad", "<byte_off> [416] struct task_struct___old.nosuch (0:0 @ offset 0)")
    ]


def test_the_field_drops_the_flavor_suffix() -> None:
    relo = FailedRelocation("bad", "<byte_off> [416] struct task_struct___old.nosuch (0:0 @ offset 0)")
    assert relo.field == "struct task_struct.nosuch"
    assert FailedRelocation("p", "<field_exists> [3] struct sk_buff.len (0:2 @ offset 112)").field == (
        "struct sk_buff.len"
    )


def test_relocation_failure_message_names_program_and_field() -> None:
    exc = ObjectLoadFailed(errno.EINVAL, "bad", POISONED_LOG, failed_relocations(MESSAGES), "")
    assert exc.relocation_failed
    assert exc.message.startswith(
        "CO-RE relocation failed in program 'bad': struct task_struct.nosuch does not exist in this kernel's BTF"
    )


def test_verifier_rejection_message_quotes_its_reason() -> None:
    log = "0: (61) r0 = *(u32 *)(r1 +0)\ninvalid access to packet, off=0 size=4\nprocessed 1 insns\n"
    exc = ObjectLoadFailed(errno.EACCES, "deref", log, [], "")
    assert not exc.relocation_failed
    assert exc.message == "verifier rejected program 'deref': invalid access to packet, off=0 size=4"
    assert verifier_reason("processed 0 insns\n") == ""


def test_other_failures_carry_libbpf_words() -> None:
    exc = ObjectLoadFailed(errno.EPERM, None, "", [], "libbpf: map 'big': failed to create: Operation not permitted")
    assert exc.message.startswith("loading the object failed: Operation not permitted\nlibbpf: map 'big'")
