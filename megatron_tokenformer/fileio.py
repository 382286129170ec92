"""Durable file writes and checksums, shared by checkpoints, growth, export and data preparation."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


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


def umask_mode(executable: bool = False) -> int:
    """The mode an ordinary new file gets under this process's umask (0644 under the usual 022):
    writers that create files 0600 (safetensors) are brought to it, so outputs are consistent."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask
