"""What the RuntimeSecurityPolicy hook costs an exec (and an open), side by side in one run.

    sudo .venv/bin/python bench/exec_overhead.py [--execs 3000] [--opens 200000] [--rounds 3]

A small C loop (compiled here with clang) does fork + execve(/bin/true) + waitpid, and
open + close of one file, timing each with CLOCK_MONOTONIC. It runs under four setups,
in rotating order within each round so drift spreads evenly:

- none:        no runtime-security program in the kernel;
- unselected:  the hook loaded for one policy on another (simulated) pod, the loop on the
               host: every exec costs the scope lookup that misses;
- 1 policy:    the loop runs in a simulated pod's cgroup (kubelet cgroupfs layout) that
               one policy selects; /bin/true matches none of its rules, so the program
               does the whole lookup (scope, file, every directory up to the root);
- 100 policies: the same pod selected by 100 policies with rules of their own.

Per setup it prints the median ns per exec and per open over the rounds and the ratio to
"none". The hook is on exec only (sched_process_exec), so opens should not change. A whole
fork + exec costs hundreds of microseconds and varies with the machine's load more than the
hook costs, so it also prints the program's own time per run from the kernel's BPF stats
(kernel.bpf_stats_enabled, switched on for the run and restored): that is the added cost.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from beekeeper.node_daemon.capabilities import find_mount
from beekeeper.node_daemon.runtime_agent import RuntimeAgent
from beekeeper.operator.runtime_compile import revision

LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    long execs = atol(argv[1]), opens = atol(argv[2]);
    char *const child[] = {"/bin/true", NULL};
    long long start = now_ns();
    for (long i = 0; i < execs; i++) {
        pid_t pid = fork();
        if (pid == 0) { execv(child[0], child); _exit(127); }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 2;
    }
    long long middle = now_ns();
    for (long i = 0; i < opens; i++) {
        int fd = open(argv[3], O_RDONLY);
        if (fd < 0) return 3;
        close(fd);
    }
    long long end = now_ns();
    printf("%f %f\n", (double)(middle - start) / execs, (double)(end - middle) / opens);
    return 0;
}
"""
SETUPS = ("none", "unselected", "1 policy", "100 policies")
PROGRAM_NAMES = ("rs_exec", "rs_bprm_check")
"""The datapath's two programs (bpf/runtime_security.c); the kernel keeps 15 characters of a name."""
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats() -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the loaded runtime-security programs."""
    shown = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    programs = [p for p in json.loads(shown) if p.get("name") in {n[:15] for n in PROGRAM_NAMES}]
    return sum(p.get("run_time_ns", 0) for p in programs), sum(p.get("run_cnt", 0) for p in programs)


class Pods:
    """Simulated pods: kubepods/besteffort/pod<uid>/<container id> cgroups with a sleeper each."""

    def __init__(self) -> None:
        root = find_mount("cgroup2")
        if root is None:
            raise SystemExit("no cgroup v2 mount")
        self.base = Path(root) / f"beekeeper-bench-{secrets.token_hex(4)}"
        self.made: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def make(self, name: str) -> dict[str, Any]:
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        cgroup = self.base / "kubepods" / "besteffort" / f"pod{uid}" / cid
        cgroup.mkdir(parents=True)
        procs = cgroup / "cgroup.procs"
        sleeper = subprocess.Popen(["sleep", "3600"], preexec_fn=lambda: procs.write_text(str(os.getpid())))
        self.made.append((cgroup, sleeper))
        containers = [{"name": "app", "containerId": f"containerd://{cid}"}]
        return {"namespace": "bench", "pod": name, "uid": uid, "containers": containers, "cgroup": cgroup}

    def remove(self) -> None:
        for _, sleeper in self.made:
            sleeper.kill()
            sleeper.wait()
        if self.base.exists():
            cgroups = [p for p in self.base.rglob("*") if p.is_dir()]
            for directory in sorted(cgroups, key=lambda p: len(p.parts), reverse=True):
                directory.rmdir()
            self.base.rmdir()


def policy(index: int, pod: dict[str, Any]) -> dict[str, Any]:
    rules = [
        {"name": "shells", "exec": {"paths": ["/bin/sh", "/bin/bash", f"/opt/tool-{index}"]}, "action": "Block"},
        {"name": "tmp", "exec": {"pathPrefixes": ["/tmp/", f"/var/lib/app-{index}/"]}, "action": "Audit"},
    ]
    entry = {k: v for k, v in pod.items() if k != "cgroup"}
    return {"policy": f"bench/p{index:03}", "generation": 1, "mode": "Enforce", "rules": rules, "pods": [entry]}


def spec(policies: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"policies": policies}
    return {**body, "revision": revision(body)}


@contextmanager
def loop_binary() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="beekeeper-bench-") as tmp:
        source, binary = Path(tmp) / "loop.c", Path(tmp) / "loop"
        source.write_text(LOOP_C)
        clang = shutil.which("clang") or shutil.which("clang-14") or "cc"
        subprocess.run([clang, "-O2", "-o", str(binary), str(source)], check=True)
        yield binary


def run_loop(binary: Path, execs: int, opens: int, cgroup: Path | None) -> tuple[float, float, float]:
    """(ns per exec, ns per open, ns the program ran per run during the loop; 0 without it)."""
    procs = cgroup / "cgroup.procs" if cgroup else None
    time_before, runs_before = program_stats()
    done = subprocess.run(
        [str(binary), str(execs), str(opens), "/etc/hostname"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=(lambda: procs.write_text(str(os.getpid()))) if procs else None,
    )
    exec_ns, open_ns = done.stdout.split()
    time_after, runs_after = program_stats()
    per_run = (time_after - time_before) / (runs_after - runs_before) if runs_after > runs_before else 0.0
    return float(exec_ns), float(open_ns), per_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execs", type=int, default=2000)
    parser.add_argument("--opens", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF programs, cgroups)")
    bpffs = Path(f"/sys/fs/bpf/beekeeper-bench-{secrets.token_hex(4)}")
    pods = Pods()
    agent = RuntimeAgent("bench-node", bpffs / "runtime")
    results: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SETUPS}
    hook = None
    stats_before = BPF_STATS.read_text()
    BPF_STATS.write_text("1")
    try:
        other, loop_pod = pods.make("other"), pods.make("loop")
        specs = {
            "unselected": spec([policy(0, other)]),
            "1 policy": spec([policy(0, loop_pod)]),
            "100 policies": spec([policy(i, loop_pod) for i in range(100)]),
        }
        with loop_binary() as binary:
            run_loop(binary, 200, 1000, None)  # warm the page cache and the fork path
            for round_ in range(args.rounds):
                order = SETUPS[round_ % len(SETUPS) :] + SETUPS[: round_ % len(SETUPS)]
                for setup in order:
                    if setup == "none":
                        agent.remove()
                    else:
                        status = agent.reconcile(specs[setup])
                        if not status or not status.get("enforcing"):
                            raise SystemExit(f"{setup}: not enforcing: {status}")
                        hook = status.get("hook")
                    cgroup = loop_pod["cgroup"] if setup in ("1 policy", "100 policies") else None
                    results[setup].append(run_loop(binary, args.execs, args.opens, cgroup))
                    print(f"round {round_ + 1} {setup:>13}: {results[setup][-1]}", file=sys.stderr)
    finally:
        BPF_STATS.write_text(stats_before)
        agent.remove()
        shutil.rmtree(bpffs, ignore_errors=True)
        pods.remove()

    def median(setup: str, which: int) -> float:
        return statistics.median(r[which] for r in results[setup])

    base_exec, base_open = median("none", 0), median("none", 1)
    print(f"\nexec and open cost, median of {args.rounds} rounds; hook in force: {hook}")
    header = f"{'setup':14}{'ns/exec':>12}{'vs none':>9}{'ns/open':>10}{'vs none':>9}"
    print(f"{header}{'program ns/exec':>17}{'share of exec':>15}")
    for setup in SETUPS:
        exec_ns, open_ns, program_ns = median(setup, 0), median(setup, 1), median(setup, 2)
        print(
            f"{setup:14}{exec_ns:>12.0f}{exec_ns / base_exec:>8.3f}x{open_ns:>10.0f}{open_ns / base_open:>8.3f}x"
            f"{program_ns:>17.0f}{program_ns / base_exec:>14.4%}"
        )


if __name__ == "__main__":
    main()
