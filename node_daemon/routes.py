"""Finding a local pod's host-side interface from the kernel's routing table (rtnetlink).

Whatever the CNI plugin, a pod reachable on this node without a router leaves the same
trace: the FIB routes its IP straight out of one host-side veth (or netkit) device. Asking
the FIB (RTM_GETROUTE, what `ip route get` does) finds that device with no CNI-specific
hint, and keeps working when the device is recreated (its index changes, the route follows).
A route through a gateway, to a local address, or out of a physical NIC or a bridge does
not name a pod's own device, so the pod is reported as unresolved instead of guessed.

The watcher wakes the daemon when links or IPv4 routes change, so an endpoint whose
device appears (or is recreated) after its spec arrived is attached within moments.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # length, type

_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_MULTIPATH, _RTA_VIA = 1, 4, 5, 9, 18
_RTN_UNICAST = 1
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_INFO_KIND = 3, 18, 1
_RTMGRP_LINK, _RTMGRP_IPV4_ROUTE = 0x1, 0x40
_RTN_NAMES = {2: "a local address", 3: "broadcast", 4: "anycast", 5: "multicast"}
_LOOKUP_ERRORS = {
    errno.ENETUNREACH: "no route",
    errno.ENETDOWN: "no route (network down)",
    errno.EHOSTUNREACH: "routed as unreachable",
    errno.EACCES: "routed as prohibited",
    errno.EINVAL: "routed as blackholed",
}
"""How the kernel answers a lookup that hits no usable route."""

POD_LINK_KINDS = frozenset({"veth", "netkit"})
"""Device kinds whose other end is a pod: the host side of what CNI plugins create."""


@dataclass(frozen=True)
class PodInterface:
    ifindex: int
    ifname: str


@dataclass(frozen=True)
class Unresolved:
    """Why an IP does not lead to a pod's own device (for status and logs)."""

    reason: str


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]  # strip NLA_F_NESTED & co
        offset += (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class RouteTable:
    """Pod-IP lookups on one rtnetlink socket; not thread-safe (the reconcile loop owns it)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sock.settimeout(5)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteTable:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def pod_interface(self, ip: str) -> PodInterface | Unresolved:
        """The host-side pod device the kernel routes ip out of, or why there is none."""
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        request = _RTMSG.pack(family, address.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _attr(_RTA_DST, address.packed)
        try:
            rtm, attrs = self._request(_RTM_GETROUTE, request, _RTM_NEWROUTE, _RTMSG)
        except OSError as exc:
            if exc.errno in _LOOKUP_ERRORS:
                return Unresolved(_LOOKUP_ERRORS[exc.errno])
            raise
        route_type = rtm[7]
        if route_type != _RTN_UNICAST:
            return Unresolved(f"routed as {_RTN_NAMES.get(route_type, f'type {route_type}')}")
        if _RTA_GATEWAY in attrs or _RTA_VIA in attrs or _RTA_MULTIPATH in attrs:
            return Unresolved("routed through a gateway (not a pod on this node)")
        if _RTA_OIF not in attrs:
            return Unresolved("route has no output device")
        ifindex = struct.unpack("=I", attrs[_RTA_OIF][:4])[0]
        name, kind = self._link(ifindex)
        if kind not in POD_LINK_KINDS:
            return Unresolved(f"routed out of {name}, a {kind or 'physical'} device, not a pod's veth")
        return PodInterface(ifindex, name)

    def _link(self, ifindex: int) -> tuple[str, str | None]:
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        _, attrs = self._request(_RTM_GETLINK, request, _RTM_NEWLINK, _IFINFOMSG)
        name = attrs.get(_IFLA_IFNAME, b"").split(b"\0", 1)[0].decode()
        kind = None
        for sub, payload in _attrs(attrs.get(_IFLA_LINKINFO, b""), 0):
            if sub == _IFLA_INFO_KIND:
                kind = payload.split(b"\0", 1)[0].decode()
        return name, kind

    def _request(
        self, msg_type: int, body: bytes, reply_type: int, header: struct.Struct
    ) -> tuple[tuple, dict[int, bytes]]:
        self._seq += 1
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(body), msg_type, _NLM_F_REQUEST, self._seq, 0) + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
                payload = data[offset + _NLMSG.size : offset + length]
                offset += (length + 3) & ~3
                if seq != self._seq:
                    continue  # the answer to an earlier request that timed out
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    raise OSError(code, os.strerror(code))
                if kind == reply_type:
                    fixed = header.unpack_from(payload)
                    return fixed, dict(_attrs(payload, header.size))


class RouteWatcher:
    """Calls on_change (from its own thread) after links or IPv4 routes changed."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_ROUTE))
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 1.0)
            if not ready:
                continue
            try:
                while True:  # drain: one wake-up per burst
                    self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: we missed messages; waking up covers them
                    log.warning("route watch failed", extra={"error": str(exc)})
                    self._stop.wait(1)
            self._on_change()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
