"""The file lock of a cache entry directory: the pretraining cache (thawlab.source_cache) and the shared feature
store (thawlab.feature_store) make each entry once under it. Imports nothing of thawlab: both sides can use it."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def locked(d: Path):
    """An exclusive lock on d/.lock, d created. A holder may remove d (a failed pretraining): whoever waited
    on the old lock file then holds a lock on a deleted file, sees that and locks the new one."""
    while True:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.stat(d / ".lock").st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield
                return
