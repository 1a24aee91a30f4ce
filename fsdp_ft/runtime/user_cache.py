"""Small JSON caches in the user's cache folder (measured peak FLOP/s, planned memory settings): things that cost
seconds to work out and depend only on what their key says. A read-only or missing home only costs the seconds."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("FSDP_FT_CACHE_DIR"):
        return Path(os.environ["FSDP_FT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fsdp_ft"


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def merge(path: Path, key: str, value: dict) -> dict:
    """Add one entry to the JSON cache; written to a temporary file and renamed, so parallel ranks never tear it."""
    cached = read(path)
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: work it out again next time
    return cached


def source_digest(folder: Path) -> str:
    """A digest of the Python sources under `folder`: part of a cache key wherever a cached answer depends on
    this package's code (a new release must not reuse an old answer)."""
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]
