"""Output folders: check that one can be written before any work starts.

Training, ``megamt export`` and ``megamt eval`` write their results at the end, after
minutes or hours; a read-only or full folder must stop them at the start, with one sentence
that names the folder and the setting that chooses it, not with an ``OSError`` traceback
from the first checkpoint (and a broken connection on every other rank).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

PROBE_BYTES = 64 * 1024  # a probe this big needs real blocks: a full disk refuses it


class OutputDirError(RuntimeError):
    """An output folder that cannot be created or written."""


def ensure_writable(folder: str | Path, what: str, fix: str) -> Path:
    """Create ``folder`` (and its parents) and write, sync and delete a probe file in it.

    ``what`` names the folder for the user (``"train.run_dir"``, ``"--out"``), ``fix`` says
    how to choose another. Raises :class:`OutputDirError` with the OS reason.
    """
    folder = Path(folder)
    probe = folder / f".megamt-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())  # delayed allocation: a full disk may only refuse at the flush
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason += " (the disk is full)"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason += " (read-only or not yours)"
        raise OutputDirError(f"{what}={folder}: cannot write there: {reason}. {fix}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder
