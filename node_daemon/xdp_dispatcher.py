"""Several XDP programs on one interface: libxdp's multi-program dispatcher protocol.

XDP holds one program per interface. libxdp shares it by attaching a dispatcher
(bpf/xdp_dispatcher.c) whose stub functions prog0..prog9 are replaced by the component
programs through freplace (BPF_PROG_TYPE_EXT), ordered by run priority (lower first), each
continuing the chain only on the actions in its chain_call_actions. The dispatcher is
pinned at <bpffs>/xdp/dispatch-<ifindex>-<prog id>/ with prog<N>-prog and prog<N>-link
next to it, and identified by its name xdp_dispatcher and its frozen .rodata config
(magic 236, version 3).

What this module does on a node:
- probe() asks the kernel whether it takes extension programs at all: it loads the
  dispatcher and replaces its compat_test stub with xdp_pass, as libxdp's own check does.
- inspect() says who holds an interface's XDP hook: nobody, a plain program, or a
  dispatcher whose config it reads and judges (compatible, or why not).
- refusal() turns "the hook is taken" into the message a user can act on.

The config codec and the run order are pure functions (unit-tested against the C source).
"""

from __future__ import annotations

import ctypes as ct
import errno
import hashlib
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import beekeeper.bpf
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.backend import HookSupport

log = logging.getLogger(__name__)

MAGIC = 236
VERSION = 3
RETVAL = 31
"""What an unreplaced stub returns; its bit is in every slot's chain_call_actions."""
SLOTS = 10
DEFAULT_RUN_PRIORITY = 50
"""libxdp's run priority for a program that states none."""
DISPATCHER_NAME = "xdp_dispatcher"
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

CONFIG = struct.Struct(f"<BBBB{SLOTS}I{SLOTS}I{SLOTS}IB3x")
"""struct xdp_dispatcher_config (version 3) as the C compiler lays it out: 128 bytes."""

PIN_DIR = "xdp"
"""libxdp's directory under the bpffs root (LIBXDP_BPFFS overrides the root)."""


class DispatcherError(Exception):
    """An interface's dispatcher cannot be used; the text says why and what to do."""


@dataclass(frozen=True)
class DispatcherConfig:
    """The dispatcher's .rodata: how many slots run, and per slot its chain actions, run
    priority and load flags (only BPF_F_XDP_HAS_FRAGS is meaningful)."""

    num_progs_enabled: int = 0
    chain_call_actions: tuple[int, ...] = (0,) * SLOTS
    run_prios: tuple[int, ...] = (0,) * SLOTS
    program_flags: tuple[int, ...] = (0,) * SLOTS
    is_xdp_frags: bool = False
    is_xdp_devbound: bool = False
    version: int = VERSION

    def pack(self) -> bytes:
        return CONFIG.pack(
            MAGIC,
            self.version,
            self.num_progs_enabled,
            int(self.is_xdp_frags),
            *self.chain_call_actions,
            *self.run_prios,
            *self.program_flags,
            int(self.is_xdp_devbound),
        )

    @classmethod
    def unpack(cls, raw: bytes) -> DispatcherConfig:
        """Read a version-3 config; DispatcherError for anything else (libxdp's rule: an
        implementation must not rebuild a dispatcher of another version)."""
        if len(raw) < 2 or raw[0] != MAGIC:
            raise DispatcherError(
                "its config has no dispatcher magic (a version 1 libxdp dispatcher, or not a dispatcher)"
            )
        if raw[1] != VERSION:
            newer = "newer than" if raw[1] > VERSION else "older than"
            raise DispatcherError(
                f"it is a libxdp dispatcher of version {raw[1]}, {newer} the version {VERSION} beekeeper "
                "implements; the protocol forbids replacing it, so unload its programs (xdp-loader unload) first"
            )
        if len(raw) < CONFIG.size:
            raise DispatcherError(f"its version {VERSION} config is {len(raw)} bytes, expected {CONFIG.size}")
        fields = CONFIG.unpack_from(raw)
        n = SLOTS
        return cls(
            num_progs_enabled=fields[2],
            is_xdp_frags=bool(fields[3]),
            chain_call_actions=tuple(fields[4 : 4 + n]),
            run_prios=tuple(fields[4 + n : 4 + 2 * n]),
            program_flags=tuple(fields[4 + 2 * n : 4 + 3 * n]),
            is_xdp_devbound=bool(fields[4 + 3 * n]),
        )


@dataclass(frozen=True)
class Component:
    """One program in a dispatcher's chain."""

    name: str
    priority: int = DEFAULT_RUN_PRIORITY
    chain_call_actions: frozenset[int] = frozenset({XDP_PASS})
    """Actions after which the next program runs; any other action is the verdict."""
    frags: bool = False


def chain_mask(actions: Iterable[int]) -> int:
    """chain_call_actions bitmap of one slot: the actions plus the empty stub's RETVAL."""
    mask = 1 << RETVAL
    for action in actions:
        if not XDP_ABORTED <= action <= XDP_REDIRECT:
            raise ValueError(f"XDP action {action} does not exist (0..{XDP_REDIRECT})")
        mask |= 1 << action
    return mask


def run_order(components: Iterable[Component]) -> list[Component]:
    """Lower priority first; equal priorities by function name, as libxdp breaks ties first."""
    return sorted(components, key=lambda c: (c.priority, c.name))


def config_for(components: Iterable[Component]) -> DispatcherConfig:
    """The config of a dispatcher running these components in run order."""
    ordered = run_order(components)
    if len(ordered) > SLOTS:
        raise DispatcherError(f"{len(ordered)} XDP programs on one interface; the dispatcher has {SLOTS} slots")
    pad = (0,) * (SLOTS - len(ordered))
    frags = bool(ordered) and all(c.frags for c in ordered)
    return DispatcherConfig(
        num_progs_enabled=len(ordered),
        chain_call_actions=tuple(chain_mask(c.chain_call_actions) for c in ordered) + pad,
        run_prios=tuple(c.priority for c in ordered) + pad,
        program_flags=tuple(int(c.frags) << 5 for c in ordered) + pad,  # BPF_F_XDP_HAS_FRAGS
        is_xdp_frags=frags,
    )


def pin_dir(bpffs_root: str, ifindex: int, dispatcher_id: int) -> Path:
    """Where libxdp users look for an interface's dispatcher and its components."""
    return Path(bpffs_root) / PIN_DIR / f"dispatch-{ifindex}-{dispatcher_id}"


# --- the dispatcher object -----------------------------------------------------------------


def _package_file(name: str) -> Path | None:
    # importlib.resources cannot read namespace packages installed in editable mode (3.11)
    return next((p for d in beekeeper.bpf.__path__ if (p := Path(d) / name).is_file()), None)


def dispatcher_object(cache_dir: Path) -> Path:
    """The compiled dispatcher (clang -target bpf, with BTF: freplace needs it): the one
    shipped next to the source in beekeeper.bpf, else built once per source content into
    cache_dir."""
    shipped = _package_file("xdp_dispatcher.o")
    if shipped:
        return shipped
    source_path = _package_file("xdp_dispatcher.c")
    if source_path is None:
        raise DispatcherError(f"xdp_dispatcher.c is missing from the beekeeper.bpf package {beekeeper.bpf.__path__}")
    source = source_path.read_bytes()
    out = cache_dir / f"xdp_dispatcher-{hashlib.sha256(source).hexdigest()[:12]}.o"
    if out.exists():
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise DispatcherError("clang is not installed, so the XDP dispatcher object cannot be built")
    cache_dir.mkdir(parents=True, exist_ok=True)
    arch_include = f"/usr/include/{os.uname().machine}-linux-gnu"
    staged = out.with_suffix(".o~")
    cmd = [clang, "-O2", "-g", "-target", "bpf", f"-I{arch_include}", "-x", "c", "-", "-c", "-o", str(staged)]
    done = subprocess.run(cmd, input=source, capture_output=True, check=False, timeout=120)
    if done.returncode != 0:
        raise DispatcherError(f"building the XDP dispatcher failed: {done.stderr.decode(errors='replace')[-2000:]}")
    os.replace(staged, out)
    return out


_vp = ct.c_void_p
_open_mem = bpf.libbpf_function("bpf_object__open_mem", _vp, _vp, ct.c_size_t, _vp)
_obj_load = bpf.libbpf_function("bpf_object__load", ct.c_int, _vp)
_obj_close = bpf.libbpf_function("bpf_object__close", None, _vp)
_next_map = bpf.libbpf_function("bpf_object__next_map", _vp, _vp, _vp)
_map_name = bpf.libbpf_function("bpf_map__name", ct.c_char_p, _vp)
_set_initial_value = bpf.libbpf_function("bpf_map__set_initial_value", ct.c_int, _vp, _vp, ct.c_size_t)
_find_prog = bpf.libbpf_function("bpf_object__find_program_by_name", _vp, _vp, ct.c_char_p)
_set_autoload = bpf.libbpf_function("bpf_program__set_autoload", ct.c_int, _vp, ct.c_bool)
_set_type = bpf.libbpf_function("bpf_program__set_type", ct.c_int, _vp, ct.c_int)
_set_expected = bpf.libbpf_function("bpf_program__set_expected_attach_type", ct.c_int, _vp, ct.c_int)
_set_target = bpf.libbpf_function("bpf_program__set_attach_target", ct.c_int, _vp, ct.c_int, ct.c_char_p)
_set_log_buf = bpf.libbpf_function("bpf_program__set_log_buf", ct.c_int, _vp, ct.c_char_p, ct.c_size_t)
_prog_fd = bpf.libbpf_function("bpf_program__fd", ct.c_int, _vp)
_attach_freplace = bpf.libbpf_function("bpf_program__attach_freplace", _vp, _vp, ct.c_int, ct.c_char_p)
_link_destroy = bpf.libbpf_function("bpf_link__destroy", ct.c_int, _vp)
_get_error = bpf.libbpf_function("libbpf_get_error", ct.c_long, _vp)


def _errno_of(ret: int) -> int:
    return -ret if ret < -1 else (ct.get_errno() or errno.EIO)


class _Object:
    """An opened dispatcher object (libbpf's bpf_object), closed on exit."""

    def __init__(self, image: bytes) -> None:
        self._image = ct.create_string_buffer(image, len(image))  # libbpf keeps pointing into it
        self.ptr = _open_mem(self._image, len(image), None)
        if not self.ptr:
            raise bpf.BpfError(ct.get_errno() or errno.EINVAL, "open the XDP dispatcher object")

    def __enter__(self) -> _Object:
        return self

    def __exit__(self, *_exc: object) -> None:
        _obj_close(self.ptr)

    def program(self, name: str) -> int:
        prog = _find_prog(self.ptr, name.encode())
        if not prog:
            raise DispatcherError(f"the dispatcher object has no program {name}")
        return prog

    def set_config(self, config: DispatcherConfig) -> None:
        raw = config.pack()
        m = _next_map(self.ptr, None)
        while m:
            if (_map_name(m) or b"").endswith(b".rodata"):
                _check(_set_initial_value(m, raw, len(raw)), "set the dispatcher config")
                return
            m = _next_map(self.ptr, m)
        raise DispatcherError("the dispatcher object has no .rodata map")

    def load(self, what: str) -> None:
        _check(_obj_load(self.ptr), what)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise bpf.BpfError(_errno_of(ret), what)
    return ret


def load_dispatcher(image: bytes, config: DispatcherConfig) -> bpf.OwnedFd:
    """Load (not attach) a dispatcher with this config; the fd keeps it alive."""
    with _Object(image) as obj:
        _set_autoload(obj.program("xdp_pass"), False)
        obj.set_config(config)
        obj.load("load the XDP dispatcher")
        return bpf.OwnedFd(os.dup(_prog_fd(obj.program(DISPATCHER_NAME))))


def probe(cache_dir: Path) -> HookSupport:
    """Whether this kernel runs libxdp-style multi-program XDP, by really trying: load the
    dispatcher, load xdp_pass as an extension of its compat_test stub, link it there."""
    try:
        image = dispatcher_object(cache_dir).read_bytes()
        dispatcher = load_dispatcher(image, DispatcherConfig())
    except (DispatcherError, OSError) as exc:
        return HookSupport(False, f"the XDP dispatcher cannot be loaded: {exc}")
    log_buf = ct.create_string_buffer(16384)
    with dispatcher, _Object(image) as ext:
        _set_autoload(ext.program(DISPATCHER_NAME), False)
        prog = ext.program("xdp_pass")
        _set_type(prog, 28)  # BPF_PROG_TYPE_EXT
        _set_expected(prog, 0)
        try:  # libbpf reads the dispatcher's BTF by id: without CAP_SYS_ADMIN that is refused
            _check(_set_target(prog, dispatcher.fd, b"compat_test"), "resolve the freplace target's BTF")
        except bpf.BpfError as exc:
            return HookSupport(False, f"the dispatcher cannot be targeted by freplace programs: {exc.strerror}")
        _set_log_buf(prog, log_buf, len(log_buf))
        try:
            ext.load("BPF_PROG_LOAD of a BPF_PROG_TYPE_EXT (freplace) program")
        except bpf.BpfError as exc:
            verifier = log_buf.value.decode(errors="replace").strip()
            detail = f" (verifier: {verifier[-300:]})" if verifier else " (before the verifier ran)"
            return HookSupport(False, f"the kernel refuses freplace extension programs: {exc.strerror}{detail}")
        link = _attach_freplace(prog, dispatcher.fd, b"compat_test")
        err = _get_error(link)
        if err or not link:
            code = -err if err else (ct.get_errno() or errno.EIO)
            return HookSupport(False, f"the kernel refuses to link an freplace program: {os.strerror(code)}")
        _link_destroy(link)
    return HookSupport(True)


# --- who holds an interface -----------------------------------------------------------------


@dataclass(frozen=True)
class Occupant:
    """The XDP program on an interface, as another process left it."""

    prog_id: int
    name: str
    config: DispatcherConfig | None = None
    """Set when it is a dispatcher beekeeper can extend."""
    incompatible: str = ""
    """Why a dispatcher (named xdp_dispatcher) cannot be extended."""
    components: list[str] = field(default_factory=list)
    """Pinned component slots (prog<N>-prog) of a dispatcher, in slot order."""


def libxdp_bpffs() -> str:
    return os.environ.get("LIBXDP_BPFFS") or "/sys/fs/bpf"


def inspect(ifindex: int, bpffs_root: str | None = None) -> Occupant | None:
    """Who holds ifindex's XDP hook; None when nobody does. bpffs_root: where libxdp pins
    (LIBXDP_BPFFS, else /sys/fs/bpf)."""
    prog_id = bpf.xdp_attached_prog_id(ifindex)
    if not prog_id:
        return None
    with bpf.prog_by_id(prog_id) as fd:
        info = bpf.prog_info(fd.fd)
        if info.name != DISPATCHER_NAME:
            return Occupant(prog_id, info.name)
        map_ids = bpf.prog_map_ids(fd.fd)
    pins = pin_dir(bpffs_root or libxdp_bpffs(), ifindex, prog_id)
    components = sorted((p.name for p in pins.glob("prog*-prog")), key=lambda n: int(n[4:-5])) if pins.is_dir() else []
    try:
        config = _read_config(map_ids)
    except DispatcherError as exc:
        return Occupant(prog_id, info.name, incompatible=str(exc), components=components)
    if not pins.is_dir():
        return Occupant(prog_id, info.name, incompatible=f"its pins are not at {pins}", components=components)
    return Occupant(prog_id, info.name, config=config, components=components)


def _read_config(map_ids: list[int]) -> DispatcherConfig:
    if len(map_ids) != 1:
        raise DispatcherError(f"it uses {len(map_ids)} maps, a dispatcher uses exactly its config map")
    with bpf.map_by_id(map_ids[0]) as m:
        info = bpf.map_info(m.fd)
        if info.key_size != 4 or info.max_entries != 1 or not bpf.map_flags(m.fd) & bpf.BPF_F_RDONLY_PROG:
            raise DispatcherError("its config map is not a frozen one-entry .rodata map")
        return DispatcherConfig.unpack(bpf.map_lookup(m.fd, b"\0\0\0\0", info.value_size))


def refusal(point: str, occupant: Occupant, owner: str | None, multi_program: HookSupport) -> str:
    """Why a second XDP program cannot join point (on a node without multi-program XDP),
    naming who holds it and what to do."""
    if owner:
        held = f"BpfProgram {owner} already runs XDP program {occupant.name} (id {occupant.prog_id}) there"
    elif occupant.config is not None or occupant.incompatible:
        n = occupant.config.num_progs_enabled if occupant.config else len(occupant.components)
        held = f"a libxdp dispatcher (id {occupant.prog_id}, {n} programs) holds it"
    else:
        held = f"XDP program {occupant.name} (id {occupant.prog_id}), attached outside beekeeper, holds it"
    if occupant.incompatible:
        return f"{point}: {held}, and beekeeper cannot extend it: {occupant.incompatible}"
    return (
        f"{point}: {held}; a second XDP program on one interface needs libxdp's multi-program "
        f"dispatcher, which this node cannot run: {multi_program.reason}"
    )
