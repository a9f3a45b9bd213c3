"""Content hashes, in one place: shards, manifests, tokenizers and checkpoint files are all
identified by the sha256 of their bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (shards and checkpoint files can be large)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
