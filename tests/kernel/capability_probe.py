"""Run the node daemon's kernel paths once and report which fail: run under a reduced capability set.

    capsh --caps=... -- -c 'python tests/kernel/capability_probe.py BPFFS_DIR STATE_DIR IFACE CGROUP POD_UID CID'

Prints one JSON object: step -> "ok" or the error. Steps: compile+load+attach every hook type the
chart's daemon supports (xdp, tc, tracepoint, raw_tracepoint, cgroup_skb), re-adopt the pins
in a new backend (what a restarted daemon does), load and attach the policy datapath, enforce a
RuntimeSecurityPolicy on a simulated container (POD_UID, CID: a kubelet-style cgroup whose
process has a container's capabilities, more than the probe's), remove all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit
from beekeeper.node_daemon.kernel_backend import KernelBackend

SOURCE = r"""
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(hits, u64, 8);
static __always_inline void hit(int slot) {
    u64 *n = hits.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
}
int on_xdp(struct xdp_md *ctx) { hit(0); return XDP_PASS; }
int on_tc(struct __sk_buff *skb) { hit(1); return TC_ACT_UNSPEC; }
int on_tracepoint(void *ctx) { hit(2); return 0; }
int on_raw(struct bpf_raw_tracepoint_args *ctx) { hit(3); return 0; }
int on_kprobe(struct pt_regs *ctx) { hit(4); return 0; }
int on_skb(struct __sk_buff *skb) { hit(5); return 1; }
"""


def programs(interface: str, cgroup: str) -> list[AttachSpec]:
    return [
        AttachSpec("on_xdp", "xdp", interfaces=[interface], xdp_mode="generic"),
        AttachSpec("on_tc", "tc", interfaces=[interface], direction="ingress"),
        AttachSpec("on_tracepoint", "tracepoint", tracepoint="syscalls:sys_enter_getppid"),
        AttachSpec("on_raw", "raw_tracepoint", tracepoint="sys_enter"),
        AttachSpec("on_skb", "cgroup_skb", cgroup_path=cgroup, direction="egress"),
    ]


def runtime_security(bpffs: Path, pod_uid: str, container_id: str) -> str:
    """Map the container (its process's /proc entries) and resolve /bin/sh in its root."""
    from beekeeper.node_daemon.runtime_agent import RuntimeAgent
    from beekeeper.operator.runtime_compile import revision

    rules = [{"name": "shells", "exec": {"paths": ["/bin/sh"]}, "action": "Block"}]
    pod = {"namespace": "ns", "pod": "p", "uid": pod_uid}
    pod["containers"] = [{"name": "c", "containerId": f"containerd://{container_id}"}]  # type: ignore[assignment]
    body = {"policies": [{"policy": "ns/p", "generation": 1, "mode": "Enforce", "rules": rules, "pods": [pod]}]}
    agent = RuntimeAgent("probe", bpffs / "runtime")
    try:
        status = agent.reconcile({**body, "revision": revision(body)}) or {}
        return "ok" if status.get("enforcing") else str(status.get("message"))[:300]
    finally:
        agent.remove()


def main(bpffs: Path, state: Path, interface: str, cgroup: str, pod_uid: str, container_id: str) -> dict[str, str]:
    steps: dict[str, str] = {}
    try:
        backend = KernelBackend(str(bpffs / "programs"), str(state))
        steps["backend"] = "ok"
    except Exception as exc:
        return {"backend": f"{type(exc).__name__}: {exc}"}
    for report in backend.apply(ProgramUnit("probe", SOURCE, programs=programs(interface, cgroup))):
        ok = report.phase in (Phase.ATTACHED, Phase.LOADED)
        steps[report.type] = "ok" if ok else f"{report.reason}: {report.message}"[:300]
    backend.close()
    try:
        again = KernelBackend(str(bpffs / "programs"), str(state))
        steps["re-adopt"] = "ok" if "probe" in again.adopted() else f"not adopted: {sorted(again.adopted())}"
        backend = again
    except Exception as exc:
        steps["re-adopt"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from beekeeper.node_daemon.policy_datapath import PolicyDatapath

        datapath = PolicyDatapath(bpffs / "policy")
        datapath.attach(_ifindex(interface))
        steps["policy-datapath"] = "ok"
        datapath.remove()
    except Exception as exc:
        steps["policy-datapath"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        steps["runtime-security"] = runtime_security(bpffs, pod_uid, container_id)
    except Exception as exc:
        steps["runtime-security"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        backend.remove("probe")
        steps["remove"] = "ok"
    except Exception as exc:
        steps["remove"] = f"{type(exc).__name__}: {exc}"[:300]
    return steps


def _ifindex(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:7])))
