"""cgroup_skb and cgroup_sock_addr programs on a test cgroup, exercised by a child process in it."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys

import pytest

from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit, Reason

pytestmark = pytest.mark.kernel

CGROUP_PROGRAMS = r"""
BPF_ARRAY(egress_packets, u64, 1);

int count_egress(struct __sk_buff *skb) {
    int zero = 0;
    u64 *n = egress_packets.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 1;  /* allow */
}

int deny_port(struct bpf_sock_addr *ctx) {
    return ctx->user_port == bpf_htons(BLOCKED) ? 0 : 1;  /* 0: connect() fails with EPERM */
}
"""

CHILD = """
import json, os, socket, sys
cgroup, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
result = []
for port in ports:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"beekeeper")
            result.append("connected")
        except OSError as e:
            result.append(e.errno)
print(json.dumps(result))
"""


def test_cgroup_skb_counts_and_connect4_denies_in_the_cgroup(backend, cgroup):
    with socket.create_server(("127.0.0.1", 0)) as blocked, socket.create_server(("127.0.0.1", 0)) as allowed:
        blocked_port, allowed_port = blocked.getsockname()[1], allowed.getsockname()[1]
        unit = ProgramUnit(
            "cgroup-progs",
            CGROUP_PROGRAMS,
            cflags=[f"-DBLOCKED={blocked_port}"],
            programs=[
                AttachSpec("count_egress", "cgroup_skb", cgroup_path=str(cgroup), direction="egress"),
                AttachSpec("deny_port", "cgroup_sock_addr", cgroup_path=cgroup.name, attach_type="connect4"),
                AttachSpec("deny_port", "cgroup_sock_addr", cgroup_path="bk-no-such-cgroup", attach_type="connect4"),
            ],
        )
        skb, sock_addr, missing = backend.apply(unit)
        assert skb.phase == sock_addr.phase == Phase.ATTACHED, (skb, sock_addr)
        assert skb.attach_points == (f"cgroup_skb/egress:{cgroup}",)
        assert sock_addr.attach_points == (f"cgroup_sock_addr/connect4:{cgroup}",)
        assert missing.reason == Reason.CGROUP_NOT_FOUND

        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(cgroup), str(blocked_port), str(allowed_port)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert json.loads(run.stdout) == [errno.EPERM, "connected"]
        (entry,) = backend.read_map("cgroup-progs", "egress_packets")
        assert entry.values[0] >= 2  # at least the SYN and the data segment of the allowed connection
