"""Writing result files so that a crash, Ctrl-C or a parallel run never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserInputError


def check_writable(path: str | os.PathLike) -> None:
    """Fail before the model loads, not after an hour of work, when results could not be saved under `path`.

    `path` may not exist yet (it is created later); its nearest existing ancestor must be a writable folder. A
    `.json` path names lm-eval's results file, so its parent is the folder that matters.
    """
    folder = Path(path)
    if folder.suffix == ".json":
        folder = folder.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserInputError(f"cannot write results under {str(path)!r}: {folder} is a file, not a folder; choose another --output_path")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"cannot write results under {str(path)!r}: {folder} is not writable; choose another --output_path")


def atomic_write(path: str | os.PathLike, data: str | bytes, what: str = "results") -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (creating parent folders).

    Any OS failure becomes a one-line UserInputError naming the path; the previous file, if any, stays intact.
    """
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"cannot write {what} to {target}: it is a directory; give a file path")
    tmp_name: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data.encode("utf-8") if isinstance(data, str) else data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(f"cannot write {what} to {target}: {reason}; choose a writable output path") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
