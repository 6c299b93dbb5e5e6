"""What users' tools compute from beekeeper objects, with the real clients.

kstatus: sigs.k8s.io/cli-utils (what Flux and kpt use), built from the Go module proxy by
beekeeper.devenv.build. Argo CD: the chart's Lua health scripts in a real Lua 5.1
interpreter, as Argo CD (gopher-lua) runs them: Argo CD hands a script the live object as
the global `obj` and takes the table it returns ({status, message}); here the object becomes
a Lua table literal and runs under `lua5.1` (Debian's, installed by scripts/install.sh).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from beekeeper.devenv import build

REPO_ROOT = Path(__file__).resolve().parents[1]
CUSTOMIZATIONS = REPO_ROOT / "helm" / "beekeeper" / "argocd" / "resource_customizations" / "beekeeper.dev"
KINDS = ("BpfProgram", "NetworkIdentityPolicy")
LUA = "lua5.1"


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON value: objects and arrays become tables (arrays 1-based)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} has no JSON form")
        return repr(value)
    if isinstance(value, str):
        out = []
        for char in value:
            if char in '\\"':
                out.append("\\" + char)
            elif char == "\n":
                out.append("\\n")
            elif ord(char) < 32 or ord(char) == 127:
                out.append(f"\\{ord(char):03d}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} has no JSON form")


def script(kind: str) -> Path:
    return CUSTOMIZATIONS / kind / "health.lua"


def health(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """{"status", "message"} as Argo CD would show them for `obj`."""
    if shutil.which(LUA) is None:
        raise AssertionError(f"{LUA} is not installed: run scripts/install.sh")
    program = (
        f"obj = {lua_literal(obj)}\n"
        f"local hs = dofile({lua_literal(str(script(kind)))})\n"
        'io.write(tostring(hs.status), "\\0", tostring(hs.message))\n'
    )
    result = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"{script(kind)} failed on {obj.get('metadata', {}).get('name')}: {result.stderr}")
    status, message = result.stdout.split("\0", 1)
    return {"status": status, "message": message}


def health_tests(kind: str) -> list[tuple[Path, dict[str, str]]]:
    """(input file, expected healthStatus) of every case in the kind's health_test.yaml (Argo CD's format)."""
    folder = CUSTOMIZATIONS / kind
    cases = yaml.safe_load((folder / "health_test.yaml").read_text())["tests"]
    return [(folder / case["inputPath"], case["healthStatus"]) for case in cases]


def kstatus(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """kstatus' verdict per object: {"kind", "name", "status" (InProgress, Current, Failed, ...), "message"}."""
    binary = build.ensure_kstatus(lambda msg: print(msg, flush=True))
    listing = {"apiVersion": "v1", "kind": "List", "items": objects}
    result = subprocess.run([str(binary)], input=json.dumps(listing), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"kstatus failed: {result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines()]
