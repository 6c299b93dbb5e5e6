"""What `beekeeper uninstall-cleanup` waits for before the chart's daemons may go."""

from __future__ import annotations

from typing import Any

from beekeeper.uninstall import attached_on, pending


def state(name: str, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, generation: int = 2):
    return {"metadata": {"name": name, "generation": generation}, "spec": spec or {}, "status": status or {}}


def test_a_node_reporting_programs_or_the_policy_datapath_is_still_attached() -> None:
    programs = [{"bpfProgram": "xdp-counter", "name": "count"}, {"bpfProgram": "syscalls", "name": "count"}]
    why = attached_on(state("n1", status={"programs": programs, "observedGeneration": 2}))
    assert why == "node n1 still reports 2 program(s) of syscalls, xdp-counter"
    why = attached_on(state("n1", status={"networkPolicy": {"enforcing": True}, "observedGeneration": 2}))
    assert why == "node n1 still reports the policy datapath"


def test_a_node_not_yet_told_or_behind_its_spec_is_waited_for() -> None:
    assert "not been told" in attached_on(state("n1", spec={"programs": [{"bpfProgram": "p"}]}))
    assert "not been told" in attached_on(state("n1", spec={"networkPolicy": {"endpoints": []}}))
    behind = attached_on(state("n1", status={"observedGeneration": 1, "programs": []}, generation=2))
    assert behind == "node n1 has not caught up with its spec (generation 2, observed 1)"


def test_an_empty_converged_node_and_a_node_without_a_daemon_report_are_done() -> None:
    assert attached_on(state("n1", spec={"nodeName": "n1", "programs": []}, status={"observedGeneration": 2})) is None
    assert attached_on(state("n2", spec={"nodeName": "n2"})) is None  # never ran anything


def test_pending_lists_resources_still_deleting_and_nodes() -> None:
    program = {"metadata": {"name": "xdp-counter"}}
    policy = {"metadata": {"name": "allow", "namespace": "shop"}}
    nodes = [state("n1", status={"programs": [{"bpfProgram": "xdp-counter"}]}), state("n2")]
    assert pending([program], [policy], nodes) == [
        "BpfProgram xdp-counter is being detached",
        "NetworkIdentityPolicy shop/allow is being deleted",
        "node n1 still reports 1 program(s) of xdp-counter",
    ]
    assert pending([], [], [state("n2")]) == []
