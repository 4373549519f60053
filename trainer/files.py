"""Files and folders a run reads and writes: the user's umask, and folders named on the command line.

A leaf module: every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from trainer.errors import ConfigError


def umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and setting it straight
    back (not atomic, so only where /proc cannot say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Gives `path` the mode a plain open() or mkdir() would have: rw (rwx for a folder) less the umask.

    safetensors writes its files 0600 and tempfile.mkdtemp its folders 0700; a model a run writes
    must be readable by whoever the user's umask lets read their other files (a serving account, a
    colleague), like any other program's output.
    """
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~umask())


def make_temp_dir(parent: str | Path, prefix: str) -> str:
    """tempfile.mkdtemp (a fresh, uniquely named folder) with the umask's mode instead of 0700."""
    folder = tempfile.mkdtemp(dir=parent, prefix=prefix)
    follow_umask(folder)
    return folder


def require_folder(path: str | Path, what: str, expected: str) -> Path:
    """`path` as a Path if it is a folder; else a one-line ConfigError saying that it does not exist
    or is a file, and what `expected` there."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass {expected}")
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; pass {expected}")
    return path
