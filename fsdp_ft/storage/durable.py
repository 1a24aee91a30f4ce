"""Writes that survive a crash or a power loss: fsync the data, then the folder that names it.

A rename makes a checkpoint or an export visible; it is only safe once every file inside is on disk, or after a
power loss the folder can exist with empty files in it.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder. Some file systems refuse fsync on folders: the data is then as safe as they allow."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> dict[str, int]:
    """fsync every file and folder under `root` (deepest first, `root` last); returns {relative path: size}."""
    root = Path(root)
    sizes: dict[str, int] = {}
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            fsync_path(path)
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
        fsync_path(folder)
    return dict(sorted(sizes.items()))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file and fsync it (its folder is fsynced by whoever renames or publishes it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Replace a small file atomically: readers see the old or the new content, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_text(tmp, text)
    os.replace(tmp, path)
    fsync_path(path.parent)
