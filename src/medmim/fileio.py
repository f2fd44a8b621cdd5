"""Files that appear whole or not at all, and text that is always UTF-8.

Every file medmim writes for a user or for a later stage (configs, JSON contracts, checkpoints, weights,
images, reports) goes through :func:`atomic_write`: it is written beside its target under a temporary
name, flushed to disk (``fsync``), renamed over the target, and the folder is synced too, so a crash or
a full disk never leaves half a file, and an old good file is only replaced by a complete new one.

    atomic_write_text(run / "summary.md", text)
    atomic_write_json(cache / "manifest.json", manifest)
    atomic_write(path, lambda tmp: nib.save(img, tmp))   # any writer that takes a file name
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

ENCODING = "utf-8"


def temp_path(path: Path) -> Path:
    """The temporary name beside ``path``: hidden, unique to this process, same suffixes (``.nii.gz``
    stays ``.nii.gz``, which writers that choose a format by suffix need)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write the file at a temporary path, then move it onto ``path``.

    The folder is made if needed. If ``write`` raises (or the process dies), ``path`` is untouched
    and the temporary file is removed; the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 (``\\n`` line ends on every platform)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=ENCODING, newline="\n") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, **kw) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def read_text(path: str | os.PathLike) -> str:
    return Path(path).read_text(encoding=ENCODING)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))
