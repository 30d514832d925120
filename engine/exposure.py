"""What listens beyond this machine (SPEC section 9).

Every listening socket Kairos opens (metrics and control, ZeroMQ inputs and
outputs, channel APIs) binds to loopback unless configured otherwise, and
the checks that decide "loopback or not" live here, so that every listener
judges an address the same way.
"""

from __future__ import annotations

import ipaddress
import socket


def is_loopback_host(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only (SPEC section 9).

    An address is judged by itself; a name by every address it resolves to.
    The empty host and wildcard addresses listen everywhere, and a name that
    does not resolve is not taken on trust.
    """
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether binding a ZeroMQ `endpoint` listens on this machine only.

    ipc:// and inproc:// endpoints are local.  A tcp:// endpoint is loopback
    when its host is, by `is_loopback_host`; ``*``, wildcard addresses,
    interface names and other hosts are not, nor are other transports.
    """
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    return is_loopback_host(address.rpartition(":")[0])
