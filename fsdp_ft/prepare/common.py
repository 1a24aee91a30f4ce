"""What both prepare steps need: pip as a subprocess, file hashes, and their one-line error."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from fsdp_ft.errors import UserError


class PrepareError(UserError):
    """A package that cannot be fetched or does not hold what we expect, or a conversion that does not check."""


def pip(*args: str) -> None:
    """Run pip of this interpreter; a failure becomes one line with pip's last words."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PrepareError(f"`{' '.join(cmd[2:])}` failed: {last}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
