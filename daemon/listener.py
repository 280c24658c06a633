"""The daemon's Unix socket: bound safely, never stolen, gated by peer credentials.

The socket lives on a filesystem path (never the abstract namespace) with mode
0660 and an optional group. A file already at the path is replaced only when
it is a socket nobody answers on (left by a crashed daemon), and only by a
caller that holds the store's writer lock; a live daemon's socket is never
touched, and a path that is not a socket is never deleted. What would make
binding fail can be found before the store is opened (``check_socket_path``),
so a daemon that cannot serve on its socket leaves no store behind.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ctxstore.errors import ConflictError, InvalidInputError, StorageError

log = logging.getLogger("ctxstore.daemon")

SOCKET_MODE = 0o660
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


@dataclass(frozen=True, slots=True)
class BoundSocket:
    """A listening socket and the identity of the file it created, for a safe unlink later."""

    sock: socket.socket
    path: Path
    inode: int

    def remove(self) -> None:
        """Unlink the socket file only if it is still ours (a successor may have replaced it)."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def check_socket_path(path: Path, *, group: str | None = None) -> None:
    """Refuse now what :func:`bind_socket` would refuse, before the daemon opens its store.

    InvalidInputError for a socket group that does not exist; StorageError for
    a socket directory that cannot be made (it is made here: the daemon needs
    it); ConflictError for a path that is not a socket, or a socket another
    daemon listens on (named by its pid). A stale socket stays where it is:
    only :func:`bind_socket`, called with the writer lock held, replaces it.
    """
    if group is not None:
        gid = _group_id(group)
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise InvalidInputError(
                f"socket group {group!r}: the daemon's user (uid {os.geteuid()}) is not a "
                "member of it, so it cannot give the socket to that group"
            )
    _make_directory(path.parent)
    _is_stale(path)


def bind_socket(path: Path, *, group: str | None = None, backlog: int = 512) -> BoundSocket:
    """A listening socket at ``path`` with mode 0660 (and ``group``), replacing a stale one."""
    _make_directory(path.parent)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the socket is never reachable with looser permissions
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StorageError(exc.errno, f"cannot bind socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            os.chown(path, -1, _group_id(group))
        sock.listen(backlog)
    except BaseException as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise StorageError(
                exc.errno,
                f"cannot set up socket {path} (mode 0{SOCKET_MODE:o}"
                f"{f', group {group!r}' if group is not None else ''}): {exc.strerror}",
            ) from exc
        raise
    sock.setblocking(False)
    return BoundSocket(sock, path, os.lstat(path).st_ino)


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidInputError(f"socket group {group!r} does not exist") from None


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"cannot create the socket's directory {directory}: {exc.strerror}"
        ) from None


def _clear_stale(path: Path) -> None:
    if _is_stale(path):
        log.warning("replacing stale socket %s left by a daemon that is gone", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _is_stale(path: Path) -> bool:
    """True for a socket nobody answers on, False for no file; ConflictError for the rest."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot look at socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConflictError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError as exc:
            raise ConflictError(f"cannot tell whether socket {path} is live: {exc}") from exc
        holder = _PEERCRED.unpack(
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )[0]
    raise ConflictError(
        f"another daemon is listening on {path} (pid {holder}); refusing to steal its socket"
    )


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
#: the most CPython's getsockopt() will fetch (its limit): 256 groups. A peer in more groups
#: is judged by its primary gid alone (ERANGE), which can only refuse, never wrongly admit.
_MAX_GROUPS_BYTES = 1024


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected Unix socket, plus the peer's supplementary groups.

    Groups come from SO_PEERGROUPS, the kernel's record taken at connect time,
    not from /proc (hidden from the daemon by ProtectProc=invisible).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid, _peer_groups(sock) | {gid})


#: errnos of SO_PEERGROUPS already logged as a warning (a kernel without it fails every time)
_groups_errors_seen: set[int | None] = set()


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    except OSError as exc:
        first = exc.errno not in _groups_errors_seen
        _groups_errors_seen.add(exc.errno)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "cannot read a peer's supplementary groups (%s): judging by its gid",
            exc,
        )
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Who may connect: everyone the file mode lets in, or only listed uids / gids."""

    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def permits(self, peer: PeerCredentials) -> bool:
        if not self.allow_uids and not self.allow_gids:
            return True
        if peer.uid in self.allow_uids or peer.uid == os.getuid():
            return True
        return bool(peer.groups & self.allow_gids)
