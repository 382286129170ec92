"""Durable file writes, checksums and the run-directory lock, shared by checkpoints, growth, export,
data preparation and the training loop."""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import socket
import time
import warnings
from pathlib import Path

from .errors import UserError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()  # chunked, not hashlib.file_digest: that needs Python 3.11
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory (which makes the names of its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that a reader sees the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_failure_fix(error: BaseException | str, key: str) -> str:
    """What to do about a failed write into the directory of config key `key`, from the error's errno
    (an OSError's own, or the "[Errno N]" / "os error N" a message carries: the background writer
    and safetensors' Rust writer pass errors on as text)."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"(?:Errno |os error )(\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code in _FULL:
        return (f"the disk is full (or a quota or file-size limit is reached): free space there or point {key} "
                "at a disk with room")
    if code in _DENIED:
        return (f"this user may not write there: fix the directory's permissions (or its read-only mount) or "
                f"point {key} elsewhere")
    return f"free space or fix permissions ({key})"


@functools.cache
def _umask() -> int:
    # Reading the umask means setting it: do it once, not while W&B's or DeepSpeed's threads
    # may be creating files (the umask is process-wide).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(executable: bool = False) -> int:
    """The mode an ordinary new file gets under this process's umask (0644 under the usual 022):
    writers that create files 0600 (safetensors) are brought to it, so outputs are consistent."""
    return (0o777 if executable else 0o666) & ~_umask()


class LockError(UserError):
    """Another live run holds the run directory, or its filesystem cannot lock."""


class RunLock:
    """One run per directory: an exclusive flock on `<dir>/.lock`, held for the life of the
    process. The kernel drops it when the process dies however it dies, so a lock file left by a
    killed run is stale by construction: it is taken over, with a warning naming that run."""

    def __init__(self, directory: Path, what: str = "log.dir"):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read() or "another process"
            os.close(self.fd)
            raise LockError(f"run directory {directory} is in use by a live run ({holder}); wait for it to "
                            f"finish or stop it, or choose another {what}") from None
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise LockError(f"the filesystem of {directory} does not support file locks ({e.strerror}); "
                                "set log.lock=false to run without the one-run-per-directory check, and make "
                                "sure no two runs share the directory") from None
            raise
        stale = self._read()
        if stale:
            warnings.warn(f"taking over the lock of {directory} from a run that is gone ({stale})", stacklevel=2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)

    def _read(self) -> str:
        return os.pread(self.fd, 4096, 0).decode(errors="replace").strip()

    def release(self) -> None:
        """Clear the holder (a finished run leaves nothing to take over) and unlock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
