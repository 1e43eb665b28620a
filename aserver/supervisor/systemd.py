"""systemd integration without depending on systemd (or libsystemd).

- `notify`: the sd_notify protocol, one datagram of "KEY=VALUE" lines to the unix socket
  named by $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace). Without the
  variable it does nothing, so the same binary runs under systemd, another supervisor or
  a terminal.
- `activated_listener`: socket activation (sd_listen_fds): when $LISTEN_PID is our pid and
  $LISTEN_FDS >= 1, the listening socket is fd 3, opened by systemd from a .socket unit.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("aserver.systemd")

SD_LISTEN_FDS_START = 3


def notify(*states: str) -> bool:
    """Send "READY=1", "STOPPING=1", "STATUS=..." ...; True if a socket was there to send to."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def monotonic_usec() -> str:
    """RELOADING=1 must carry the time (systemd >= 253 checks it with Type=notify-reload)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def activated_listener() -> socket.socket | None:
    """The socket systemd passed us, or None if we were not socket-activated.

    The variables are removed, as sd_listen_fds(unset_environment=1) does, so that no
    child mistakes them for its own."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid or not count:
        return None
    try:
        if int(pid) != os.getpid() or int(count) < 1:
            return None
    except ValueError:
        return None
    if int(count) > 1:
        log.warning("socket activation passed %s sockets; using the first (fd 3) only", count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)  # family and type read from the fd
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("socket activation: fd 3 is not a stream socket (ListenStream= in the .socket unit)")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock
