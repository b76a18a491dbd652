"""Debian packages a server fixture needs, installed once even when test workers race."""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "tierstore-tests-apt.lock"
OPTIONS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=600"]


def apt_install(package: str, *, installed: Callable[[], bool]) -> None:
    """``apt-get install package`` (after ``apt-get update`` if the first try fails),
    unless ``installed()`` holds once this process has the lock. Raises
    ``subprocess.SubprocessError`` or ``OSError`` when apt-get fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be installing it right now
        if installed():
            return
        try:
            subprocess.run(["apt-get", "install", *OPTIONS, package], check=True, env=env,
                           capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError):
            subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"],
                           check=True, env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", *OPTIONS, package], check=True, env=env,
                           capture_output=True, timeout=600)
