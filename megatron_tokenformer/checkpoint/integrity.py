"""Integrity: manifests, verification, the one atomic writer of checkpoint directories, and which
checkpoint in a directory to use.

A checkpoint is written into `<tag>.partial` (see `staging`), then `commit` fsyncs every file,
lists its size and sha256 in manifest.json, renames the directory to `<tag>` and fsyncs the
parent: a kill at any moment leaves every earlier checkpoint whole, and one whose manifest does
not verify is skipped with a warning naming the broken file.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from ..fileio import atomic_write_text, fsync_path, sha256_file
from .files import PARTIAL, CheckpointError


def verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and intact, else what is wrong with it."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (an incomplete or foreign checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if sha256_file(f) != entry["sha256"]:
            return f"{name} does not match its checksum in manifest.json (corrupted)"
    return None


def file_entry(f: Path) -> dict:
    """fsync a written file; its manifest entry."""
    fsync_path(f)
    return {"size": f.stat().st_size, "sha256": sha256_file(f)}


def write_manifest(path: Path, known: dict | None = None) -> None:
    """fsync every file of a checkpoint directory and list its size and sha256 in manifest.json.
    `known`: entries (`file_entry`) already made by the ranks that wrote those files, so that the
    hashing is shared out rather than all done here."""
    files, known = {}, known or {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"):
        name = str(f.relative_to(path))
        files[name] = known[name] if name in known else file_entry(f)
    atomic_write_text(path / "manifest.json", json.dumps({"files": files}, indent=1))
    fsync_path(path)


def staging(dst: Path) -> Path:
    """A fresh, empty `<dst>.partial` to write checkpoint `dst` into (one left by a killed writer
    is removed)."""
    tmp = dst.with_name(dst.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, dst: Path, replace: bool = False, known: dict | None = None) -> None:
    """Make the fully written staging directory `tmp` the checkpoint `dst`, atomically: manifest,
    rename, fsync of the parent. `replace`: an existing `dst` (the same step saved again by a
    resumed run) is replaced; otherwise it is an error. `known`: see `write_manifest`."""
    write_manifest(tmp, known)
    if dst.exists():
        if not replace:
            raise CheckpointError(f"{dst} already exists; nothing was overwritten")
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


def mark_latest(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(ckpt_dir / "latest", tag)


def complete_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(PARTIAL))


def prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete staging leftovers and older checkpoints beyond keep_last (never `keep`, the one just
    written and verified)."""
    for p in ckpt_dir.iterdir():
        if p.name.endswith(PARTIAL):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    for old in complete_tags(ckpt_dir)[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def newest_good(ckpt_dir: Path) -> str | None:
    """The newest checkpoint in ckpt_dir that verifies; warns naming each broken one it skips."""
    if not Path(ckpt_dir).is_dir():
        return None
    for tag in reversed(complete_tags(Path(ckpt_dir))):
        problem = verify(Path(ckpt_dir) / tag)
        if problem is None:
            return tag
        warnings.warn(f"skipping checkpoint {Path(ckpt_dir) / tag}: {problem}", stacklevel=2)
    return None


def resolve(path: str | Path, what: str = "") -> tuple[Path, str]:
    """A checkpoint directory (its newest intact checkpoint) or one step_* directory (which must
    be intact) -> (directory, tag). `what` names where the path came from in errors (e.g. the
    config key)."""
    path = Path(path)
    name = f"{what}={path}" if what else str(path)
    if (path / "meta.json").is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {name} is damaged: {problem}")
        return path.parent, path.name
    tag = newest_good(path) if path.is_dir() else None
    if tag is None:
        raise CheckpointError(f"{name} is not a checkpoint: no step_*/ directory with meta.json and an intact "
                              "manifest.json (point at checkpoint.dir or one step_* inside it)")
    return path, tag
