"""Turning clang diagnostics and verifier logs into short messages a user can act on, and the
exceptions that carry them (here, not in bcc_compile, so the daemon raises and catches them
without importing bcc: libbcc costs tens of MiB of RSS and only compile workers need it).

Both outputs can be megabytes; a node status has room for about 2 KiB per program. Compile
errors keep the first errors with file:line and the offending source line. Verifier logs
keep the rejection reason first, then the tail of the log, which is where the verifier
explains the failing instruction. bcc compiles a rewritten copy of the source, so the
verifier's "@ main.c:N" annotations count lines of that copy; they are translated back to
the user's line numbers where the source text identifies the line unambiguously.

Only the program's own source is ever quoted: clang's snippet lines under a diagnostic in
another file, verifier annotations of code from headers, and anything else the compiler
printed that is not a diagnostic are left out, so no included file's content reaches a
status (the compile sandbox keeps the compiler from opening anything but headers anyway).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath

from beekeeper.node_daemon.backend import MESSAGE_LIMIT, Reason

_DIAG = re.compile(
    r"^(?P<path>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<severity>fatal error|error|warning|note): (?P<text>.*)$"
)
_ANNOTATION = re.compile(r"^; (?P<text>.*?) @ (?P<file>[^\s@]+):(?P<line>\d+)$")
_STATS_PREFIXES = ("processed ", "verification time", "stack depth", "max_states_per_insn", "Func#")
_VIRTUAL_PREFIX = "/virtual/"
SOURCE_NAME = "main.c"
"""The name bcc gives the program's own source (as /virtual/main.c)."""
_MESSAGE_LINE = re.compile(r"^(?:(?:fatal )?error|warning|note|LLVM ERROR|HINT|bpf):? ", re.IGNORECASE)


class CompileFailed(Exception):
    """The source did not compile (message: the clang errors with file:line), or the
    compiler crashed or ran out of time (reason CompileTimeout)."""

    def __init__(self, message: str, reason: Reason = Reason.COMPILE_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class LoadFailed(Exception):
    """One function could not be loaded; transient ones are worth retrying later."""

    def __init__(self, reason: Reason, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Diagnostic:
    path: str
    line: int
    column: int
    severity: str
    text: str
    context: tuple[str, ...] = ()
    """The source line and caret clang prints under the diagnostic."""

    def render(self) -> str:
        head = f"{self.path}:{self.line}:{self.column}: {self.severity}: {self.text}"
        return "\n".join((head, *self.context))


def parse_clang_diagnostics(output: str) -> list[Diagnostic]:
    """Diagnostics in clang's output, with bcc's /virtual/ prefix removed from paths."""
    diags: list[Diagnostic] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = _DIAG.match(line)
        if not m:
            continue
        path = m["path"].removeprefix(_VIRTUAL_PREFIX)
        context = []
        for follow in lines[i + 1 : i + 3] if path == SOURCE_NAME else ():
            if _DIAG.match(follow) or re.match(r"^\d+ (errors?|warnings?) generated", follow):
                break
            context.append(follow)
        diags.append(Diagnostic(path, int(m["line"]), int(m["col"]), m["severity"], m["text"], tuple(context)))
    return diags


def compile_error_message(output: str, limit: int = MESSAGE_LIMIT) -> str:
    """The errors of a failed compile, first ones first, bounded to limit bytes."""
    errors = [d for d in parse_clang_diagnostics(output) if d.severity in ("error", "fatal error")]
    if not errors:
        tail = [line.replace(_VIRTUAL_PREFIX, "") for line in output.splitlines() if _MESSAGE_LINE.match(line)]
        text = "\n".join(tail) if tail else "bcc could not compile the source and printed no diagnostics"
        return bound_tail(text, limit)
    head = f"{len(errors)} compile error(s); first at {errors[0].path}:{errors[0].line}"
    return bound_head("\n".join([head, *(d.render() for d in errors)]), limit)


def verifier_message(
    function: str, log: str, source: str, hints: Iterable[str] = (), limit: int = MESSAGE_LIMIT
) -> str:
    """Why the verifier rejected function: reason and source line first, then the log's tail."""
    lines = _with_user_lines(log.rstrip().splitlines(), source)
    while lines and (not lines[-1].strip() or lines[-1].startswith(_STATS_PREFIXES)):
        lines.pop()
    if not lines:
        return f"the verifier rejected {function} without a log"
    reason = lines[-1]
    where = next((line for line in reversed(lines) if line.startswith("; ")), "")
    head = f"verifier rejected {function}: {reason}"
    if where:
        head += f"\n  at {where[2:]}"
    parts = [head, *hints, "verifier log (tail):"]
    budget = limit - len("\n".join(parts).encode()) - 1
    return "\n".join(parts) + "\n" + bound_tail("\n".join(lines), budget)


def _with_user_lines(lines: list[str], source: str) -> list[str]:
    """Rewrite "; text @ main.c:N" annotations (N counts bcc's rewritten copy) to the user's line.

    A line whose text occurs exactly once in the source is an anchor. A line bcc rewrote
    (map calls) gets the offset of the anchors around it when both agree, since bcc only
    shifts lines between functions; otherwise its line number is dropped, not guessed.
    """
    index: dict[str, list[int]] = {}
    for number, text in enumerate(source.splitlines(), start=1):
        index.setdefault(text.strip(), []).append(number)
    annotations = {i: m for i, line in enumerate(lines) if (m := _ANNOTATION.match(line))}
    anchors: dict[int, int] = {}  # rewritten line -> offset to the user's line
    for m in annotations.values():
        matches = index.get(m["text"].strip(), []) if _own(m) else []
        if len(matches) == 1:
            anchors[int(m["line"])] = int(m["line"]) - matches[0]
    ordered = sorted(anchors)
    out = []
    for i, line in enumerate(lines):
        m = annotations.get(i)
        if m is None:
            out.append(line)
            continue
        text, rewritten = m["text"], int(m["line"])
        if not text.strip():
            continue  # "; @ main.c:0": compiler-generated code, no source line
        if not _own(m):
            out.append(f"; (code of {PurePath(m['file']).name}:{rewritten})")  # quote only the user's source
            continue
        offset = anchors.get(rewritten)
        if offset is None:
            pos = bisect.bisect(ordered, rewritten)
            below, above = ordered[pos - 1 : pos], ordered[pos : pos + 1]
            if below and above and anchors[below[0]] == anchors[above[0]]:
                offset = anchors[below[0]]
        out.append(f"; {text} @ line {rewritten - offset}" if offset is not None else f"; {text}")
    return out


def _own(annotation: re.Match[str]) -> bool:
    return PurePath(annotation["file"]).name == SOURCE_NAME


def bound_head(text: str, limit: int) -> str:
    """At most limit UTF-8 bytes of text, keeping the start (cut on a line if possible)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    marker = "\n[...]"
    cut = data[: max(0, limit - len(marker))].decode(errors="ignore")
    if "\n" in cut:
        cut = cut[: cut.rindex("\n")]
    return cut + marker


def bound_tail(text: str, limit: int) -> str:
    """At most limit UTF-8 bytes of text, keeping the end (cut on a line if possible)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    marker = "[...]\n"
    cut = data[len(data) - max(0, limit - len(marker)) :].decode(errors="ignore")
    if "\n" in cut:
        cut = cut[cut.index("\n") + 1 :]
    return marker + cut
