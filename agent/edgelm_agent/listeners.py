"""Create the listening sockets: the Unix socket (mode 0660, group-owned) and loopback TCP.

We bind the sockets ourselves and hand them to aiohttp, so the permissions are right from the
first moment the socket exists and a stale socket left by a crash is dealt with explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import resource
import socket
import stat
from pathlib import Path

from edgelm_agent.config import HttpListen
from edgelm_agent.errors import ConfigError

SOCKET_MODE = 0o660
DEFAULT_SOCKET_GROUP = "edgelm"
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL


def lock_socket_path(path: Path) -> int:
    """Hold ``<socket>.lock`` for the daemon's life, so two agents never race for one socket.

    Without it, a second agent could probe the socket between the first one's bind() and
    listen(), take it for stale, and delete it. The lock is released by the kernel when the
    process dies, however it dies.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}.lock: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise ConfigError(f"another process is serving on {path}; is an agent running?") from exc
    return fd


def socket_gid(group: str | None) -> int:
    """The group that owns the socket. A configured ``group`` must exist. Unset: ``edgelm``
    if it exists and this process may give a file to it (root, or a member), else the
    process's own primary group (a developer's agent, or one run by hand)."""
    if group is not None:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group {group!r}: no such group") from None
    try:
        gid = grp.getgrnam(DEFAULT_SOCKET_GROUP).gr_gid
    except KeyError:
        return os.getegid()
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return gid
    return os.getegid()


def bind_unix_socket(path: Path, group: str | None = None) -> socket.socket:
    """Bind ``path`` with mode 0660 and group ``group`` (see :func:`socket_gid`), replacing a
    stale socket but never a file.

    Call with :func:`lock_socket_path` held: then a socket file at ``path`` can only be a
    leftover of an agent that died, since a live one would hold the lock.
    """
    encoded = os.fsencode(path)
    if len(encoded) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"socket path {path} is {len(encoded)} bytes; Unix sockets allow at most "
            f"{MAX_SOCKET_PATH_BYTES}"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot inspect {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # stale: left behind by an agent that did not shut down cleanly

    gid = socket_gid(group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask narrows the mode at bind time to 0600, so nobody else can connect in the moment
    # before the group is right; only then does the group get its rights.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind Unix socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        if os.stat(path).st_gid != gid:
            os.chown(path, -1, gid)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot give Unix socket {path} to group {group or gid}: {exc.strerror}; the agent "
            "must run as root or as a member of socket_group"
        ) from exc
    os.chmod(path, SOCKET_MODE)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp_socket(listen: HttpListen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def remove_socket_file(path: Path, inode: int) -> None:
    """Remove our socket file at shutdown, unless another agent has replaced it meanwhile.

    ``inode`` is the path's inode right after we bound it (``os.stat(path).st_ino``).
    """
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            path.unlink()


#: Descriptors kept back from both listeners' connections: the database, model files and the
#: runtimes' own files must always get one. An agent with a model holds about 25; a burst of
#: refused connections holds up to 64 more for a moment (one accept batch and the refusals
#: lingering to deliver their 503, see api/connections.py).
FD_RESERVE = 128
MIN_CONNECTIONS = 16


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files as far as the hard limit allows; return the soft
    limit now in force. systemd starts services with a soft limit of 1,024 and a far higher
    hard one, which a process may take without privileges."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; the caps below adapt to it
    return soft


def connection_caps(configured_tcp: int, soft_limit: int, *, http: bool) -> tuple[int, int]:
    """(Unix, TCP) connection caps. Together they stay below the open-file limit minus
    FD_RESERVE, so neither listener can take the database's or the models' descriptors. TCP
    gets what is configured, at most half of that budget; the Unix socket the rest, so a flood
    on either listener leaves the other its own share."""
    budget = max(2 * MIN_CONNECTIONS, soft_limit - FD_RESERVE)
    if not http:
        return budget, 0
    tcp = max(MIN_CONNECTIONS, min(configured_tcp, budget // 2))
    return budget - tcp, tcp
