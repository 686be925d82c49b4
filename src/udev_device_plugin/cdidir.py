"""The CDI spec directory: spec files written atomically through a directory descriptor, and the
daemon's keeper of every resource's spec (:class:`CdiSpecs`).

As in sockdir.py, the daemon runs as root and writes into a directory others may reach, so the
directory is opened with O_DIRECTORY|O_NOFOLLOW (a symlink put in its place is refused, not
followed) and every file operation goes through that descriptor: a temporary file created with
O_EXCL|O_NOFOLLOW, mode 0644 whatever the umask (runtimes read specs as other users too), written,
then renamed over the spec's name (a runtime never reads half a spec; a symlink at that
name is replaced, not followed).  Only regular files of ours are removed.

Problems are values: a directory that cannot be written is logged as an error naming
``[plugin] cdi_spec_dir`` and retried with backoff while the daemon keeps serving; Allocate then
leaves the CDI devices out (``cdi_only``: refuses) until a spec is written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import Any, Callable, Dict, Iterable, Optional, Set

from .cdi import SPEC_PREFIX, SPEC_SUFFIX, Spec, SpecBuilder, spec_file
from .model import CdiView

log = logging.getLogger(__name__)

DIR_MODE = 0o755
FILE_MODE = 0o644
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


def _why(exc: OSError, path: str) -> str:
    if exc.errno == errno.EROFS:
        return (f"{path} is on a read-only file system here (under systemd: not in the service's "
                "ReadWritePaths=, see udev-device-plugin(8), Sandbox)")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR on Linux, ELOOP elsewhere.
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return f"{path} is a symbolic link, which is not followed"
        return f"{path} is not a directory" if exc.errno == errno.ENOTDIR else f"{path}: {exc.strerror}"
    return f"{path}: {exc.strerror}"


def check(path: str) -> Optional[str]:
    """Why the daemon (root) could not write specs into ``path`` (None: it could), without writing:
    for ``check-config``, which may run as another user, so judged as root would find it: the path
    must be a directory and no symbolic link, or missing with a directory to create it in, on a
    file system mounted read-write (as root, also writable for root: an immutable directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent) and not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{path} does not exist, and {parent} is not a directory to create it in"
        problem = _unwritable(parent)
        return f"{path} does not exist, and {parent} {problem} to create it in" if problem else None
    except NotADirectoryError:
        return f"{path} cannot be a directory: a component of its path is a file"
    except OSError as exc:
        return _why(exc, path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link, which is not followed"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    problem = _unwritable(path)
    return f"{path} {problem}" if problem else None


def _unwritable(directory: str) -> Optional[str]:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if os.geteuid() == 0 and not os.access(directory, os.W_OK | os.X_OK):
        return "is not writable for root"
    return None


class SpecDir:
    """One spec directory, opened afresh (by descriptor) for each change."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _open(self, create: bool) -> int:
        if create:
            try:
                os.mkdir(self.path, DIR_MODE)
                os.chmod(self.path, DIR_MODE)  # whatever the umask (the unit's is 0077)
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(self.path, DIR_MODE, exist_ok=True)
                os.chmod(self.path, DIR_MODE)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return fd

    def write(self, name: str, data: bytes) -> Optional[int]:
        """Put ``data`` at ``name`` atomically; return the file's inode.  Raises OSError."""
        fd = self._open(create=True)
        try:
            tmp = f".{name}.{os.getpid()}.tmp"  # no .json: runtimes skip it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                          dir_fd=fd)
            try:
                os.fchmod(out, FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
                # No fsync: readers see the old spec or the new one either way (the rename), and after
                # a crash the daemon writes every spec again when it starts; an fsync would only put
                # milliseconds of disk I/O between a hotplug event and the kubelet's list.
                inode = os.fstat(out).st_ino
            except BaseException:
                os.close(out)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise
            os.close(out)
            try:
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise
            return inode
        finally:
            os.close(fd)

    def remove(self, name: str, inode: Optional[int] = None) -> bool:
        """Unlink ``name`` if it is a regular file (and, given ``inode``, the one we wrote)."""
        try:
            fd = self._open(create=False)
        except OSError:
            return False
        try:
            st = os.lstat(name, dir_fd=fd)
            if not stat.S_ISREG(st.st_mode) or (inode is not None and st.st_ino != inode):
                return False
            os.unlink(name, dir_fd=fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def sweep(self, keep: Set[str]) -> None:
        """Remove files of ours a previous run left (killed before it could), except ``keep``."""
        try:
            fd = self._open(create=False)
        except OSError:
            return
        try:
            for name in os.listdir(fd):
                ours = name.startswith(SPEC_PREFIX) and name.endswith(SPEC_SUFFIX)
                temp = name.startswith("." + SPEC_PREFIX) and name.endswith(".tmp")
                if (ours or temp) and name not in keep:
                    with contextlib.suppress(OSError):
                        if stat.S_ISREG(os.lstat(name, dir_fd=fd).st_mode):
                            os.unlink(name, dir_fd=fd)
                            log.info("removed %s/%s, left by an earlier run", self.path, name)
        except OSError:
            pass
        finally:
            os.close(fd)


class _Written:
    def __init__(self, directory: str, file: str) -> None:
        self.builder = SpecBuilder()
        self.directory = directory
        self.file = file
        self.inode: Optional[int] = None
        self.digest = b""  # of the content written ("": none)
        self.problem = ""
        self.first = True  # nothing put yet: a file at our name is an earlier run's
        self.spec: Optional[Spec] = None  # the last spec synced


class CdiSpecs:
    """Keeps the spec file of every resource with ``cdi = yes`` in step with what it advertises.

    ``sync(state)`` after anything that may change the spec (a scan, a reload); it rewrites the file
    only when its content changed (a health change never does: the spec lists every advertised ID)
    and tells the resource's state what Allocate may name.  ``schedule(delay, fn)`` runs ``fn``
    later (the loop's call_later), for retries.
    """

    def __init__(self, directory: str, schedule: Callable[[float, Callable[[], None]], Any]) -> None:
        self.directory = directory
        self.schedule = schedule
        self._specs: Dict[str, _Written] = {}
        self._failing: Dict[str, Any] = {}  # resource -> its state, while its spec could not be written
        self._retry: Optional[Any] = None
        self._delay = RETRY_FIRST

    def start(self, resources: Iterable[Any]) -> None:
        """At start-up: remove what an earlier run left in the directory (only when a resource uses CDI:
        a daemon without CDI resources never touches it)."""
        files = {spec_file(r) for r in resources if r.cdi}
        if files:
            SpecDir(self.directory).sweep(files)

    def sync(self, state: Any) -> None:
        res = state.config
        name = res.name
        written = self._specs.get(name)
        if not res.cdi:
            if written is not None:
                self.remove(name)
            state.set_cdi(None)
            return
        if written is None or written.directory != self.directory:
            if written is not None:
                self._remove_file(written)
            written = self._specs[name] = _Written(self.directory, spec_file(res))
        spec = written.builder.build(res, state.current()[1], state.advertised().ids_of)
        path = os.path.join(self.directory, written.file)
        if spec is written.spec and not written.problem and not written.first:
            return  # the same spec object: nothing the file says changed, and it is written
        written.spec = spec
        for problem in spec.problems:
            log.warning("%s", problem)
        import hashlib  # only with CDI on: hashlib loads OpenSSL's libcrypto (~0.5 MiB)

        digest = hashlib.sha256(spec.text).digest() if spec.text is not None else b""
        problem = ""
        if digest != written.digest or written.problem or written.first:
            problem = self._put(res, written, spec.text, digest)
        if problem:
            self._failing[name] = state
            self._arm_retry()
        else:
            self._failing.pop(name, None)
        state.set_cdi(CdiView(spec.names, path, problem))

    def _put(self, res: Any, written: _Written, text: Optional[bytes], digest: bytes) -> str:
        path = os.path.join(written.directory, written.file)
        first, written.first = written.first, False
        if text is None:
            if first:
                SpecDir(written.directory).remove(written.file)  # an earlier run's
            self._remove_file(written)
            written.digest, written.problem = b"", ""
            return ""
        try:
            written.inode = SpecDir(written.directory).write(written.file, text)
        except OSError as exc:
            problem = (f"cannot write the CDI spec {path}: {_why(exc, self.directory)}; "
                       "[plugin] cdi_spec_dir must name a directory root can write")
            if problem != written.problem:
                log.error("%s: %s; serving on, retrying (Allocate answers without CDI devices%s meanwhile)",
                          res.name, problem, ", or refuses with cdi_only = yes" if res.cdi_only else "")
            written.problem = problem
            written.digest = b""
            return problem
        if written.problem:
            log.info("%s: CDI spec %s written at last", res.name, path)
        else:
            log.debug("%s: CDI spec %s written (%d bytes)", res.name, path, len(text))
        written.digest, written.problem = digest, ""
        return ""

    def _arm_retry(self) -> None:
        if self._retry is not None:
            return
        delay = self._delay
        self._delay = min(self._delay * 2, RETRY_MAX)

        def retry() -> None:
            self._retry = None
            for state in list(self._failing.values()):
                self.sync(state)
            if not self._failing:
                self._delay = RETRY_FIRST

        self._retry = self.schedule(delay, retry)

    @staticmethod
    def _remove_file(written: _Written) -> None:
        if written.inode is not None:
            SpecDir(written.directory).remove(written.file, written.inode)
            written.inode = None

    def remove(self, name: str) -> None:
        """The resource is no longer served (or no longer with CDI): its spec goes."""
        written = self._specs.pop(name, None)
        self._failing.pop(name, None)
        if written is not None:
            self._remove_file(written)

    def set_directory(self, directory: str, states: Any) -> None:
        """``cdi_spec_dir`` changed on reload: the specs move (removed from the old directory first)."""
        if directory == self.directory:
            return
        for name in list(self._specs):
            self.remove(name)
        self.directory = directory
        for state in states:
            if state.config.cdi:
                self.sync(state)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for name in list(self._specs):
            self.remove(name)
