"""Whole-file writes by rename: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    mode: int | None = None,
    fsync: bool = False,
    prefix: str | None = None,
) -> Path:
    """Write `text` (UTF-8) to `path` via a temp file in the same directory and rename(2).

    The temp file is mkstemp's (mode 0600) and keeps that mode unless `mode` is given; with
    `fsync` its data reach the disk before the rename.  `prefix` starts the temp file's name
    (default `.<name>.`).  On any error the temp file is removed and `path` is left as it was.
    The directory must exist.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}." if prefix is None else prefix
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
