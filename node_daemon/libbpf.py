"""Opening, configuring and loading CO-RE ELF objects with the system libbpf (libbpf.so.1, 1.1).

A prebuilt object (clang -target bpf -g) is relocated by libbpf against the node's BTF
(/sys/kernel/btf/vmlinux, or a custom BTF for tests) and loaded; nothing here parses ELF or
relocates instructions itself. The API is the handful of steps a loader needs, named so a
caller does not need libbpf's documentation:

    with BpfObject.open(elf_bytes, name="unit") as obj:
        obj.programs(), obj.maps()                 # what the object holds
        obj.load_only({"handler"})                 # autoload just these functions
        obj.set_program_type("handler", PROG_TYPE_TRACEPOINT)
        obj.set_global_data({"target_pid": b"..."})  # const volatile variables, before load
        obj.reuse_map("counts", pinned_fd)         # share an existing map
        obj.load()                                 # raises ObjectLoadFailed with libbpf's words
        prog = obj.program_fd("handler")           # dup'd: outlives the object

libbpf reports through a process-wide print callback; every open and load holds one lock
while it captures those messages, so concurrent loads never mix their logs. A failed load
becomes ObjectLoadFailed naming the program and, for a CO-RE relocation that found no
matching field on this kernel, the field (libbpf poisons such an instruction and the
verifier rejects it only if it is reachable, so guarded reads still load).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

from beekeeper.node_daemon.bpf_syscalls import BpfError, OwnedFd, libbpf_function

__all__ = [
    "BTF_KIND_DATASEC",
    "BpfObject",
    "FailedRelocation",
    "GlobalDataError",
    "GlobalVariable",
    "MapDesc",
    "ObjectLoadFailed",
    "ObjectOpenFailed",
    "ProgramDesc",
]

_libc = ct.CDLL(None, use_errno=True)
_libc.vsnprintf.restype = ct.c_int
_libc.vsnprintf.argtypes = (ct.c_char_p, ct.c_size_t, ct.c_char_p, ct.c_void_p)

BTF_KIND_FUNC = 12
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
GLOBAL_DATA_SECTIONS = (".rodata", ".data")
"""Sections whose variables set_global_data may initialise (const volatile ones live in .rodata)."""

_PRINT_LEVELS = ("warn", "info", "debug")  # enum libbpf_print_level
_PRINT_CHUNK = 64 * 1024
_KERNEL_LOG_SIZE = 1 << 20  # verifier log of the failing program; the kernel keeps the tail when longer
_MAX_MESSAGES = 20_000


class _OpenOpts(ct.Structure):
    """struct bpf_object_open_opts exactly as libbpf 1.1.2 declares it (a test compares with C)."""

    _fields_ = (
        ("sz", ct.c_size_t),
        ("object_name", ct.c_char_p),
        ("relaxed_maps", ct.c_bool),
        ("pin_root_path", ct.c_char_p),
        ("_attach_prog_fd", ct.c_uint32),  # removed field, kept as padding
        ("kconfig", ct.c_char_p),
        ("btf_custom_path", ct.c_char_p),
        ("kernel_log_buf", ct.c_void_p),
        ("kernel_log_size", ct.c_size_t),
        ("kernel_log_level", ct.c_uint32),
    )


class _BtfType(ct.Structure):
    """struct btf_type: name offset, info (kind << 24 | vlen), size or type."""

    _fields_ = (("name_off", ct.c_uint32), ("info", ct.c_uint32), ("size", ct.c_uint32))


class _VarSecinfo(ct.Structure):
    """struct btf_var_secinfo: one variable of a DATASEC."""

    _fields_ = (("type", ct.c_uint32), ("offset", ct.c_uint32), ("size", ct.c_uint32))


_PRINT_FN = ct.CFUNCTYPE(ct.c_int, ct.c_int, ct.c_char_p, ct.c_void_p)
_p = ct.c_void_p
_set_print = libbpf_function("libbpf_set_print", _p, _PRINT_FN)
_open_mem = libbpf_function("bpf_object__open_mem", _p, _p, ct.c_size_t, ct.POINTER(_OpenOpts))
_obj_load = libbpf_function("bpf_object__load", ct.c_int, _p)
_obj_close = libbpf_function("bpf_object__close", None, _p)
_obj_btf = libbpf_function("bpf_object__btf", _p, _p)
_next_program = libbpf_function("bpf_object__next_program", _p, _p, _p)
_next_map = libbpf_function("bpf_object__next_map", _p, _p, _p)
_prog_name = libbpf_function("bpf_program__name", ct.c_char_p, _p)
_prog_section = libbpf_function("bpf_program__section_name", ct.c_char_p, _p)
_prog_type = libbpf_function("bpf_program__type", ct.c_int, _p)
_prog_attach_type = libbpf_function("bpf_program__expected_attach_type", ct.c_int, _p)
_prog_autoload = libbpf_function("bpf_program__autoload", ct.c_bool, _p)
_prog_set_autoload = libbpf_function("bpf_program__set_autoload", ct.c_int, _p, ct.c_bool)
_prog_set_type = libbpf_function("bpf_program__set_type", ct.c_int, _p, ct.c_int)
_prog_set_attach_type = libbpf_function("bpf_program__set_expected_attach_type", ct.c_int, _p, ct.c_int)
_prog_set_attach_target = libbpf_function("bpf_program__set_attach_target", ct.c_int, _p, ct.c_int, ct.c_char_p)
_prog_fd = libbpf_function("bpf_program__fd", ct.c_int, _p)
_map_name = libbpf_function("bpf_map__name", ct.c_char_p, _p)
_map_type = libbpf_function("bpf_map__type", ct.c_int, _p)
_map_key_size = libbpf_function("bpf_map__key_size", ct.c_uint32, _p)
_map_value_size = libbpf_function("bpf_map__value_size", ct.c_uint32, _p)
_map_max_entries = libbpf_function("bpf_map__max_entries", ct.c_uint32, _p)
_map_is_internal = libbpf_function("bpf_map__is_internal", ct.c_bool, _p)
_map_reuse_fd = libbpf_function("bpf_map__reuse_fd", ct.c_int, _p, ct.c_int)
_map_set_pin_path = libbpf_function("bpf_map__set_pin_path", ct.c_int, _p, ct.c_char_p)
_map_initial_value = libbpf_function("bpf_map__initial_value", _p, _p, ct.POINTER(ct.c_size_t))
_map_fd = libbpf_function("bpf_map__fd", ct.c_int, _p)
_btf_find = libbpf_function("btf__find_by_name_kind", ct.c_int32, _p, ct.c_char_p, ct.c_uint32)
_btf_type = libbpf_function("btf__type_by_id", ct.POINTER(_BtfType), _p, ct.c_uint32)
_btf_name = libbpf_function("btf__name_by_offset", ct.c_char_p, _p, ct.c_uint32)
_btf_load_vmlinux = libbpf_function("btf__load_vmlinux_btf", _p)
_btf_free = libbpf_function("btf__free", None, _p)


# --- libbpf's messages ----------------------------------------------------------------------

_LOCK = threading.Lock()
_capture: list[tuple[str, str]] | None = None


@_PRINT_FN
def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print callback: format with vsnprintf, keep while a capture is active."""
    buf = ct.create_string_buffer(_PRINT_CHUNK)
    length = _libc.vsnprintf(buf, _PRINT_CHUNK, fmt, args)
    if _capture is not None and len(_capture) < _MAX_MESSAGES:
        text = buf.value.decode(errors="replace")
        if length >= _PRINT_CHUNK:
            text += " [truncated]"
        _capture.append((_PRINT_LEVELS[level] if 0 <= level < 3 else "debug", text))
    return 0


_set_print(_on_print)


@contextmanager
def _captured() -> Iterator[list[tuple[str, str]]]:
    """(level, text) of every libbpf message printed inside the block; one block at a time."""
    global _capture
    with _LOCK:
        _capture = []
        try:
            yield _capture
        finally:
            _capture = None


def _log_text(messages: Iterable[tuple[str, str]], levels: tuple[str, ...] = ("warn", "info")) -> str:
    return "".join(text for level, text in messages if level in levels).strip()


# --- errors ---------------------------------------------------------------------------------


class ObjectOpenFailed(BpfError):
    """The bytes are not a BPF ELF object libbpf can open (the message has libbpf's words)."""

    def __init__(self, err: int, detail: str) -> None:
        super().__init__(err, "opening the BPF object failed")
        self.detail = detail
        self.message = f"not a usable BPF ELF object ({os.strerror(err)})" + (f": {detail}" if detail else "")

    def __str__(self) -> str:
        return self.message


class GlobalDataError(ValueError):
    """A globalData entry names no variable of the object, or has the wrong size."""


@dataclass(frozen=True)
class FailedRelocation:
    """A CO-RE relocation libbpf found no match for on the target kernel's BTF."""

    program: str
    spec: str
    """libbpf's description, e.g. "<byte_off> [7] struct task_struct.nosuch (0:83 @ offset 0)"."""

    @property
    def field(self) -> str:
        """The type and member path, e.g. "struct task_struct.nosuch"."""
        m = re.search(r"\] (.+?) \(", self.spec)
        path = m[1] if m else self.spec
        return re.sub(r"___\w+?(?=\.|$)", "", path, count=1)  # libbpf ignores a ___flavor suffix


class ObjectLoadFailed(BpfError):
    """bpf_object__load failed. program is the function libbpf was loading (None when the
    failure was not a program's, e.g. a map or BTF); relocations are the CO-RE relocations of
    that program that matched nothing; verifier_log is the kernel's log for it."""

    def __init__(
        self,
        err: int,
        program: str | None,
        verifier_log: str,
        relocations: list[FailedRelocation],
        libbpf_log: str,
    ) -> None:
        super().__init__(err, "loading the BPF object failed")
        self.program = program
        self.verifier_log = verifier_log
        self.relocations = relocations
        self.libbpf_log = libbpf_log

    @property
    def relocation_failed(self) -> bool:
        """The program was rejected because it uses a field or type this kernel does not have."""
        return bool(self.relocations) and (
            "invalid CO-RE relocation" in self.verifier_log or "unknown#195896080" in self.verifier_log
        )

    @property
    def message(self) -> str:
        who = f"program {self.program!r}" if self.program else "the object"
        if self.relocation_failed:
            fields = ", ".join(dict.fromkeys(r.field for r in self.relocations))
            return (
                f"CO-RE relocation failed in {who}: {fields} does not exist in this kernel's BTF "
                "(guard the read with bpf_core_field_exists() or build for this kernel)"
            )
        if self.verifier_log:
            return f"verifier rejected {who}: {verifier_reason(self.verifier_log) or os.strerror(self.errno)}"
        return f"loading {who} failed: {os.strerror(self.errno)}" + (f"\n{self.libbpf_log}" if self.libbpf_log else "")

    def __str__(self) -> str:
        return self.message


_VERIFIER_STATS = ("processed ", "verification time", "stack depth", "max_states_per_insn", "Func#")


def verifier_reason(log: str) -> str:
    """The verifier's last word: the line before its statistics."""
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith(_VERIFIER_STATS)]
    return lines[-1] if lines else ""


_PROG_MSG = re.compile(r"^libbpf: prog '([^']+)': |^prog '([^']+)': ")
_RELO = re.compile(r"prog '(?P<prog>[^']+)': relo #(?P<n>\d+): (?P<text>.*)$")
_RELO_SPEC = re.compile(r"^<[a-z_]+> \[\d+\] ")


def failed_relocations(messages: Iterable[tuple[str, str]]) -> list[FailedRelocation]:
    """Relocations libbpf reported with "no matching targets found" (it poisons the instruction)."""
    specs: dict[tuple[str, str], str] = {}
    failed: list[FailedRelocation] = []
    for _, text in messages:
        for line in text.splitlines():
            m = _RELO.search(line)
            if m is None:
                continue
            key = (m["prog"], m["n"])
            if _RELO_SPEC.match(m["text"]) and key not in specs:
                specs[key] = m["text"].strip()
            elif "no matching targets found" in m["text"] and key in specs:
                failed.append(FailedRelocation(m["prog"], specs[key]))
    return failed


def _failing_program(messages: list[tuple[str, str]]) -> str | None:
    """The program named by libbpf's first warning (its load stops at the first failure)."""
    for level, text in messages:
        if level != "warn":
            continue
        m = _PROG_MSG.search(text)
        if m:
            return m[1] or m[2]
    return None


# --- the object -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramDesc:
    """A program (function) of the object as libbpf sees it before load."""

    name: str
    """The C function name."""
    section: str
    """The ELF section, e.g. "tracepoint/syscalls/sys_enter_openat"."""
    type: int
    """enum bpf_prog_type libbpf derived from the section (0 when the section is unknown)."""
    expected_attach_type: int


@dataclass(frozen=True)
class MapDesc:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    internal: bool
    """A map libbpf made for global variables (.rodata, .data, .bss, .kconfig)."""


@dataclass(frozen=True)
class GlobalVariable:
    name: str
    section: str
    offset: int
    size: int


class BpfObject:
    """One opened ELF object. Configure, load() once, take fds, close(). Not thread-safe;
    open and load serialize with every other libbpf object in the process."""

    def __init__(self, handle: int, data: ct.Array[ct.c_char], log_buf: ct.Array[ct.c_char]) -> None:
        self._obj: int | None = handle
        self._data = data  # libbpf keeps pointers into the buffer until close
        self._log_buf = log_buf
        self.messages: list[tuple[str, str]] = []
        """Every libbpf message of open and load (level, text), for debugging."""

    @classmethod
    def open(cls, data: bytes, name: str = "", btf_custom_path: str | None = None) -> Self:
        """Open an ELF object from memory; raises ObjectOpenFailed for anything libbpf refuses."""
        buf = ct.create_string_buffer(bytes(data), len(data))
        log_buf = ct.create_string_buffer(_KERNEL_LOG_SIZE)
        opts = _OpenOpts(
            sz=ct.sizeof(_OpenOpts),
            object_name=name.encode() or None,
            btf_custom_path=os.fsencode(btf_custom_path) if btf_custom_path else None,
            kernel_log_buf=ct.cast(log_buf, ct.c_void_p),
            kernel_log_size=_KERNEL_LOG_SIZE,
        )
        with _captured() as messages:
            ct.set_errno(0)
            handle = _open_mem(buf, len(data), ct.byref(opts))
            err = ct.get_errno()
        if not handle:
            raise ObjectOpenFailed(err or errno.EINVAL, _log_text(messages, ("warn",)))
        obj = cls(handle, buf, log_buf)
        obj.messages = messages
        return obj

    def close(self) -> None:
        """Free libbpf's object; loaded programs and maps live on where fds or pins hold them."""
        if self._obj is not None:
            _obj_close(self._obj)
            self._obj = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- what is inside ---------------------------------------------------------------------

    def _handle(self) -> int:
        if self._obj is None:
            raise ValueError("the BPF object is closed")
        return self._obj

    def _programs(self) -> Iterator[int]:
        prog = _next_program(self._handle(), None)
        while prog:
            yield prog
            prog = _next_program(self._handle(), prog)

    def _maps(self) -> Iterator[int]:
        m = _next_map(self._handle(), None)
        while m:
            yield m
            m = _next_map(self._handle(), m)

    def programs(self) -> list[ProgramDesc]:
        return [
            ProgramDesc(_prog_name(p).decode(), _prog_section(p).decode(), _prog_type(p), _prog_attach_type(p))
            for p in self._programs()
        ]

    def maps(self) -> list[MapDesc]:
        return [
            MapDesc(
                _map_name(m).decode(),
                _map_type(m),
                _map_key_size(m),
                _map_value_size(m),
                _map_max_entries(m),
                _map_is_internal(m),
            )
            for m in self._maps()
        ]

    def _program(self, name: str) -> int:
        for p in self._programs():
            if _prog_name(p).decode() == name:
                return p
        have = ", ".join(p.name for p in self.programs()) or "none"
        raise KeyError(f"the object has no program {name!r} (it has: {have})")

    def _map(self, name: str) -> int:
        for m in self._maps():
            if _map_name(m).decode() == name:
                return m
        have = ", ".join(m.name for m in self.maps()) or "none"
        raise KeyError(f"the object has no map {name!r} (it has: {have})")

    # --- configuration (before load) --------------------------------------------------------

    def load_only(self, names: Iterable[str]) -> None:
        """Autoload exactly these programs; the others stay unloaded (and unverified)."""
        wanted = set(names)
        for name in wanted:
            self._program(name)  # KeyError naming what exists
        for p in self._programs():
            _check(_prog_set_autoload(p, _prog_name(p).decode() in wanted), "set autoload")

    def set_program_type(self, name: str, prog_type: int, expected_attach_type: int | None = None) -> None:
        """Override the type libbpf derived from the section name."""
        p = self._program(name)
        _check(_prog_set_type(p, prog_type), f"set type of {name}")
        if expected_attach_type is not None:
            _check(_prog_set_attach_type(p, expected_attach_type), f"set attach type of {name}")

    def set_attach_target(self, name: str, kernel_function: str) -> None:
        """fentry/fexit/lsm: the kernel function (BTF name) the program attaches to; resolved now."""
        p = self._program(name)
        with _captured() as messages:
            ret = _prog_set_attach_target(p, 0, kernel_function.encode())
        self.messages += messages
        _check(ret, f"find kernel function {kernel_function} for {name}")

    def reuse_map(self, name: str, fd: int) -> None:
        """Use an existing map (e.g. a pinned one) instead of creating this one at load."""
        _check(_map_reuse_fd(self._map(name), fd), f"reuse map fd for {name}")

    def set_pin_path(self, name: str, path: str) -> None:
        """Pin the map at path on load, or reuse what is already pinned there if compatible."""
        _check(_map_set_pin_path(self._map(name), os.fsencode(path)), f"set pin path of {name}")

    def global_variables(self) -> dict[str, GlobalVariable]:
        """Variables of .rodata/.data the object's BTF describes, by name."""
        btf = _obj_btf(self._handle())
        out: dict[str, GlobalVariable] = {}
        if not btf:
            return out
        for section in GLOBAL_DATA_SECTIONS:
            sec_id = _btf_find(btf, section.encode(), BTF_KIND_DATASEC)
            if sec_id < 0:
                continue
            sec = _btf_type(btf, sec_id)
            infos = ct.cast(ct.addressof(sec.contents) + ct.sizeof(_BtfType), ct.POINTER(_VarSecinfo))
            for i in range(sec.contents.info & 0xFFFF):
                var = _btf_type(btf, infos[i].type).contents
                if (var.info >> 24) & 0x1F != BTF_KIND_VAR:
                    continue
                name = _btf_name(btf, var.name_off).decode()
                out[name] = GlobalVariable(name, section, infos[i].offset, infos[i].size)
        return out

    def set_global_data(self, values: Mapping[str, bytes]) -> None:
        """Patch initial values of global variables (bpfman's globalData) before load; raises
        GlobalDataError naming the variable for unknown names and wrong sizes."""
        if not values:
            return
        variables = self.global_variables()
        problems = []
        for name, value in sorted(values.items()):
            var = variables.get(name)
            if var is None:
                have = ", ".join(sorted(variables)) or "none"
                problems.append(f"{name}: no such global variable in .rodata or .data (the object has: {have})")
            elif len(value) != var.size:
                problems.append(f"{name}: the variable is {var.size} bytes, the value has {len(value)}")
        if problems:
            raise GlobalDataError("; ".join(problems))
        sections = {self._section_map(v.section) for v in map(variables.__getitem__, values)}
        images: dict[str, tuple[int, int]] = {}
        for section, m in sections:
            size = ct.c_size_t(0)
            addr = _map_initial_value(m, ct.byref(size))
            if not addr:
                raise GlobalDataError(f"libbpf keeps no initial value for {section}")
            images[section] = (addr, size.value)
        for name, value in values.items():
            var = variables[name]
            base, length = images[var.section]
            if var.offset + var.size > length:
                raise GlobalDataError(f"{name}: lies outside its section {var.section} ({length} bytes)")
            ct.memmove(base + var.offset, value, var.size)

    def _section_map(self, section: str) -> tuple[str, int]:
        for m in self._maps():
            if _map_is_internal(m) and _map_name(m).decode().endswith(section):
                return section, m
        raise GlobalDataError(f"the object has no {section} map")

    # --- load and results -------------------------------------------------------------------

    def load(self) -> None:
        """Relocate (CO-RE), create maps, load and verify the autoloaded programs, all or none;
        raises ObjectLoadFailed."""
        handle = self._handle()
        with _captured() as messages:
            ret = _obj_load(handle)
        self.messages += messages
        if ret >= 0:
            return
        program = _failing_program(messages)
        verifier = self._log_buf.value.decode(errors="replace") if program else ""
        relos = [r for r in failed_relocations(messages) if r.program == program]
        relos = [r for r in relos if r.spec in verifier] or relos  # those the verifier reached
        raise ObjectLoadFailed(-ret, program, verifier.rstrip(), relos, _log_text(messages, ("warn",)))

    def program_fd(self, name: str) -> OwnedFd:
        """A new fd of a loaded program, independent of this object."""
        fd = _prog_fd(self._program(name))
        if fd < 0:
            raise BpfError(errno.ENOENT, f"program {name} is not loaded")
        return OwnedFd(os.dup(fd))

    def map_fd(self, name: str) -> OwnedFd:
        """A new fd of a created map, independent of this object."""
        fd = _map_fd(self._map(name))
        if fd < 0:
            raise BpfError(errno.ENOENT, f"map {name} is not created")
        return OwnedFd(os.dup(fd))


def kernel_function_btf_id(name: str) -> int:
    """The BTF id of a kernel function in the running kernel's BTF (what fentry/lsm attach to)."""
    with _captured() as messages:
        ct.set_errno(0)
        btf = _btf_load_vmlinux()
        err = ct.get_errno()
    if not btf:
        raise BpfError(err or errno.ENOENT, f"reading the kernel's BTF ({_log_text(messages, ('warn',))})")
    try:
        btf_id = _btf_find(btf, name.encode(), BTF_KIND_FUNC)
    finally:
        _btf_free(btf)
    if btf_id < 0:
        raise BpfError(-btf_id, f"kernel function {name} in BTF")
    return btf_id


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise BpfError(-ret, what)
