"""Loading the NetworkIdentityPolicy datapath: bcc on the node (the previous release) vs the prebuilt CO-RE object.

    sudo .venv/bin/python bench/policy_datapath_load.py [--rounds 3]

Each round loads the datapath into a fresh bpffs directory twice, each in a fresh process,
alternating the order: once as the previous release did (bcc compiles
tests/kernel/fixtures/policy_bcc.c, then loads both programs) and once as today
(PolicyDatapath: libbpf opens bpf/policy.o and loads it). It reports per way the load
time (median over rounds; the time the previous daemon spent compiling on every node,
against libbpf's open + load), the process's peak and final RSS, and whether bcc was
imported, plus the object's size. A third process only imports bcc, to show what importing
it costs a daemon that never compiles with it. The datapath is removed after every load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BCC_RELEASE = ROOT / "tests" / "kernel" / "fixtures" / "policy_bcc.c"
BPFFS = Path("/sys/fs/bpf/beekeeper-bench")

_CHILD = {
    "bcc": """
import time
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.bcc_compile import CompiledModule
started = time.monotonic()
source = open(SOURCE).read()
with CompiledModule(source, [f'-DBK_PIN_DIR="{DIR}/maps"']) as module:
    progs = [module.load(p, bpf.PROG_TYPE_SCHED_CLS) for p in ("policy_from_pod", "policy_to_pod")]
seconds = time.monotonic() - started
""",
    "core": """
import time
from pathlib import Path
from beekeeper.node_daemon.policy_datapath import PolicyDatapath
started = time.monotonic()
dp = PolicyDatapath(Path(DIR))
seconds = time.monotonic() - started
dp.remove()
""",
    "bcc-import": """
import time
started = time.monotonic()
import bcc
seconds = time.monotonic() - started
""",
}
_REPORT = """
import json, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
kib = {k: int(v.split()[0]) for k, v in status.items()}
print(json.dumps({"seconds": seconds, "rss_mib": kib["VmRSS"] / 1024, "peak_mib": kib["VmHWM"] / 1024,
                  "bcc_imported": "bcc" in sys.modules}))
"""


def run(way: str) -> dict[str, float]:
    directory = BPFFS / f"{way}-{uuid.uuid4().hex[:8]}"
    (directory / "maps").mkdir(parents=True)
    code = f"SOURCE = {str(BCC_RELEASE)!r}\nDIR = {str(directory)!r}\n" + _CHILD[way] + _REPORT
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"{way} failed:\n{done.stderr}")
        return json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from beekeeper.node_daemon.policy_datapath import policy_object

    results: dict[str, list[dict[str, float]]] = {"bcc": [], "core": [], "bcc-import": []}
    started = time.monotonic()
    try:
        for i in range(args.rounds):
            for way in ("bcc", "core", "bcc-import") if i % 2 == 0 else ("core", "bcc", "bcc-import"):
                results[way].append(run(way))
                print(f"[{time.monotonic() - started:6.1f}s] round {i + 1} {way}: {results[way][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(BPFFS, ignore_errors=True)

    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in results[way])

    size = len(policy_object())
    print(f"\npolicy datapath load, median of {args.rounds} rounds (fresh process each)")
    print(f"{'':24}{'load s':>10}{'RSS MiB':>10}{'peak MiB':>10}  bcc imported")
    labels = {"bcc": "bcc compile + load", "core": "CO-RE (libbpf) load", "bcc-import": "import bcc only"}
    for way, label in labels.items():
        imported = {r["bcc_imported"] for r in results[way]}
        print(
            f"{label:24}{median(way, 'seconds'):>10.3f}{median(way, 'rss_mib'):>10.1f}"
            f"{median(way, 'peak_mib'):>10.1f}  {sorted(imported)}"
        )
    print(
        f"bcc / CO-RE: load time x{median('bcc', 'seconds') / median('core', 'seconds'):.0f}, "
        f"peak RSS x{median('bcc', 'peak_mib') / median('core', 'peak_mib'):.1f}; "
        f"policy.o {size} bytes (BTF + DWARF; `llvm-strip -g` would keep only the BTF)"
    )


if __name__ == "__main__":
    main()
