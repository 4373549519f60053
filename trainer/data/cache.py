"""Where the token cache lives, and making sure a folder in it can be written before work starts.

A leaf module: prepare.py and tokenizer.py both need it, and it needs neither.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time

from .errors import DataError

# Temp folders of killed runs are never read; after a day they cannot belong to a live run. Pieces
# of an unfinished tokenization are kept longer: a later run with the same data resumes from them.
STALE_TMP_SECONDS = 24 * 3600
STALE_PARTIAL_SECONDS = 7 * 24 * 3600


def default_cache_dir() -> str:
    return os.environ.get("TRAINER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "trainer")


def resolve_cache_dir(cache_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))


def _unusable(folder: str, reason: str) -> DataError:
    return DataError(
        f"cache folder {folder} {reason}; set data.cache_dir (or the TRAINER_CACHE_DIR environment variable) "
        "to a folder this user can write"
    )


def writable_subdir(cache_dir: str, name: str) -> str:
    """cache_dir/name, created if needed; a DataError naming the folder if it cannot be used."""
    folder = os.path.join(cache_dir, name)
    existing = folder
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # the nearest part of the path that exists
    if not os.path.isdir(existing):
        raise _unusable(existing, "is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        # os.access is not enough (root, ACLs, read-only mounts): try what a build will do.
        probe = tempfile.mkdtemp(dir=folder, prefix=".probe-")
        os.rmdir(probe)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _unusable(folder, "is not writable (permission denied)") from None
        raise _unusable(folder, f"cannot be used ({e.strerror or e})") from None
    return folder


def cache_write_error(folder: str, e: OSError) -> DataError:
    """A one-line error for a failed write into the cache (disk full, permissions changed under us)."""
    if e.errno == errno.ENOSPC:
        return DataError(
            f"no space left on the device of the cache folder {folder}; free space there or set "
            "data.cache_dir (or TRAINER_CACHE_DIR) to a folder on a bigger disk"
        )
    return _unusable(folder, f"could not be written ({e.strerror or e})")


def remove_stale(parent: str) -> None:
    """Delete temp and unfinished folders left by runs that can no longer be alive."""
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        limit = STALE_TMP_SECONDS if name.startswith(".tmp-") else STALE_PARTIAL_SECONDS
        if not name.startswith((".tmp-", ".partial-")):
            continue
        try:
            if now - os.path.getmtime(path) > limit:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile
