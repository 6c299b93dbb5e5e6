"""Events about status transitions: one line, one Event per announcement, pure parts only."""

from __future__ import annotations

from beekeeper.operator.events import Notice, event_name, one_line, policy_notice, program_notice

COMPILER_OUTPUT = (
    "main.c:2:12: error: use of undeclared identifier 'x'\n    return x;\n           ^\n1 error generated."
)


def body(generation: int = 1, namespace: str | None = None) -> dict:
    meta = {"name": "p", "uid": "u-1", "generation": generation}
    if namespace:
        meta["namespace"] = namespace
    return {"metadata": meta}


def cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_one_line_joins_lines_and_says_when_it_shortened() -> None:
    assert one_line(COMPILER_OUTPUT) == (
        "main.c:2:12: error: use of undeclared identifier 'x'; return x;; ^; 1 error generated."
    )
    assert one_line("attached on 1/1 nodes") == "attached on 1/1 nodes"
    assert one_line("\n\n  x  \n") == "x"
    long = one_line("y" * 1000, limit=100)
    assert len(long) == 100 and long.endswith("(full text in status)") and "\n" not in long


def test_degraded_program_announces_a_warning_with_the_degraded_message() -> None:
    status = {
        "phase": "Degraded",
        "conditions": [
            cond("Degraded", "True", "CompileError", f"failed on 1 node(s); n1: f: {COMPILER_OUTPUT}"),
            cond("Ready", "False", "NodesNotReady", "attached on 0/1 nodes"),
        ],
    }
    notice = program_notice(body(), status)
    assert (notice.kind, notice.type, notice.reason) == ("BpfProgram", "Warning", "Degraded")
    assert "main.c:2:12" in notice.message


def test_event_names_tell_announcements_apart_and_repeat_for_the_same_one() -> None:
    ready = Notice("BpfProgram", body(), "Normal", "Ready", "attached on 1/1 nodes")
    assert event_name(ready) == event_name(Notice("BpfProgram", body(), "Normal", "Ready", "attached on 1/1 nodes"))
    assert event_name(ready) != event_name(Notice("BpfProgram", body(2), "Normal", "Ready", "attached on 1/1 nodes"))
    assert event_name(ready) != event_name(Notice("BpfProgram", body(), "Normal", "Ready", "attached on 2/2 nodes"))
    assert event_name(ready).startswith("p.")
    long_name = {"metadata": {**body()["metadata"], "name": "n" * 253}}
    assert len(event_name(Notice("BpfProgram", long_name, "Normal", "Ready", ""))) <= 253


def policy_status(valid: tuple[str, str, str], ready: tuple[str, str, str]) -> dict:
    return {"conditions": [cond("Valid", *valid), cond("Ready", *ready)]}


def test_policy_events_on_validity_and_ready_reason_changes_only() -> None:
    waiting = policy_status(("True", "Accepted", ""), ("False", "NodesNotEnforcing", "enforced on 0/1 nodes"))
    enforced = policy_status(("True", "Accepted", ""), ("True", "Enforced", "enforced on 1/1 nodes"))
    invalid = policy_status(("False", "InvalidSpec", "spec.ingress[0]: bad\nmore"), ("False", "InvalidSpec", "x"))

    first = policy_notice(body(namespace="shop"), waiting, None)
    assert first is not None and (first.kind, first.type, first.reason) == (
        "NetworkIdentityPolicy",
        "Normal",
        "NodesNotEnforcing",
    )
    now_enforced = policy_notice(body(namespace="shop"), enforced, waiting)
    assert now_enforced is not None and (now_enforced.type, now_enforced.reason) == ("Normal", "Enforced")
    # Only the numbers in the message changed: no event.
    more_nodes = policy_status(("True", "Accepted", ""), ("True", "Enforced", "enforced on 2/2 nodes"))
    assert policy_notice(body(namespace="shop"), more_nodes, enforced) is None
    broken = policy_notice(body(2, namespace="shop"), invalid, enforced)
    assert broken is not None and (broken.type, broken.reason) == ("Warning", "InvalidSpec")
    assert one_line(broken.message) == "spec.ingress[0]: bad; more"
    assert policy_notice(body(namespace="shop"), {}, None) is None
