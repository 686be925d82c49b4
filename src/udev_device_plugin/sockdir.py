"""The kubelet's socket directory, held open by a file descriptor and never followed through a symlink.

The daemon runs as root and creates and deletes files in this directory, so the directory
itself is opened with O_NOFOLLOW|O_DIRECTORY and everything after that goes through the
descriptor: sockets are bound and connected at ``/proc/self/fd/N/<name>`` (the kernel
resolves that to the directory we opened, wherever it was moved), listed, stat-ed and
unlinked with ``dir_fd``.  Replace the directory by a symlink to elsewhere and nothing of
ours lands there: :meth:`SocketDir.check` sees the path no longer names our directory.

Problems are values, not exceptions, so the caller can log each once and wait:
:func:`inspect_path` says what is at the path now.  Only what a restart alone can cure
raises :class:`RestartNeeded`: a directory deleted while our mount namespace still shows
it (systemd's ReadWritePaths= bind mount of a directory removed on the host), or a
directory that is read-only to us (EROFS).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import List, Optional, Tuple

DIR_MODE = 0o750  # the kubelet's own
SOCKET_MODE = 0o600


class RestartNeeded(Exception):
    """Only a new process (and, under systemd, a new mount namespace) can serve again."""


def _describe(st: os.stat_result, path: str) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a symbolic link (to {target!r})"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a directory"


def inspect_path(path: str) -> Tuple[Optional[os.stat_result], str]:
    """(lstat of ``path``, "") when it is a directory; (lstat or None, why not) otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return st, f"{path} is {_describe(st, path)}, not a directory"
    return st, ""


class SocketDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.identity: Optional[Tuple[int, int]] = None

    # --- opening -------------------------------------------------------------------------------

    def open(self, create: bool = True) -> str:
        """Open the directory (creating it when missing); return "" or why it cannot be used now."""
        self.close()
        st, why = inspect_path(self.path)
        if st is None and create and why.endswith("does not exist"):
            try:
                os.makedirs(self.path, mode=DIR_MODE, exist_ok=True)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    raise RestartNeeded(f"cannot create {self.path}: it is on a read-only file system here "
                                        "(under systemd: not in this service's ReadWritePaths= when it started)"
                                        ) from None
                return f"cannot create {self.path}: {exc.strerror}"
            st, why = inspect_path(self.path)
        if why:
            return why
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return f"cannot open {self.path}: {exc.strerror}"
        fst = os.fstat(fd)
        assert st is not None
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return f"{self.path} changed while it was opened"
        if fst.st_nlink == 0:
            os.close(fd)
            raise RestartNeeded(f"{self.path} was deleted, yet this process still sees it (a mount of the removed "
                                "directory: systemd's sandbox); a restart serves in the new one")
        self.fd = fd
        self.identity = (fst.st_dev, fst.st_ino)
        return ""

    def check(self) -> str:
        """"" while the path still names the directory we hold; otherwise what happened to it."""
        if self.fd is None:
            return f"{self.path} is not open"
        fst = os.fstat(self.fd)
        st, why = inspect_path(self.path)
        if st is not None and not why and (st.st_dev, st.st_ino) == self.identity:
            if fst.st_nlink == 0:
                raise RestartNeeded(f"{self.path} was deleted, yet this process still sees it (a mount of the "
                                    "removed directory: systemd's sandbox); a restart serves in the new one")
            return ""
        if fst.st_nlink == 0:
            return f"{self.path} was removed" + (f" ({why})" if why and st is not None else "")
        if why:
            return f"{self.path} was moved away or replaced: {why.split(': ', 1)[-1]}" if st is not None \
                else f"{self.path} was moved away"
        return f"{self.path} was replaced by another directory"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.identity = None

    # --- inside it -------------------------------------------------------------------------------

    def at(self, name: str) -> str:
        """A path to ``name`` inside the directory we hold, for bind() and connect()."""
        assert self.fd is not None
        return f"/proc/self/fd/{self.fd}/{name}"

    def watch_path(self) -> str:
        assert self.fd is not None
        return f"/proc/self/fd/{self.fd}"

    def lstat(self, name: str) -> Optional[os.stat_result]:
        if self.fd is None:
            return None
        try:
            return os.lstat(name, dir_fd=self.fd)
        except OSError:
            return None

    def names(self) -> List[str]:
        if self.fd is None:
            return []
        try:
            return os.listdir(self.fd)
        except OSError:
            return []

    def remove_socket(self, name: str, inode: Optional[int] = None) -> bool:
        """Unlink ``name`` only if it is a UNIX socket and, if given, the one with ``inode``."""
        st = self.lstat(name)
        if st is None or not stat.S_ISSOCK(st.st_mode) or (inode is not None and st.st_ino != inode):
            return False
        assert self.fd is not None
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            return False
        return True

    def answers(self, name: str) -> bool:
        """Does a live process accept connections on the socket ``name``?  (Refused: it is stale.)"""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.at(name))
        except BlockingIOError:
            return True  # the listener's backlog is full: it lives
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        return True


def connections(bind_path: str) -> int:
    """Connected sockets the kernel lists at ``bind_path`` (the path as bound) in /proc/net/unix.

    A listening socket's accepted connections carry its address; their number drops to zero
    when every client has closed its end (and our server closed the accepted one).
    """
    count = 0
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="surrogateescape") as f:
            next(f, None)
            for line in f:
                parts = line.split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path; St 03 = SS_CONNECTED
                if len(parts) == 8 and parts[5] == "03" and parts[7].rstrip("\n") == bind_path:
                    count += 1
    except OSError:
        return 0
    return count
