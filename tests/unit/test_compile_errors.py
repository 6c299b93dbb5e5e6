"""Parsing clang output and verifier logs into bounded messages."""

from __future__ import annotations

from beekeeper.node_daemon.compile_errors import (
    bound_head,
    bound_tail,
    compile_error_message,
    parse_clang_diagnostics,
    verifier_message,
)

CLANG_OUTPUT = """\
In file included from <built-in>:2:
/virtual/include/bcc/helpers.h:50:9: warning: 'x' macro redefined [-Wmacro-redefined]
#define x 1
        ^
/virtual/main.c:7:12: error: use of undeclared identifier 'counts'
    u64 *v = counts.lookup(&k);
           ^
/virtual/main.c:9:5: error: expected ';' after return statement
    return XDP_PASS
    ^
2 errors generated.
"""

# A level-1 log as Linux 6.18 prints it for a unit compiled by bcc (line numbers count
# bcc's rewritten copy of the source, which adds lines per function).
SOURCE = """\
BPF_HASH(seen, u32, u64, 16);
int unchecked(struct xdp_md *ctx) {
    u32 key = 0;
    u64 *n = seen.lookup(&key);
    *n += 1;
    return XDP_PASS;
}
"""
VERIFIER_LOG = """\
0: R1=ctx() R10=fp0
; int unchecked(struct xdp_md *ctx) { @ main.c:13
0: (b7) r1 = 0                        ; R1=0
; u32 key = 0; @ main.c:15
1: (63) *(u32 *)(r10 -4) = r1         ; R1=0 R10=fp0 fp-8=0000????
; u64 *n = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -2), &key); @ main.c:16
2: (18) r1 = 0xffff888104397c00       ; R1=map_ptr(map=seen,ks=4,vs=8)
;  @ main.c:0
5: (07) r2 += -4                      ; R2=fp-4
6: (85) call bpf_map_lookup_elem#1    ; R0=map_value_or_null(id=1,map=seen,ks=4,vs=8)
; *n += 1; @ main.c:17
7: (79) r1 = *(u64 *)(r0 +0)
R0 invalid mem access 'map_value_or_null'
processed 7 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0

"""


def test_diagnostics_are_parsed_with_context_and_virtual_prefix_removed():
    diags = parse_clang_diagnostics(CLANG_OUTPUT)
    assert [(d.path, d.line, d.column, d.severity) for d in diags] == [
        ("include/bcc/helpers.h", 50, 9, "warning"),
        ("main.c", 7, 12, "error"),
        ("main.c", 9, 5, "error"),
    ]
    assert diags[1].context == ("    u64 *v = counts.lookup(&k);", "           ^")


def test_compile_message_lists_errors_only_first_one_first():
    message = compile_error_message(CLANG_OUTPUT)
    assert message.splitlines()[0] == "2 compile error(s); first at main.c:7"
    assert "main.c:7:12: error: use of undeclared identifier 'counts'" in message
    assert "main.c:9:5: error: expected ';'" in message
    assert "warning" not in message


def test_compile_message_without_diagnostics_keeps_the_output_tail():
    assert compile_error_message("LLVM ERROR: something odd\n\n") == "LLVM ERROR: something odd"
    assert "no diagnostics" in compile_error_message("")


def test_compile_message_is_bounded():
    many = "".join(f"/virtual/main.c:{i}:1: error: problem number {i}\n" for i in range(1, 500))
    message = compile_error_message(many, limit=300)
    assert len(message.encode()) <= 300
    assert message.startswith("499 compile error(s); first at main.c:1")
    assert message.endswith("[...]")


def test_verifier_message_leads_with_the_reason_and_the_users_line():
    message = verifier_message("unchecked", VERIFIER_LOG, SOURCE, hints=["HINT: check for NULL"])
    lines = message.splitlines()
    assert lines[0] == "verifier rejected unchecked: R0 invalid mem access 'map_value_or_null'"
    assert lines[1] == "  at *n += 1; @ line 5"
    assert lines[2] == "HINT: check for NULL"
    assert "; u32 key = 0; @ line 3" in lines
    # a line bcc rewrote gets its number from the anchors around it
    assert "; u64 *n = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -2), &key); @ line 4" in lines
    # the header matches exactly, though bcc shifted it differently from the body
    assert "; int unchecked(struct xdp_md *ctx) { @ line 2" in lines
    assert not any(line.startswith(";  ") or line == "; " for line in lines)
    assert "processed 7 insns" not in message


def test_verifier_message_keeps_the_tail_of_a_long_log():
    log = "".join(f"{i}: (b7) r1 = {i}\n" for i in range(100_000)) + "BPF program is too large\n"
    message = verifier_message("big", log, "", limit=2048)
    assert len(message.encode()) <= 2048
    assert message.startswith("verifier rejected big: BPF program is too large")
    assert message.rstrip().endswith("BPF program is too large")
    assert "99999: (b7)" in message


def test_bounds_respect_utf8_and_line_boundaries():
    text = "first line\n" + "é" * 50 + "\nlast line"
    head = bound_head(text, 40)
    assert len(head.encode()) <= 40 and head.startswith("first line")
    tail = bound_tail(text, 40)
    assert len(tail.encode()) <= 40 and tail.endswith("last line")
    assert bound_head("short", 40) == "short"


def test_only_the_programs_own_source_is_quoted():
    output = """\
In file included from /virtual/main.c:2:
include/uapi/linux/if_ether.h:176:2: error: type name requires a specifier or qualifier
        __be16          h_proto;                /* packet type ID field */
        ^
/virtual/main.c:1:16: note: expanded from macro '__be16'
#define __be16 )
               ^
"""
    header, note = parse_clang_diagnostics(output)
    assert header.path == "include/uapi/linux/if_ether.h" and header.context == ()
    assert note.context == ("#define __be16 )", "               ^")
    assert "h_proto" not in compile_error_message(output)


def test_output_without_diagnostics_keeps_only_the_compilers_messages():
    output = "secret line of some file\nerror: /virtual/main.c:0:0: in function f i32 (i8*): stack limit\n"
    assert compile_error_message(output) == "error: main.c:0:0: in function f i32 (i8*): stack limit"


def test_verifier_annotations_of_header_code_name_the_file_without_quoting_it():
    log = "; static inline int secret_helper(void) { @ helpers.h:12\n0: (b7) r0 = 0\nR0 !read_ok\n"
    message = verifier_message("f", log, "int f(void *ctx) { return 0; }\n")
    assert "secret_helper" not in message
    assert "; (code of helpers.h:12)" in message
